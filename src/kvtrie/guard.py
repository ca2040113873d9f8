"""Admission of an HTTP request body on `kvtrie serve`: whatever a client sends, it gets a 4xx in
the endpoint's error shape, and the server (its generation thread, its cache) is unharmed.

`admit(handler, limits)`, called first thing in the handler's `do_POST` (and `do_DELETE`):

- reads the body once, within `--max-request-bytes`: no or a bad Content-Length, a chunked body
  -> 411 / 400; a declared size past the limit -> 413 without reading it (the connection lingers
  a moment so that the client reads the answer); a body cut short or a client silent for
  `--request-timeout` seconds -> the connection is closed, nothing answered;
- decodes it as strict UTF-8 and parses it as JSON (no NaN or Infinity, no number past a
  float's range, no string with a lone surrogate, nesting at most `MAX_DEPTH` deep); the top
  level must be an object (-> 400 otherwise);
- for `/v1/chat/completions`, `/chat/completions` and `/v1/completions`, checks every field
  mlx_lm.server (0.32) reads before it reaches its generation thread (`check_openai`): the ones
  it validates itself, with the same rules, so that its own differently shaped 400s are never
  reached, and the ones it does not, which crash or kill it (see `check_openai`);
- then puts the body back for the code after it: `handler.rfile` replays it (mlx-lm's
  `do_POST` reads it with Content-Length itself) and `handler.kvtrie_body` holds it parsed.

The prompt's length in tokens is known only once it is rendered, which mlx-lm does on its
generation thread (`ResponseGenerator._tokenize`): `with_prompt_limit` wraps it, so a prompt past
`--max-prompt-tokens`, an empty one, or one the chat template refuses is a `Rejected` that mlx-lm
puts on the request's queue; the wrapped `generate` raises it in the handler thread as a
`Refusal`, past mlx-lm's handler (which answers any exception there with a 404), and the
handler answers it (`send_error`): a 400 naming the count and the limit.

Errors have the endpoint's shape (`send_error`, usable by any code answering on the handler):
OpenAI's `{"error": {"message", "type", "param", "code"}}` on `/v1/chat/completions` and
`/v1/completions`, Anthropic's `{"type": "error", "error": {"type", "message"}}` on
`/v1/messages*`, and `{"error": {"message", "type"}}` on `/kvtrie/*`.

No MLX here: the model's vocabulary, context length and whether it reads images come from
`Limits`, which reads the model's config.json.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import socket
import time
from collections.abc import Callable
from typing import Any, Optional

import attrs

logger = logging.getLogger("kvtrie.serve")

MAX_REQUEST_BYTES = 32 << 20  # --max-request-bytes
DEFAULT_PROMPT_TOKENS = 131072  # --max-prompt-tokens where the model's config gives no context length
REQUEST_TIMEOUT = 60.0  # --request-timeout: seconds a client may stay silent while we read its request
MAX_DEPTH = 64  # JSON nesting (objects and arrays) a body may have
LINGER_SECONDS = 2.0  # after refusing an unread body: how long we read (and drop) what the client still sends
LINGER_BYTES = 64 << 20  # ... and at most this much of it
INT32_MAX = (1 << 31) - 1
UINT64_MAX = (1 << 64) - 1
ABSURD = 1e6  # bound of the parameters mlx-lm takes any float for (penalties, temperature)
MAX_STOP_WORDS = 64
MAX_DRAFT_TOKENS = 256
MAX_TOP_LOGPROBS = 11  # mlx-lm's own bound

OPENAI_ROUTES = {"/v1/chat/completions": "chat", "/chat/completions": "chat", "/v1/completions": "text"}
ANTHROPIC_ROUTES = ("/v1/messages", "/v1/messages/count_tokens")
ROLES = ("system", "developer", "user", "assistant", "tool")
NULL_CONTENT_ROLES = ("assistant", "tool")  # whose content may be null (a message of tool calls)
TEXT_PART = "text"
IMAGE_PARTS = ("image_url", "input_image", "image")  # what mlx-lm takes for an image (its _image_url)
# apply_chat_template's own parameters: chat_template_kwargs naming them would change what the
# template returns (text, a dict, tensors) or clash with the server's own arguments
TEMPLATE_PARAMETERS = frozenset(
    {
        "conversation",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)

_DIGITS = re.compile(r"[0-9]{1,20}")
_INT_KEY = re.compile(r"-?[0-9]{1,20}")
_SURROGATE = re.compile("[\ud800-\udfff]")


# --- errors --------------------------------------------------------------------------------


class Rejected(Exception):
    """A request answered with an error: HTTP `status` (4xx), `message`, the field at fault
    (`param`), an OpenAI error `code`; `unread`: the body was not read (the connection lingers)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: Optional[str] = None,
        code: Optional[str] = None,
        unread: bool = False,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.unread = status, message, param, code, unread


