"""The Python snippets of the README and of docs/ run as written: the README's on their own, and
docs/ in the order of the README's links, one page after another in one namespace (a page's
snippets build on the ones before). Every page the README links exists, and so does every
relative link in the docs."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).parent.parent
PAGES = ["session-api.md", "models.md", "hybrid.md", "mlx-lm.md", "serve.md", "tiers.md", "disk.md",
         "cache-control.md", "shared.md", "benchmarks.md", "design.md"]


def snippets(path: pathlib.Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_the_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert text.splitlines()[3:5] == ["make demo   # creates .venv, installs kvtrie, serves interleaved conversations on the bundled tiny model",
                                      "make test   # creates .venv, installs kvtrie with its test extras, runs the whole test suite"]
    linked = re.findall(r"\]\(docs/([\w.-]+\.md)\)", text)
    assert sorted(set(linked)) == sorted(PAGES)
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (ROOT / image).stat().st_size < 100_000  # small pictures


def test_readme_snippets_run():
    scope: dict = {}
    for block in snippets(ROOT / "README.md"):
        exec(compile(block, "README.md", "exec"), scope)
    assert scope["session"].cached > 0  # the second question restored the system prompt


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_in_the_docs_resolve(page):
    path = ROOT / "docs" / page
    for target in re.findall(r"\]\((?!https?://|#)([^)#\s]+)", path.read_text()):
        assert (path.parent / target).exists(), f"{page} links to {target}, which does not exist"


def test_docs_snippets_run(capsys):
    scope: dict = {}
    count = 0
    for page in PAGES:
        for block in snippets(ROOT / "docs" / page):
            exec(compile(block, f"docs/{page}", "exec"), scope)
            count += 1
    assert count >= 5
    out = capsys.readouterr().out
    restored = [int(m) for m in re.findall(r"tokens, (\d+) restored", out)]
    assert restored[0] == 0 and restored[1] >= len(scope["system"])  # the system prompt is reused
    # the mlx-lm snippet: the next turn restored the prompt and the whole reply
    assert scope["trie"].stats()["cached_tokens"] == len(scope["prompt"]) + len(scope["reply"])
    # the disk snippet: the restarted cache restored the whole prompt from disk
    assert scope["after_restart"].cached_tokens == len(scope["document"])
