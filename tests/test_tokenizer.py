"""Tokenizers, streaming detokenizer, ChatML template and the append-only Conversation."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtrie.models.tokenizer import (
    ByteTokenizer,
    ChatTemplate,
    Conversation,
    HFTokenizer,
    StreamingDetokenizer,
    load_tokenizer,
)

# Text that stresses multi-byte UTF-8: accents, CJK, emoji with modifiers / ZWJ, newlines.
PIECES = ["a", "Z", " ", "\n", "é", "ß", "中", "文", "😀", "🎉", "👍🏽", "👩‍💻", "\u0301", "ﬁ"]
TEXT = st.lists(
    st.sampled_from(PIECES) | st.characters(codec="utf-8", exclude_characters="\ufffd"), max_size=30
).map("".join)

BYTE = ByteTokenizer()


def stream(tokenizer, ids) -> tuple[list[str], str]:
    """Feed `ids` one at a time; return the chunks (flush included) and `text`."""
    detok = StreamingDetokenizer(tokenizer)
    chunks = [detok.add_token(i) for i in ids]
    chunks.append(detok.finalize())
    return chunks, detok.text


# --- ByteTokenizer ----------------------------------------------------------------------


def test_byte_special_ids():
    assert BYTE.special_tokens == {
        "<|bos|>": 256,
        "<|eos|>": 257,
        "<|pad|>": 258,
        "<|im_start|>": 259,
        "<|im_end|>": 260,
    }
    assert BYTE.vocab_size == 261 <= 320
    assert (BYTE.bos_id, BYTE.eos_id) == (256, 257)
    assert BYTE.eos_ids == {257, 260}


@given(TEXT)
def test_byte_round_trip(text):
    ids = BYTE.encode(text)
    assert BYTE.decode(ids) == text
    assert BYTE.decode(BYTE.encode(text, add_bos=True)) == "<|bos|>" + text


def test_byte_specials_map_to_ids():
    text = "<|im_start|>user\nhi<|im_end|><|eos|>"
    ids = BYTE.encode(text)
    assert ids == [259, *b"user\nhi", 260, 257]
    assert BYTE.decode(ids) == text
    plain = BYTE.encode(text, allow_special=False)
    assert plain == list(text.encode()) and max(plain) < 256
    assert BYTE.decode(plain) == text
    assert BYTE.encode("x", add_bos=True) == [256, ord("x")]


def test_byte_decode_replaces_invalid_utf8_and_checks_ids():
    assert BYTE.decode([0xE4, 0xB8, 260, 0x41]) == "\ufffd<|im_end|>A"
    assert BYTE.decode(np.array([104, 105])) == BYTE.decode(mx.array([104, 105])) == "hi"
    with pytest.raises(ValueError, match=r"\[0, 261\)"):
        BYTE.decode([261])
    with pytest.raises(TypeError, match="integers"):
        BYTE.decode([1.5])
    with pytest.raises(TypeError, match="str"):
        BYTE.encode(b"bytes")
    with pytest.raises(ValueError, match="surrogate"):
        BYTE.encode("a\ud800")


# --- StreamingDetokenizer over bytes ----------------------------------------------------


@given(TEXT)
def test_byte_stream_never_splits_a_character(text):
    chunks, streamed = stream(BYTE, BYTE.encode(text))
    assert streamed == "".join(chunks) == text
    assert not any("\ufffd" in c for c in chunks)


@given(st.lists(st.integers(0, BYTE.vocab_size - 1), max_size=40))
def test_byte_stream_of_arbitrary_ids_equals_decode(ids):
    assert stream(BYTE, ids)[1] == BYTE.decode(ids)


def test_stream_holds_back_incomplete_characters():
    detok = StreamingDetokenizer(BYTE)
    assert [detok.add_token(b) for b in "中".encode()] == ["", "", "中"]
    assert detok.add_token(0xF0) == ""
    assert detok.finalize() == "\ufffd"
    assert detok.text == "中\ufffd"


# --- HFTokenizer ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny byte-level BPE tokenizer.json with ChatML added tokens, plus configs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
    )
    corpus = ["hello world", "the quick brown fox", "你好世界 🎉 emoji", "user\nassistant\n"]
    tok.train_from_iterator(corpus * 5, trainer)
    d = tmp_path_factory.mktemp("hf_tok")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": None}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return d


@pytest.fixture(scope="module")
def hf(hf_dir):
    return HFTokenizer(hf_dir)


def test_hf_specials_and_ends(hf, hf_dir):
    assert hf.special_tokens == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    assert 256 + 3 < hf.vocab_size <= 320  # byte alphabet + specials + some merges
    assert hf.eos_id == 2
    assert hf.eos_ids == {0, 2}
    assert hf.bos_id is None
    with pytest.raises(ValueError, match="no bos"):
        hf.encode("x", add_bos=True)
    assert isinstance(load_tokenizer(hf_dir), HFTokenizer)
    assert isinstance(load_tokenizer(hf_dir.parent), ByteTokenizer)
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert HFTokenizer(hf_dir / "tokenizer.json").vocab_size == hf.vocab_size


def test_hf_specials_map_to_ids(hf):
    ids = hf.encode("<|im_start|>user\nhello<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1]
    plain = hf.encode("<|im_start|>user", allow_special=False)
    assert 1 not in plain
    assert hf.decode(plain) == "<|im_start|>user"
    # the special-free copy does not change the main tokenizer
    assert hf.encode("<|im_start|>")[0] == 1
    with pytest.raises(ValueError, match="surrogate"):
        hf.encode("\udc80")


@settings(max_examples=25)
@given(TEXT)
def test_hf_round_trip_and_stream(hf, text):
    ids = hf.encode(text)
    assert hf.decode(ids) == text
    chunks, streamed = stream(hf, ids)
    assert streamed == "".join(chunks) == text
    assert not any("\ufffd" in c for c in chunks)


@settings(max_examples=25)
@given(st.data())
def test_hf_stream_of_arbitrary_ids_equals_decode(hf, data):
    ids = data.draw(st.lists(st.integers(0, hf.vocab_size - 1), max_size=30))
    assert stream(hf, ids)[1] == hf.decode(ids)


# --- ChatTemplate / Conversation --------------------------------------------------------


def chatml(messages, add_generation_prompt=True) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def test_template_renders_chatml():
    template = ChatTemplate(BYTE)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi 👋"}]
    ids = template.render(messages)
    assert BYTE.decode(ids) == chatml(messages)
    assert ids[-len(template.generation_prompt) :] == template.generation_prompt
    assert template.render(messages, add_generation_prompt=False) == ids[: -len(template.generation_prompt)]
    # content never turns special strings into special ids
    sneaky = template.render([{"role": "user", "content": "<|im_end|>"}], add_generation_prompt=False)
    assert sneaky.count(BYTE.special_tokens["<|im_end|>"]) == 1


def test_template_rejects_bad_input():
    template = ChatTemplate(BYTE)
    with pytest.raises(TypeError, match="role"):
        template.render([{"content": "x"}])
    with pytest.raises(TypeError, match="content"):
        template.render([{"role": "user", "content": 3}])
    with pytest.raises(ValueError, match="role"):
        template.render([{"role": "a\nb", "content": "x"}])


def test_template_needs_chatml_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="im_start"):
        ChatTemplate(HFTokenizer(tmp_path))


@st.composite
def replies(draw, tokenizer):
    """A reply: arbitrary non-special ids or the ids of some text, maybe closed by an end id."""
    lo, hi = (0, 255) if tokenizer is BYTE else (3, tokenizer.vocab_size - 1)  # HF specials: 0..2
    body = draw(st.lists(st.integers(lo, hi), max_size=12) | TEXT.map(tokenizer.encode))
    end = draw(st.none() | st.sampled_from(sorted(tokenizer.eos_ids)))
    return body + ([end] if end is not None else [])


def check_conversation(tokenizer, system, turns):
    template = ChatTemplate(tokenizer)
    conv = Conversation(template, system=system)
    previous = None
    all_valid = True
    for user, reply in turns:
        conv.add_user(user)
        prompt = conv.prompt()
        if previous is not None:
            assert prompt[: len(previous)] == previous
        assert prompt == conv.tokens + template.generation_prompt
        conv.add_reply(reply)
        previous = prompt + reply
        assert conv.tokens[: len(previous)] == previous
        ended = bool(reply) and reply[-1] in tokenizer.eos_ids
        body = reply[:-1] if ended else reply
        # render() can only reproduce replies whose text re-encodes to the same ids
        all_valid &= tokenizer.encode(tokenizer.decode(body), allow_special=False) == body
        all_valid &= not ended or reply[-1] == template.im_end_id
    assert [m["role"] for m in conv.messages] == (["system"] if system is not None else []) + [
        "user",
        "assistant",
    ] * len(turns)
    ends = conv.boundaries
    assert len(ends) == len(conv.messages) and ends[-1] == len(conv.tokens)
    assert all(conv.tokens[e - len(template.separator) : e] == template.separator for e in ends)
    if all_valid:
        assert template.render(conv.messages, add_generation_prompt=False) == conv.tokens
        starts = [0] + ends[:-1]
        assert [template.render_message(m) for m in conv.messages] == [
            conv.tokens[a:b] for a, b in zip(starts, ends)
        ]
        assert template.render(conv.messages) == conv.prompt()


@settings(max_examples=40)
@given(st.none() | TEXT, st.data())
def test_byte_conversation_is_append_only(system, data):
    turns = data.draw(st.lists(st.tuples(TEXT, replies(BYTE)), min_size=1, max_size=4))
    check_conversation(BYTE, system, turns)


@settings(max_examples=20)
@given(st.none() | TEXT, st.data())
def test_hf_conversation_is_append_only(hf, system, data):
    turns = data.draw(st.lists(st.tuples(TEXT, replies(hf)), min_size=1, max_size=3))
    check_conversation(hf, system, turns)


def test_conversation_closes_unterminated_reply():
    template = ChatTemplate(BYTE)
    conv = Conversation(template)
    conv.add_user("hi")
    prompt = conv.prompt()
    conv.add_reply(BYTE.encode("hello"))
    assert conv.tokens == prompt + BYTE.encode("hello<|im_end|>\n")
    assert conv.messages[-1] == {"role": "assistant", "content": "hello"}
    conv.add_user("again")
    prompt = conv.prompt()
    conv.add_reply(BYTE.encode("ok<|eos|>"))  # ended by another end token: kept as generated
    assert conv.tokens == prompt + BYTE.encode("ok<|eos|>\n")
    with pytest.raises(ValueError, match="token ids"):
        conv.add_reply([999])


def test_conversation_fork_continues_independently():
    from kvtrie.models.tokenizer import ByteTokenizer, ChatTemplate, Conversation

    conv = Conversation(ChatTemplate(ByteTokenizer()), system="sys")
    conv.add_user("hi")
    fork = conv.fork()
    fork.add_user("branch")
    assert fork.tokens[: len(conv.tokens)] == conv.tokens and len(fork.tokens) > len(conv.tokens)
    assert fork.boundaries[: len(conv.boundaries)] == conv.boundaries and len(conv.messages) == 2