class Refusal(BaseException):
    """A `Rejected` from the generation thread, raised by the wrapped `ResponseGenerator.generate`.
    A BaseException: it passes mlx-lm's handler (whose `except Exception` answers 404) up to
    kvtrie's, which answers it with `send_error`."""

    def __init__(self, rejected: Rejected):
        super().__init__(rejected.message)
        self.rejected = rejected


class Disconnected(Exception):
    """The client went away or fell silent while sending its request: nothing is answered."""


def bad(message: str, param: Optional[str] = None, *, code: Optional[str] = None) -> Rejected:
    return Rejected(400, message, param=param, code=code)


# --- error shapes --------------------------------------------------------------------------

_ANTHROPIC_KINDS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_KVTRIE_KINDS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}
_OPENAI_KINDS: dict = {}  # (OpenAI answers every 4xx as an invalid_request_error, with a `code`: "invalid_api_key", ...)


def route(path: str) -> str:
    """`path` without its query string."""
    return path.split("?", 1)[0]


def error_shape(path: str) -> str:
    """Which error shape the endpoint at `path` answers in: "anthropic", "kvtrie" or "openai"."""
    p = route(path)
    if p == "/v1/messages" or p.startswith("/v1/messages/"):
        return "anthropic"
    if p.startswith("/kvtrie/"):
        return "kvtrie"
    return "openai"


