"""Trie: match against a brute-force oracle, and the structural operations."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvtrie.trie import Trie, as_token_array

seqs = st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), max_size=8)


def insert(trie: Trie, tokens: list[int]) -> None:
    """Insert a sequence the way PrefixCache does: split mid-edge, then add the rest."""
    arr = as_token_array(tokens)
    m = trie.match(arr)
    if m.length == len(arr):
        return
    parent = trie.split(m.last, m.length) if m.ends_mid_edge else (m.last or trie.root)
    trie.add_child(parent, arr[m.length :], payload=None)


def prefixes(stored: list[list[int]]) -> set[tuple[int, ...]]:
    return {tuple(s[:i]) for s in stored for i in range(1, len(s) + 1)}


def check_structure(trie: Trie, expected: set[tuple[int, ...]]) -> None:
    spelled = set()
    for node, _ in trie.walk():
        assert node.start == node.parent.end
        assert node.parent.children[int(node.tokens[0])] is node
        assert len(node.tokens) > 0
        path = np.concatenate([n.tokens for n in node.path()]).tolist()
        spelled.update(tuple(path[:i]) for i in range(node.start + 1, node.end + 1))
    assert spelled == expected
    assert trie.num_tokens == len(spelled)
    assert trie.num_nodes == sum(1 for _ in trie.walk())
    assert trie.num_leaves == sum(1 for n, _ in trie.walk() if n.is_leaf)


@given(stored=seqs, query=st.lists(st.integers(0, 3), min_size=1, max_size=14))
def test_match_is_the_longest_common_prefix(stored, query):
    trie = Trie()
    for s in stored:
        insert(trie, s)
    check_structure(trie, prefixes(stored))
    m = trie.match(as_token_array(query))
    best = 0
    for s in stored:
        i = 0
        while i < min(len(s), len(query)) and s[i] == query[i]:
            i += 1
        best = max(best, i)
    assert m.length == best
    if m.path:
        assert m.path[-1].start < m.length <= m.path[-1].end
        assert [n.parent for n in m.path[1:]] == list(m.path[:-1])


@given(stored=seqs, data=st.data())
def test_merge_and_remove_keep_every_other_sequence(stored, data):
    trie = Trie()
    for s in stored:
        insert(trie, s)
    expected = prefixes(stored)
    single = [n for n, _ in trie.walk() if len(n.children) == 1]
    if single:
        trie.merge(data.draw(st.sampled_from(single)))
        check_structure(trie, expected)
    leaves = [n for n, _ in trie.walk() if n.is_leaf]
    if leaves:
        leaf = data.draw(st.sampled_from(leaves))
        through = tuple(np.concatenate([n.tokens for n in leaf.path()]).tolist()[: leaf.start + 1])
        trie.remove_leaf(leaf)
        check_structure(trie, {p for p in expected if p[: len(through)] != through})


def test_structural_errors():
    trie = Trie()
    insert(trie, [1, 2, 3])
    (node,) = trie.root.children.values()
    with pytest.raises(ValueError):
        trie.split(node, 0)
    with pytest.raises(ValueError):
        trie.split(node, 3)
    with pytest.raises(ValueError):
        trie.add_child(trie.root, as_token_array([1]), None)
    with pytest.raises(ValueError):
        trie.merge(node)  # a leaf has no child to merge into
    upper = trie.split(node, 1)
    with pytest.raises(ValueError):
        trie.remove_leaf(upper)
    node.pins = 1
    with pytest.raises(ValueError, match="pinned"):
        trie.remove_leaf(node)


def test_payload_callbacks_split_and_merge():
    trie = Trie(split_payload=lambda p, k: (p[:k], p[k:]), merge_payload=lambda a, b: a + b)
    node = trie.add_child(trie.root, as_token_array([5, 6, 7, 8]), "abcd")
    upper = trie.split(node, 1)
    assert (upper.payload, node.payload) == ("a", "bcd")
    merged = trie.merge(upper)
    assert merged is node and node.payload == "abcd" and node.start == 0


def test_trie_never_imports_mlx():
    import subprocess

    # kvtrie/__init__ imports the cache (and so mlx); load trie.py on its own
    code = (
        "import importlib.util, sys; spec = importlib.util.spec_from_file_location('t', "
        f"{str(__import__('kvtrie.trie').trie.__file__)!r}); m = importlib.util.module_from_spec(spec); "
        "spec.loader.exec_module(m); assert not any(k.startswith('mlx') for k in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


token_items = st.one_of(st.integers(-3, 2**31 + 3), st.booleans(), st.floats(allow_nan=False), st.sampled_from([np.int64(5), "7"]))


@given(st.lists(token_items, min_size=1, max_size=20))
def test_token_lists_are_checked_as_the_slow_path_checks_them(tokens):
    """The list fast path (array.array) accepts exactly the non-negative int32 ids, bools and
    floats refused, and returns their int32 array."""
    plain = all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in tokens)
    if plain and all(0 <= t < 2**31 for t in tokens):
        arr = as_token_array(tokens)
        assert arr.dtype == np.int32 and arr.tolist() == [int(t) for t in tokens]
    else:
        with pytest.raises(TypeError if not plain else ValueError):
            as_token_array(tokens)
