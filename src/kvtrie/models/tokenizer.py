"""Tokenizers, a streaming detokenizer and an append-only ChatML conversation.

- `ByteTokenizer`: raw UTF-8 bytes (ids 0..255) plus a few chat special tokens; needs
  nothing and pairs with the tiny random reference models.
- `HFTokenizer`: wraps a Hugging Face `tokenizer.json` (the optional `tokenizers` package).
- `load_tokenizer(model_dir)`: the HF one when the directory has a `tokenizer.json`.
- `StreamingDetokenizer`: turns ids into text as they are generated, never emitting
  half a UTF-8 character.
- `ChatTemplate` / `Conversation`: ChatML rendering. A `Conversation` keeps token ids, not
  text, so every turn's prompt extends the previous prompt plus the reply exactly as it
  was generated: that is what lets a prefix cache reuse the whole previous turn.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# Token strings that end a reply in common chat vocabularies (ChatML, Llama 3, GPT-2/Qwen, Gemma, Phi-3).
_END_TOKEN_NAMES = (
    IM_END,
    "<|eot_id|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "<|end|>",
)


def _as_ids(ids: Iterable[int], vocab_size: int) -> list[int]:
    """`ids` as a list of Python ints, each checked to lie in `[0, vocab_size)`."""
    arr = np.asarray(ids if not hasattr(ids, "tolist") else ids.tolist())
    if arr.size == 0:
        return []
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"token ids must be integers, got {arr.dtype} values")
    arr = arr.reshape(-1)
    if arr.min() < 0 or arr.max() >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}); got min {arr.min()}, max {arr.max()}")
    return arr.tolist()


def _check_text(text: str) -> None:
    """Reject non-str input and strings UTF-8 cannot encode (lone surrogates)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"text holds a lone surrogate {text[e.start]!r} at index {e.start}, which UTF-8 "
            "cannot encode; decode your input with errors='replace' or 'surrogatepass' first"
        ) from None


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then special tokens from 256 (`vocab_size` 261).

    Any text round-trips (`decode(encode(s)) == s`), and any id sequence decodes:
    invalid UTF-8 becomes U+FFFD, special ids render as their strings.
    """

    SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>", IM_START, IM_END)

    def __init__(self) -> None:
        self.special_tokens: dict[str, int] = {s: 256 + i for i, s in enumerate(self.SPECIALS)}
        self.vocab_size: int = 256 + len(self.SPECIALS)
        self.bos_id: int = self.special_tokens["<|bos|>"]
        self.eos_id: int = self.special_tokens["<|eos|>"]
        self.pad_id: int = self.special_tokens["<|pad|>"]
        self.eos_ids: frozenset[int] = frozenset({self.eos_id, self.special_tokens[IM_END]})
        self._bytes = [bytes([i]) for i in range(256)] + [s.encode() for s in self.SPECIALS]
        # Longest first, so one special that prefixes another never wins.
        alternatives = sorted(self.SPECIALS, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"

    def encode(self, text: str, *, add_bos: bool = False, allow_special: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings in it become their ids if `allow_special`."""
        _check_text(text)
        ids = [self.bos_id] if add_bos else []
        if not allow_special:
            ids.extend(text.encode("utf-8"))
            return ids
        for i, piece in enumerate(self._split.split(text)):
            if i % 2:  # odd pieces are the captured special tokens
                ids.append(self.special_tokens[piece])
            else:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`: bytes decoded with `errors="replace"`, specials as their strings."""
        return b"".join(self._bytes[i] for i in _as_ids(ids, self.vocab_size)).decode("utf-8", errors="replace")

    def id_to_token_bytes(self, token_id: int) -> bytes:
        """The bytes one id stands for (a special token's UTF-8 string); used for streaming."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id must lie in [0, {self.vocab_size}), got {token_id}")
        return self._bytes[token_id]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> Optional[str]:
    """A tokenizer_config token entry: a plain string or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value: Any) -> list[int]:
    """A config `*_token_id` entry: an int, a list of ints, or absent."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class HFTokenizer:
    """A Hugging Face `tokenizer.json` behind the same interface as `ByteTokenizer`.

    `path` is a model directory or the `tokenizer.json` file itself. End-of-reply ids
    come from `tokenizer_config.json` / `generation_config.json` / `config.json` next to
    it, plus the usual chat end tokens (`<|im_end|>`, `<|eot_id|>`, ...) found in the vocab.
    """

    def __init__(self, path: PathLike) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("HFTokenizer needs the `tokenizers` package: pip install 'kvtrie[tokenizers]'") from e
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {file}")
        directory = file.parent
        self.path = file
        self._tok = Tokenizer.from_file(str(file))
        self._plain: Any = None  # a copy that encodes special-token strings as text, made on demand
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.special_tokens: dict[str, int] = {
            t.content: i for i, t in sorted(self._tok.get_added_tokens_decoder().items())
        }

        tok_cfg = _read_json(directory / "tokenizer_config.json")
        gen_cfg = _read_json(directory / "generation_config.json")
        model_cfg = _read_json(directory / "config.json")

        def known(ids: Iterable[int]) -> list[int]:
            return [i for i in ids if 0 <= i < self.vocab_size]

        def by_name(name: Optional[str]) -> list[int]:
            i = self._tok.token_to_id(name) if name is not None else None
            return [] if i is None else [i]

        eos = known(
            by_name(_token_content(tok_cfg.get("eos_token")))
            + _id_list(gen_cfg.get("eos_token_id"))
            + _id_list(model_cfg.get("eos_token_id"))
        )
        ends = known(i for name in _END_TOKEN_NAMES for i in by_name(name))
        self.eos_id: Optional[int] = (eos + ends)[0] if eos + ends else None
        self.eos_ids: frozenset[int] = frozenset(eos + ends)

        # tokenizer_config decides when it names a bos token at all (Qwen sets it to null).
        if "bos_token" in tok_cfg:
            bos = known(by_name(_token_content(tok_cfg["bos_token"])))
        else:
            bos = known(_id_list(model_cfg.get("bos_token_id")) + _id_list(gen_cfg.get("bos_token_id")))
        self.bos_id: Optional[int] = bos[0] if bos else None

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str, *, add_bos: bool = False, allow_special: bool = True) -> list[int]:
        """Token ids of `text` (no post-processor extras); specials map to ids if `allow_special`."""
        _check_text(text)
        if allow_special:
            tok = self._tok
        else:
            if self._plain is None:
                from tokenizers import Tokenizer

                self._plain = Tokenizer.from_str(self._tok.to_str())
                self._plain.encode_special_tokens = True
            tok = self._plain
        ids = tok.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise ValueError(f"add_bos=True but {self!r} has no bos token")
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens included as their strings."""
        return self._tok.decode(_as_ids(ids, self.vocab_size), skip_special_tokens=False)


TokenizerLike = Union[ByteTokenizer, HFTokenizer]


def load_tokenizer(model_dir: Optional[PathLike] = None) -> TokenizerLike:
    """The `HFTokenizer` of `model_dir` if it holds a `tokenizer.json`, else a `ByteTokenizer`."""
    if model_dir is not None and (Path(model_dir) / "tokenizer.json").is_file():
        return HFTokenizer(model_dir)
    return ByteTokenizer()


class StreamingDetokenizer:
    """Incremental text of a growing id sequence, one `add_token` per generated id.

    Never emits half a character: a byte-level tokenizer (one with `id_to_token_bytes`)
    goes through an incremental UTF-8 decoder; any other tokenizer re-decodes a short
    window of recent ids and holds text back while it ends in U+FFFD. The concatenated
    output equals `tokenizer.decode(all ids)` once `finalize()` has flushed the rest.
    """

    def __init__(self, tokenizer: TokenizerLike) -> None:
        self.tokenizer = tokenizer
        self._token_bytes: Optional[Callable[[int], bytes]] = getattr(tokenizer, "id_to_token_bytes", None)
        self._bytewise = self._token_bytes is not None
        self.reset()

    def reset(self) -> None:
        """Start a new stream: forget every id and all emitted text."""
        self._chunks: list[str] = []
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # Decode-window state: `_window` starts at the last-but-one emission point, so a
        # decoder that treats the first token specially (e.g. strips a leading space) sees
        # the same context in `_window[:_read]` (already emitted) and in `_window`.
        self._window: list[int] = []
        self._read = 0
        self._prefix = ""

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._chunks)

    def add_token(self, token_id: int) -> str:
        """Feed one id; return the text it completes (possibly "")."""
        if self._token_bytes is not None:
            return self._emit(self._utf8.decode(self._token_bytes(int(token_id))))
        self._window.append(int(token_id))
        text = self.tokenizer.decode(self._window)
        if len(text) <= len(self._prefix) or text.endswith("\ufffd"):
            return ""
        return self._advance(text)

    def finalize(self) -> str:
        """Flush held-back text (an incomplete character becomes U+FFFD) and return it."""
        if self._bytewise:
            return self._emit(self._utf8.decode(b"", final=True))
        if self._read == len(self._window):
            return ""
        return self._advance(self.tokenizer.decode(self._window))

    def _advance(self, text: str) -> str:
        self._window = self._window[self._read :]
        self._read = len(self._window)
        chunk = text[len(self._prefix) :]
        self._prefix = self.tokenizer.decode(self._window)
        return self._emit(chunk)

    def _emit(self, chunk: str) -> str:
        if chunk:
            self._chunks.append(chunk)
        return chunk


Message = Mapping[str, str]


class ChatTemplate:
    """ChatML: each message is `<|im_start|>{role}\\n{content}<|im_end|>\\n`.

    A message is tokenized in pieces, header (`<|im_start|>{role}\\n`), content, footer
    (`<|im_end|>\\n`), so the generation prompt `<|im_start|>assistant\\n` is always a
    token prefix of the rendered assistant message that follows it. Content never maps
    special-token strings to special ids (a user cannot close a turn by typing one).
    """

    def __init__(self, tokenizer: TokenizerLike) -> None:
        missing = [s for s in (IM_START, IM_END) if s not in tokenizer.special_tokens]
        if missing:
            raise ValueError(
                f"ChatTemplate needs the ChatML tokens {IM_START} and {IM_END}; "
                f"{tokenizer!r} lacks {', '.join(missing)}"
            )
        self.tokenizer = tokenizer
        self.im_start_id: int = tokenizer.special_tokens[IM_START]
        self.im_end_id: int = tokenizer.special_tokens[IM_END]
        self.separator: list[int] = tokenizer.encode("\n", allow_special=False)

    def header(self, role: str) -> list[int]:
        """Ids of `<|im_start|>{role}\\n`."""
        if not isinstance(role, str) or not role or "\n" in role:
            raise ValueError(f"a message role must be a non-empty str without newlines, got {role!r}")
        return [self.im_start_id] + self.tokenizer.encode(role + "\n", allow_special=False)

    @property
    def generation_prompt(self) -> list[int]:
        """Ids of `<|im_start|>assistant\\n`, which the model's reply continues."""
        return self.header("assistant")

    def render_message(self, message: Message) -> list[int]:
        """Ids of one message (a mapping with "role" and "content" strings)."""
        try:
            role, content = message["role"], message["content"]
        except (KeyError, TypeError):
            raise TypeError(f"a message must be a mapping with 'role' and 'content', got {message!r}") from None
        if not isinstance(content, str):
            raise TypeError(f"message content must be a str, got {type(content).__name__}")
        return (
            self.header(role) + self.tokenizer.encode(content, allow_special=False) + [self.im_end_id] + self.separator
        )

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """Ids of all `messages`, then the generation prompt if `add_generation_prompt`."""
        ids = [i for m in messages for i in self.render_message(m)]
        return ids + self.generation_prompt if add_generation_prompt else ids


class Conversation:
    """An append-only chat held as token ids.

    `prompt()` is the history plus the generation prompt; `add_reply(tokens)` appends the
    generation prompt, the reply's ids exactly as sampled, and the closing tokens. So each
    turn's prompt starts with the previous prompt + reply, token for token, whatever the
    reply was (even bytes that are not valid UTF-8, or a sequence the tokenizer would never
    produce from the text), and a prefix cache restores all of it.
    """

    def __init__(self, template: ChatTemplate, system: Optional[str] = None) -> None:
        self.template = template
        self._tokens: list[int] = []
        self._messages: list[dict[str, str]] = []
        self._ends: list[int] = []
        if system is not None:
            self._add("system", system)

    def fork(self) -> Conversation:
        """An independent copy, to continue this history along another branch (agents, edits)."""
        other = Conversation(self.template)
        other._tokens = list(self._tokens)
        other._messages = self.messages
        other._ends = list(self._ends)
        return other

    @property
    def tokens(self) -> list[int]:
        """The ids of the history so far (a copy), without a generation prompt."""
        return list(self._tokens)

    @property
    def messages(self) -> list[dict[str, str]]:
        """The history as text messages (copies), e.g. for `template.render(conv.messages)`."""
        return [dict(m) for m in self._messages]

    @property
    def boundaries(self) -> list[int]:
        """Token offsets where each message ends (and the next begins).

        These are where later requests diverge (an edited or new message, a different
        conversation with the same system prompt): pass them as `capture_hints` so a
        hybrid model snapshots its recurrent state there.
        """
        return list(self._ends)

    def add_user(self, text: str) -> None:
        """Append a user message."""
        self._add("user", text)

    def prompt(self) -> list[int]:
        """The ids to prefill for the next reply: the history plus `<|im_start|>assistant\\n`."""
        return self._tokens + self.template.generation_prompt

    def add_reply(self, tokens: Iterable[int]) -> None:
        """Record the assistant's reply ids as generated; close it with `<|im_end|>` if needed."""
        tok = self.template.tokenizer
        reply = _as_ids(tokens, tok.vocab_size)
        ended = bool(reply) and reply[-1] in tok.eos_ids
        content = tok.decode(reply[:-1] if ended else reply)
        closing = ([] if ended else [self.template.im_end_id]) + self.template.separator
        self._tokens += self.template.generation_prompt + reply + closing
        self._messages.append({"role": "assistant", "content": content})
        self._ends.append(len(self._tokens))

    def _add(self, role: str, text: str) -> None:
        message = {"role": role, "content": text}
        self._tokens += self.template.render_message(message)
        self._messages.append(message)
        self._ends.append(len(self._tokens))