def error_body(
    path: str,
    status: int,
    message: str,
    *,
    param: Optional[str] = None,
    code: Optional[str] = None,
    kind: Optional[str] = None,
) -> dict:
    """The error body the endpoint at `path` answers with (`kind`: the error type, by default
    the usual one for `status` in that API)."""
    shape = error_shape(path)
    if shape == "anthropic":
        from .anthropic import error_body as anthropic_error

        return anthropic_error(
            kind or _ANTHROPIC_KINDS.get(status, "api_error" if status >= 500 else "invalid_request_error"), message
        )
    if shape == "kvtrie":
        kind = kind or _KVTRIE_KINDS.get(status, "server_error" if status >= 500 else "invalid_request_error")
        return {"error": {"message": message, "type": kind}}
    return {
        "error": {
            "message": message,
            "type": kind or _OPENAI_KINDS.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def send_error(
    handler: Any,
    status: int,
    message: str,
    *,
    param: Optional[str] = None,
    code: Optional[str] = None,
    kind: Optional[str] = None,
    headers: Optional[dict] = None,
    close: bool = False,
) -> None:
    """Answer `handler`'s request with an error in its endpoint's shape (chosen by `handler.path`):
    `status`, `message`, the field at fault (`param`, OpenAI's `param`), OpenAI's `code`, the error
    type (`kind`, else the API's usual one for the status), extra `headers`; `close`: the
    connection closes after it. A client that is gone is not an error."""
    data = json.dumps(
        error_body(handler.path, status, message, param=param, code=code, kind=kind), ensure_ascii=False
    ).encode()
    try:
        if hasattr(handler, "_set_completion_headers"):  # mlx-lm's APIHandler: JSON and its CORS headers
            handler._set_completion_headers(status)
        else:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        if close:
            handler.send_header("Connection", "close")
            handler.close_connection = True
        handler.end_headers()
        handler.wfile.write(data)
        handler.wfile.flush()
    except OSError:
        handler.close_connection = True


def linger(handler: Any) -> None:
    """After answering a request whose body was not read: stop sending, and read (and drop) what
    the client still sends for a moment, so that closing the connection does not reset it before
    the client has read the answer."""
    sock = getattr(handler, "connection", None)
    if not isinstance(sock, socket.socket):
        return
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline, drained = time.monotonic() + LINGER_SECONDS, 0
        while drained < LINGER_BYTES:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            drained += len(chunk)
    except OSError:
        pass


# --- limits --------------------------------------------------------------------------------


@attrs.frozen
class ModelInfo:
    """What admission needs to know of the served model (None: not known)."""

    context_length: Optional[int] = None  # max_position_embeddings
    vocab_size: Optional[int] = None  # the logits' width: token ids must be below it
    text_only: Optional[bool] = None  # True: the loaded model reads no images


def config_info(config: Any) -> ModelInfo:
    """The context length and vocabulary size a model's config.json gives (a multimodal model's
    text model's where it nests one)."""
    if not isinstance(config, dict):
        return ModelInfo()
    nested = config.get("text_config")
    text = nested if isinstance(nested, dict) else {}

    def first(key: str) -> Optional[int]:
        for source in (config, text):
            value = source.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    return ModelInfo(context_length=first("max_position_embeddings"), vocab_size=first("vocab_size"))


def read_config(model: Optional[str]) -> Optional[dict]:
    """config.json of `model` (a directory, or a Hugging Face repo already in the local cache;
    nothing is downloaded), None where there is none to read."""
    if not model:
        return None
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
        except Exception:  # not a repo id, no hub library
            return None
        if not isinstance(cached, str):
            return None
        path = cached
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class Limits:
    """What admission checks requests against: `max_request_bytes`, `max_prompt_tokens` (the
    flag, else the model's context length, else `DEFAULT_PROMPT_TOKENS`), the served model
    (`served`: the (model, adapter, draft model) the server was started with; None: any, as
    mlx-lm loads what requests name) and `model_info()` of the model being served."""

    def __init__(
        self,
        *,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        max_prompt_tokens: Optional[int] = None,
        served: Optional[tuple] = None,
        model_info: Optional[Callable[[], ModelInfo]] = None,
    ):
        self.max_request_bytes = max_request_bytes
        self.prompt_tokens_flag = max_prompt_tokens
        self.served = served
        self._model_info = model_info or ModelInfo

    @classmethod
    def for_server(cls, options: Any, provider: Any) -> Limits:
        """The limits of a `kvtrie serve` with `options` (ServeOptions) and mlx-lm's ModelProvider."""
        cli = provider.cli_args
        served = (
            (cli.model, getattr(cli, "adapter_path", None), getattr(cli, "draft_model", None)) if cli.model else None
        )
        configs: dict = {}

        def model_info() -> ModelInfo:
            key = getattr(provider, "model_key", None)
            path = key[0] if key else cli.model
            info = configs.get(path)
            if info is None:
                info = config_info(read_config(path))
                if info.context_length is not None or info.vocab_size is not None:
                    configs[path] = info  # (read again until there is one: a repo may be downloading)
            loaded = getattr(provider, "model", None) is not None
            return attrs.evolve(info, text_only=(getattr(provider, "processor", None) is None) if loaded else None)

        return cls(
            max_request_bytes=options.max_request_bytes,
            max_prompt_tokens=options.max_prompt_tokens,
            served=served,
            model_info=model_info,
        )

    def model_info(self) -> ModelInfo:
        return self._model_info()

    @property
    def max_prompt_tokens(self) -> int:
        if self.prompt_tokens_flag is not None:
            return self.prompt_tokens_flag
        return self.model_info().context_length or DEFAULT_PROMPT_TOKENS

    @property
    def max_output_tokens(self) -> int:
        """The most tokens a request may ask to generate: the model's context (or the prompt limit, if larger)."""
        return max(self.model_info().context_length or DEFAULT_PROMPT_TOKENS, self.max_prompt_tokens)

    def check_prompt(self, n: int, *, param: Optional[str] = None) -> None:
        """A rendered prompt of `n` tokens: refused when empty or past `max_prompt_tokens`."""
        if n <= 0:
            raise bad("the prompt renders to no tokens", param)
        limit = self.max_prompt_tokens
        if n > limit:
            raise bad(
                f"the prompt is {n} tokens, more than this server takes ({limit} tokens, --max-prompt-tokens)",
                param,
                code="context_length_exceeded",
            )

    def check_token_ids(self, ids: list, param: str) -> None:
        """Token ids (already checked to be non-negative ints) must be within the vocabulary."""
        vocab = self.model_info().vocab_size
        top = max(ids, default=0)
        if top >= (vocab or INT32_MAX):
            raise bad(f"{param}: token id {top} is not in the model's vocabulary ({vocab} tokens)", param)


# --- reading the body ----------------------------------------------------------------------


def read_body(handler: Any, limit: int, *, optional: bool = False) -> bytes:
    """The request body, read once: at most `limit` bytes, by its Content-Length (without one,
    an empty body where `optional`)."""
    headers = handler.headers
    if headers.get("Transfer-Encoding") is not None:
        raise Rejected(
            411, "chunked request bodies are not accepted: send the body with a Content-Length header", unread=True
        )
    values = [v.strip() for v in headers.get_all("Content-Length") or []]
    if not values:
        if optional:
            return b""
        raise Rejected(411, "a Content-Length header with the body's size in bytes is required", unread=True)
    if len(set(values)) > 1:
        raise Rejected(400, f"conflicting Content-Length headers: {', '.join(v[:20] for v in values[:4])}", unread=True)
    if not _DIGITS.fullmatch(values[0]):
        raise Rejected(400, f"invalid Content-Length header: {values[0][:40]!r}", unread=True)
    n = int(values[0])
    if n > limit:
        raise Rejected(
            413,
            f"the request body is {n} bytes, more than this server takes ({limit} bytes, --max-request-bytes)",
            unread=True,
        )
    try:
        raw = handler.rfile.read(n)
    except (OSError, ValueError) as exc:  # (socket.timeout is an OSError)
        raise Disconnected(f"reading the request body failed after {n} bytes were announced: {exc!r}") from None
    if len(raw) < n:
        raise Disconnected(f"the client sent {len(raw)} of the {n} bytes it announced")
    return raw


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is past a float's range")
    return value


def parse_body(raw: bytes, *, optional: bool = False) -> dict:
    """The body as a JSON object (an empty one for an empty body where `optional`)."""
    if optional and not raw.strip():
        return {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad(f"the request body is not valid UTF-8: {exc}") from None
    try:
        body = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise bad(f"invalid JSON in the request body: nested more than {MAX_DEPTH} deep") from None
    except ValueError as exc:  # JSONDecodeError, NaN / Infinity, an integer of more than 4300 digits
        raise bad(f"invalid JSON in the request body: {exc}") from None
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {_type(body)}")
    _check_tree(body)
    return body


def _check_tree(body: Any) -> None:
    """At most MAX_DEPTH levels of nesting, and text that is valid Unicode (JSON's \\ud800 escapes
    give lone surrogates, which no tokenizer or encoder takes)."""
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise bad(f"invalid JSON in the request body: nested more than {MAX_DEPTH} deep")
        if isinstance(value, dict):
            for key, item in value.items():
                if not key.isascii() and _SURROGATE.search(key):
                    raise bad("invalid JSON in the request body: a key holds a lone surrogate (\\ud800-\\udfff)")
                if isinstance(item, (dict, list)):
                    stack.append((item, depth + 1))
                elif isinstance(item, str) and not item.isascii() and _SURROGATE.search(item):
                    raise bad(
                        f"invalid JSON in the request body: {json.dumps(key)[:60]} holds a lone surrogate "
                        "(\\ud800-\\udfff)",
                        key,
                    )
        else:
            for item in value:
                if isinstance(item, (dict, list)):
                    stack.append((item, depth + 1))
                elif isinstance(item, str) and not item.isascii() and _SURROGATE.search(item):
                    raise bad("invalid JSON in the request body: a string holds a lone surrogate (\\ud800-\\udfff)")


# --- admission -----------------------------------------------------------------------------


def admitted_route(path: str, method: str = "POST") -> Optional[str]:
    """The route admission reads bodies for (None: one it leaves to the code after it, which
    answers 404 or 405 without reading a body): POSTs to the APIs and requests to /kvtrie/."""
    p = route(path)
    if p.startswith("/kvtrie/") or (method == "POST" and (p in OPENAI_ROUTES or p in ANTHROPIC_ROUTES)):
        return p
    return None


def admit(handler: Any, limits: Limits) -> bool:
    """Admit `handler`'s request (see the module's docstring): True when it may go on (its body
    in `handler.kvtrie_body`, replayed by `handler.rfile`), False when it was answered with an
    error or its connection closed."""
    p = admitted_route(handler.path, getattr(handler, "command", "POST"))
    if p is None:
        return True
    optional = p.startswith("/kvtrie/")  # (DELETE /kvtrie/cache has no body)
    try:
        raw = read_body(handler, limits.max_request_bytes, optional=optional)
        body = parse_body(raw, optional=optional)
        if p in OPENAI_ROUTES:
            check_openai(body, OPENAI_ROUTES[p], limits)
    except Rejected as exc:
        send_error(handler, exc.status, exc.message, param=exc.param, code=exc.code, close=exc.unread)
        if exc.unread:
            linger(handler)
        return False
    except Disconnected as exc:
        logger.info("%s %s from %s: %s; connection closed", handler.command, p, handler.client_address[0], exc)
        handler.close_connection = True
        return False
    handler.rfile = io.BytesIO(raw)
    handler.kvtrie_body = body
    handler.kvtrie_limits = limits
    return True


# --- what mlx_lm.server reads --------------------------------------------------------------


def _type(value: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        type(None): "null",
        int: "an integer",
        float: "a number",
    }.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(body: dict, key: str, lo: int, hi: int, *, nullable: bool = False, note: str = "") -> None:
    if key not in body or (nullable and body[key] is None):
        return
    value = body[key]
    if not (_is_int(value) and lo <= value <= hi):
        raise bad(f"{key}: expected an integer from {lo} to {hi}{note}, got {_show(value)}", key)


def _number(body: dict, key: str, lo: float, hi: float, *, floats_only: bool = False) -> None:
    if key not in body:
        return
    value = body[key]
    kind = isinstance(value, float) if floats_only else _is_number(value)
    if not (kind and lo <= value <= hi):
        what = "a number with a decimal point (mlx-lm takes no integer here)" if floats_only else "a number"
        raise bad(f"{key}: expected {what} from {lo:g} to {hi:g}, got {_show(value)}", key)


def _bool(body: dict, key: str) -> None:
    if key in body and not isinstance(body[key], bool):
        raise bad(f"{key}: expected true or false, got {_show(body[key])}", key)


def _object(value: Any, where: str, *, nullable: bool = True) -> None:
    if not (isinstance(value, dict) or (nullable and value is None)):
        raise bad(f"{where}: expected an object{' or null' if nullable else ''}, got {_type(value)}", where)


def check_openai(body: dict, kind: str, limits: Limits) -> None:
    """The fields mlx_lm.server's `do_POST` reads, checked as it does (`validate_model_parameters`:
    the same types and bounds, so its own 400s in another shape are never reached) and further
    where it does not check what crashes it later: `top_k` past the vocabulary, `xtc_threshold`
    past 0.5 (their samplers raise on the generation thread, which dies), `logit_bias` ids outside
    the vocabulary (the scatter reads out of bounds: the process dies), `stop` words that are not
    strings and context sizes past int32 (the generation thread dies), a `seed` that is not a
    uint64, values mlx-lm converts without catching the error (`logit_bias` values that are not
    numbers), `stream_options` without `include_usage` (a KeyError once the stream is written), a
    `model`, `draft_model` or `adapters` other than what the server was started with (mlx-lm
    would drop the loaded model to load it, from any path or from the Hub),
    `chat_template_kwargs` that name apply_chat_template's own parameters (`return_tensors`
    hands the generation thread an array for token ids: it dies; `chat_template` runs the
    client's own template there), and the message list and the prompt as the chat template and
    the tokenizer take them. `kind`: "chat" or "text"."""
    # the model
    for key in ("model", "draft_model", "adapters"):
        value = body.get(key)
        if key in body and not (isinstance(value, str) or (key != "model" and value is None)):
            raise bad(f"{key}: expected a string, got {_show(value)}", key)
    if limits.served is not None:
        _check_served(body, limits.served)
    # generation parameters
    info = limits.model_info()
    vocab = info.vocab_size
    _bool(body, "stream")
    _check_stream_options(body)
    max_out = limits.max_output_tokens
    _int(body, "max_completion_tokens", 1, max_out, nullable=True, note=" (the model's context)")
    if body.get("max_completion_tokens") is None:  # (mlx-lm reads max_tokens only then)
        _int(body, "max_tokens", 1, max_out, note=" (the model's context)")
    _number(body, "temperature", 0.0, ABSURD)
    _number(body, "top_p", 0.0, 1.0)
    _number(body, "min_p", 0.0, 1.0)
    _int(body, "top_k", 0, (vocab - 1) if vocab else INT32_MAX, note=" (below the vocabulary size)" if vocab else "")
    _number(body, "xtc_probability", 0.0, 1.0, floats_only=True)
    _number(body, "xtc_threshold", 0.0, 0.5, floats_only=True)
    _int(body, "num_draft_tokens", 0, MAX_DRAFT_TOKENS)
    _number(body, "repetition_penalty", 0.0, ABSURD)
    _number(body, "presence_penalty", -ABSURD, ABSURD)
    _number(body, "frequency_penalty", -ABSURD, ABSURD)
    for key in ("repetition_context_size", "presence_context_size", "frequency_context_size"):
        _int(body, key, 0, INT32_MAX)
    _bool(body, "logprobs")
    if "top_logprobs" in body and not (_is_int(body["top_logprobs"]) and body["top_logprobs"] == -1):
        _int(body, "top_logprobs", 0, min(MAX_TOP_LOGPROBS, vocab or MAX_TOP_LOGPROBS), note=" (or -1)")
    _int(body, "seed", 0, UINT64_MAX, nullable=True)
    _int(body, "n", 1, 1, nullable=True, note=" (one choice per request)")
    _check_logit_bias(body.get("logit_bias"), vocab)
    _check_stop(body.get("stop"))
    check_template_kwargs(body.get("chat_template_kwargs"), "chat_template_kwargs")
    if kind == "text":
        prompt = body.get("prompt")
        if "prompt" not in body:
            raise bad("prompt: field required (the text to complete)", "prompt")
        if not isinstance(prompt, str):
            raise bad(f"prompt: expected a string (mlx-lm takes no token ids), got {_type(prompt)}", "prompt")
        return
    # a chat
    if "messages" not in body:
        raise bad("messages: field required (a list of chat messages)", "messages")
    _check_messages(body["messages"], info)
    _check_tools(body.get("tools"))
    role_mapping = body.get("role_mapping")
    _object(role_mapping, "role_mapping")
    for name, value in (role_mapping or {}).items():
        if not isinstance(value, str):
            raise bad(f"role_mapping.{name}: expected a string, got {_type(value)}", "role_mapping")


def _check_served(body: dict, served: tuple) -> None:
    """The (model, adapter, draft) mlx-lm's ModelProvider would load for the request must be the
    one the server was started with (its `load` maps "default_model" to the command line's)."""
    cli_model, cli_adapter, cli_draft = served
    model = body.get("model", "default_model")
    draft = body.get("draft_model", "default_model")
    default = model == "default_model"
    key = (
        cli_model if default else model,
        cli_adapter if default else body.get("adapters"),
        cli_draft if draft == "default_model" else draft,
    )
    if key != served:
        param = "model" if key[0] != cli_model else "adapters" if key[1] != cli_adapter else "draft_model"
        raise Rejected(
            404,
            f"{param} {_show(body.get(param))} is not served here: this server serves one model "
            f'(send "model": "default_model", or {_show(cli_model)}, and no adapters or draft '
            "model of your own)",
            param=param,
            code="model_not_found",
        )


def _check_stream_options(body: dict) -> None:
    options = body.get("stream_options")
    _object(options, "stream_options")
    if isinstance(options, dict):
        usage = options.get("include_usage")
        if not isinstance(usage, bool) and (usage is not None or body.get("stream") is True):
            raise bad(
                f"stream_options.include_usage: expected true or false, got {_show(usage)}",
                "stream_options.include_usage",
            )


def _check_logit_bias(bias: Any, vocab: Optional[int]) -> None:
    _object(bias, "logit_bias")
    for key, value in (bias or {}).items():
        if not _INT_KEY.fullmatch(key) or not 0 <= int(key) < (vocab or INT32_MAX):
            raise bad(
                f"logit_bias: the keys are token ids from 0 to {(vocab or INT32_MAX) - 1}, got {_show(key)}",
                "logit_bias",
            )
        if not (_is_number(value) and -ABSURD <= value <= ABSURD):
            raise bad(
                f"logit_bias.{key}: expected a number from {-ABSURD:g} to {ABSURD:g}, got {_show(value)}", "logit_bias"
            )


def _check_stop(stop: Any) -> None:
    if stop is None or isinstance(stop, str):
        return
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad(f"stop: expected a string or a list of strings, got {_show(stop)}", "stop")
    if len(stop) > MAX_STOP_WORDS:
        raise bad(f"stop: at most {MAX_STOP_WORDS} stop sequences, got {len(stop)}", "stop")


def check_template_kwargs(value: Any, where: str) -> None:
    """Extra variables for the chat template: an object that names none of apply_chat_template's own parameters."""
    _object(value, where)
    clash = sorted(TEMPLATE_PARAMETERS.intersection(value or {}))
    if clash:
        raise bad(
            f"{where}: {', '.join(clash)} cannot be set here (the server sets apply_chat_template's own parameters)",
            where,
        )


def _check_messages(messages: Any, info: ModelInfo) -> None:
    if not isinstance(messages, list) or not messages:
        raise bad(f"messages: expected a non-empty list of messages, got {_show(messages)}", "messages")
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{at}: expected a message object, got {_type(m)}", at)
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{at}.role: expected one of {', '.join(ROLES)}, got {_show(role)}", f"{at}.role")
        content = m.get("content")
        if content is None:
            if role not in NULL_CONTENT_ROLES:
                raise bad(
                    f"{at}.content: required for a {role} message (a string or a list of content parts)",
                    f"{at}.content",
                )
        elif isinstance(content, list):
            for j, part in enumerate(content):
                _check_part(part, f"{at}.content[{j}]", info)
        elif not isinstance(content, str):
            raise bad(
                f"{at}.content: expected a string or a list of content parts, got {_type(content)}", f"{at}.content"
            )
        for key in ("name", "tool_call_id"):
            if m.get(key) is not None and not isinstance(m[key], str):
                raise bad(f"{at}.{key}: expected a string, got {_type(m[key])}", f"{at}.{key}")
        calls = m.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise bad(f"{at}.tool_calls: expected a list of tool calls, got {_type(calls)}", f"{at}.tool_calls")
            for k, call in enumerate(calls):
                _check_tool_call(call, f"{at}.tool_calls[{k}]")


def _check_part(part: Any, at: str, info: ModelInfo) -> None:
    if not isinstance(part, dict):
        raise bad(f"{at}: expected a content part object, got {_type(part)}", at)
    kind = part.get("type")
    if kind == TEXT_PART:
        if not isinstance(part.get("text"), str):
            raise bad(f"{at}.text: expected a string, got {_type(part.get('text'))}", f"{at}.text")
        return
    if kind not in IMAGE_PARTS:
        raise bad(
            f'{at}.type: expected "text" or an image part ({", ".join(IMAGE_PARTS)}), got {_show(kind)}', f"{at}.type"
        )
    if info.text_only:
        raise bad(f"{at}: this server's model reads text only, not images", at)
    url = part.get("image_url", part.get("image"))
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str) or not url.startswith(("data:", "http://", "https://")):
        raise bad(f'{at}: an image part needs a data: or http(s) URL, as "image_url": {{"url": ...}}', at)


def _check_tool_call(call: Any, at: str) -> None:
    if not isinstance(call, dict):
        raise bad(f"{at}: expected a tool call object, got {_type(call)}", at)
    function = call.get("function")
    if not isinstance(function, dict):
        raise bad(
            f"{at}.function: expected an object with the name and arguments, got {_type(function)}", f"{at}.function"
        )
    if not isinstance(function.get("name"), str):
        raise bad(f"{at}.function.name: expected a string, got {_type(function.get('name'))}", f"{at}.function.name")
    args = function.get("arguments")
    if isinstance(args, str) and args:
        try:
            args = json.loads(args)
        except ValueError:
            raise bad(f"{at}.function.arguments: not valid JSON: {_show(args)}", f"{at}.function.arguments") from None
    if args is not None and args != "" and not isinstance(args, dict):
        raise bad(
            f"{at}.function.arguments: expected a JSON object (or its text), got {_type(args)}",
            f"{at}.function.arguments",
        )
    if call.get("id") is not None and not isinstance(call["id"], str):
        raise bad(f"{at}.id: expected a string, got {_type(call['id'])}", f"{at}.id")


def _check_tools(tools: Any) -> None:
    if tools is None:
        return
    if not isinstance(tools, list):
        raise bad(f"tools: expected a list of tools, got {_type(tools)}", "tools")
    for k, tool in enumerate(tools):
        at = f"tools[{k}]"
        if not isinstance(tool, dict):
            raise bad(f"{at}: expected a tool object, got {_type(tool)}", at)
        if tool.get("type", "function") != "function":
            raise bad(f'{at}.type: expected "function", got {_show(tool.get("type"))}', f"{at}.type")
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise bad(f'{at}.function: expected an object with a non-empty "name"', f"{at}.function")
        if function.get("description") is not None and not isinstance(function["description"], str):
            raise bad(f"{at}.function.description: expected a string", f"{at}.function.description")
        if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
            raise bad(f"{at}.function.parameters: expected a JSON schema object", f"{at}.function.parameters")


# --- the prompt's length, on the generation thread -------------------------------------------


def with_prompt_limit(base: type, limits: Limits) -> type:
    """mlx-lm's ResponseGenerator whose `_tokenize` refuses (`Rejected`, which mlx-lm puts on the
    request's queue) a prompt past `limits.max_prompt_tokens`, an empty one, and one the chat
    template or the tokenizer cannot render; its `generate` raises that as a `Refusal` in the
    handler thread, for the handler to answer with a 400."""

    class PromptLimitGenerator(base):
        kvtrie_limits = limits

        def _tokenize(self, tokenizer, request, args):
            chat = getattr(request, "request_type", None) == "chat"
            param = "messages" if chat else "prompt"
            try:
                out = super()._tokenize(tokenizer, request, args)
            except Exception as exc:  # the template's or the tokenizer's complaint (a role order, a field)
                what = (
                    "the model's chat template cannot render these messages"
                    if chat
                    else "the prompt cannot be tokenized"
                )
                raise bad(f"{what}: {exc}", param) from None
            limits.check_prompt(len(out[0]), param=param)
            return out

        def generate(self, request, generation_args, progress_callback=None):
            try:
                return super().generate(request, generation_args, progress_callback)
            except Rejected as exc:
                raise Refusal(exc) from None

    return PromptLimitGenerator
