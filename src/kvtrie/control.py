"""Cache control over HTTP for `kvtrie serve`: prefill, pin, unpin and clear as JSON endpoints.

- `POST /kvtrie/prefill`: compute and store a prefix's state with the loaded model, without
  generating (`{"tokens_stored", "cached_before", "pinned"}`; `"pin": true` pins it).
- `POST /kvtrie/pin`, `DELETE /kvtrie/pin`: pin / unpin what is stored of a prefix.
- `DELETE /kvtrie/cache`: drop everything (no body), a namespace, or one prefix.

A prefix is `{"messages": [...]}` (rendered with the model's chat template exactly as
`/v1/chat/completions` renders a prompt: the same tools, `chat_template_kwargs` and server
`--chat-template-args`; `"add_generation_prompt"`, default true as there), `{"prompt": "..."}`
(encoded as `/v1/completions` does) or `{"tokens": [ids]}`; `"namespace"` picks the trie
namespace (chat requests use the default one). Errors are `{"error": {"message", "type"}}`:
400 for bad input (a prefill past `--max-prompt-tokens` or with token ids outside the
vocabulary included), 404 for an unknown path, 405 for a wrong method, 409 for a pin the
budgets refuse, 503 when the generation thread is down. Bodies are read by `kvtrie.guard`.

Every operation runs on mlx-lm's generation thread, between its batch steps (a job in its
request queue; `with_jobs` makes the generator run them): the model and tokenizer are used by
one thread only, as mlx-lm itself does, so a prefill never races the batch generator.
Not for distributed (multi-rank) serving.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Literal, Optional, overload

import attrs

from . import guard
from .errors import PinError
from .integrations.mlx_lm import prefill
from .tenants import namespace_for
from .trie import as_token_array

logger = logging.getLogger("kvtrie.serve")

ROUTES = {
    ("POST", "/kvtrie/prefill"): "prefill",
    ("POST", "/kvtrie/pin"): "pin",
    ("DELETE", "/kvtrie/pin"): "unpin",
    ("DELETE", "/kvtrie/cache"): "clear",
}
KNOWN_PATHS = {path for _, path in ROUTES} | {"/kvtrie/stats"}


class ControlError(Exception):
    """A request the control endpoints answer with an error: HTTP `status`, error `kind`, message."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def bad_request(message: str) -> ControlError:
    return ControlError(400, "invalid_request_error", message)


@attrs.frozen
class Target:
    """A prefix as a request names it: messages, prompt text or token ids (exactly one), and options."""

    messages: Optional[list] = None
    prompt: Optional[str] = None
    tokens: Optional[list] = None
    namespace: Optional[str] = None
    add_generation_prompt: bool = True
    tools: Optional[list] = None
    chat_template_kwargs: Optional[dict] = None
    role_mapping: Optional[dict] = None


@attrs.frozen
class PrefillRequest:
    target: Target
    pin: bool = False
    ttl: Optional[float] = None


def _check(body: dict, name: str, kinds: tuple, what: str) -> Any:
    value = body.get(name)
    if value is not None and ((isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds)):
        raise bad_request(f'"{name}" must be {what}, got {json.dumps(value)[:80]}')
    return value


@overload
def parse_target(body: dict, *, required: Literal[True] = True) -> Target: ...


@overload
def parse_target(body: dict, *, required: bool) -> Optional[Target]: ...


def parse_target(body: dict, *, required: bool = True) -> Optional[Target]:
    """The prefix a body names (None if it names none and `required` is False)."""
    given = [k for k in ("messages", "prompt", "tokens") if body.get(k) is not None]
    namespace = _check(body, "namespace", (str,), "a string")
    if not given:
        if required:
            raise bad_request('name the prefix: "messages": [...], "prompt": "text" or "tokens": [ids]')
        return None
    if len(given) > 1:
        raise bad_request(f"give one of messages, prompt and tokens, not {' and '.join(given)}")
    messages = _check(body, "messages", (list,), "a list of chat messages")
    if messages is not None and (not messages or not all(isinstance(m, dict) and "role" in m for m in messages)):
        raise bad_request('"messages" must be a non-empty list of {"role": ..., "content": ...} objects')
    prompt = _check(body, "prompt", (str,), "a string")
    tokens = _check(body, "tokens", (list,), "a list of token ids")
    if tokens is not None:
        try:
            as_token_array(tokens)
        except (TypeError, ValueError) as exc:
            raise bad_request(f'"tokens": {exc}') from None
    generation = _check(body, "add_generation_prompt", (bool,), "true or false")
    kwargs = _check(body, "chat_template_kwargs", (dict,), "an object")
    try:
        guard.check_template_kwargs(kwargs, "chat_template_kwargs")
    except guard.Rejected as exc:
        raise bad_request(exc.message) from None
    return Target(
        messages=messages,
        prompt=prompt,
        tokens=tokens,
        namespace=namespace,
        add_generation_prompt=True if generation is None else generation,
        tools=_check(body, "tools", (list,), "a list of tools") or None,
        chat_template_kwargs=kwargs,
        role_mapping=_check(body, "role_mapping", (dict,), "an object"),
    )


def parse_ttl(body: dict) -> Optional[float]:
    ttl = _check(body, "ttl", (int, float), "a positive number of seconds")
    if ttl is not None and not (ttl > 0 and math.isfinite(ttl)):
        raise bad_request(f'"ttl" must be a positive number of seconds, got {ttl}')
    return None if ttl is None else float(ttl)


def parse_prefill(body: dict) -> PrefillRequest:
    pin = _check(body, "pin", (bool,), "true or false")
    return PrefillRequest(parse_target(body), bool(pin), parse_ttl(body))


def render(target: Target, tokenizer: Any, cli_args: Any) -> list[int]:
    """The token ids of `target`: as `/v1/chat/completions` renders messages (mlx-lm's path),
    as `/v1/completions` encodes a prompt, or the ids given."""
    if target.tokens is not None:
        return [int(t) for t in target.tokens]
    if target.prompt is not None:
        tokens = list(tokenizer.encode(target.prompt))
    else:
        from mlx_lm.server import convert_chat, process_message_content

        if target.messages is None:
            raise ValueError("a Target names its prefix: messages, prompt or tokens")
        messages = copy.deepcopy(target.messages)
        try:
            if tokenizer.has_chat_template:
                process_message_content(messages)  # (text parts joined; images are refused)
                args = dict(getattr(cli_args, "chat_template_args", None) or {})
                args.update(target.chat_template_kwargs or {})
                tokens = list(
                    tokenizer.apply_chat_template(
                        messages,
                        add_generation_prompt=target.add_generation_prompt,
                        tools=target.tools,
                        tokenize=True,
                        **args,
                    )
                )
            else:
                tokens = list(tokenizer.encode(convert_chat(messages, target.role_mapping)))
        except Exception as exc:  # a template's own complaint (a missing field, an unknown role)
            raise bad_request(f"the messages do not render with the model's chat template: {exc}") from None
    if not tokens:
        raise bad_request("the prefix renders to no tokens")
    return tokens


# --- running on the generation thread ------------------------------------------------------


@attrs.define(eq=False)
class Job:
    """One control operation for the generation thread: `run(provider)` gives the result."""

    run: Callable[[Any], dict]
    future: Future = attrs.field(factory=Future)


def with_jobs(base: type) -> type:
    """mlx-lm's ResponseGenerator that also runs control jobs found in its request queue, on its
    generation thread, between batch steps."""

    class JobRunningGenerator(base):
        kvtrie_jobs = True

        def _next_request(self, timeout=None):
            request = super()._next_request(timeout)
            if request is not None and isinstance(request[1], Job):
                job = request[1]
                if job.future.set_running_or_notify_cancel():
                    try:
                        job.future.set_result(job.run(self.model_provider))
                    except BaseException as exc:  # (the handler thread re-raises it)
                        job.future.set_exception(exc)
                return None  # (no request: the loop goes on serving its batch)
            return request

    return JobRunningGenerator


def submit(generator: Any, run: Callable[[Any], dict]) -> dict:
    """Run `run(provider)` on the generation thread and wait for its result."""
    if not getattr(generator, "kvtrie_jobs", False):
        raise ControlError(503, "server_error", "this server's generator does not run kvtrie's control jobs")
    job = Job(run)
    generator.requests.put((None, job, None))
    while True:
        try:
            return job.future.result(timeout=1.0)
        except FutureTimeout:
            if not generator.is_healthy:
                job.future.cancel()
                raise ControlError(503, "server_error", "the generation thread is not running") from None


def loaded_model(provider: Any) -> tuple[Any, Any]:
    """The loaded model and tokenizer (the default model, loaded if nothing is yet)."""
    if provider.model is None:
        try:
            provider.load("default_model")
        except Exception as exc:
            raise bad_request(f"no model is loaded and the default one cannot be ({exc}); start with --model") from None
    return provider.model, provider.tokenizer


# --- the operations ---------------------------------------------------------------------------


class Controller:
    """The control endpoints of one server: `cache` is its ServerPromptCache (`prefix_cache(key)`,
    `prefix_caches()`, `trim_sequences(pc)`); `limits` (kvtrie.guard's) bound what a prefill computes."""

    def __init__(self, cache: Any, limits: Optional[guard.Limits] = None):
        self.cache = cache
        self.limits = limits

    def route(self, handler: Any, method: str) -> bool:
        """Answer `handler`'s request if it is a control endpoint (True), else leave it (False).
        Unknown paths under /kvtrie/ and any DELETE elsewhere are answered 404."""
        path = handler.path.split("?", 1)[0]
        op = ROUTES.get((method, path))
        if op is None and not path.startswith("/kvtrie/") and method != "DELETE":
            return False
        try:
            if op is None:
                if path in KNOWN_PATHS:
                    raise ControlError(405, "invalid_request_error", f"{method} is not allowed on {path}")
                raise ControlError(404, "not_found_error", f"no endpoint {method} {path}")
            body = scoped(handler, read_body(handler))
            result = getattr(self, op)(handler.response_generator, body)
            reply(handler, 200, result)
        except ControlError as exc:
            reply(handler, exc.status, {"error": {"message": exc.message, "type": exc.kind}})
        except (TypeError, ValueError) as exc:  # the cache's own checks
            reply(handler, 400, {"error": {"message": str(exc), "type": "invalid_request_error"}})
        except Exception as exc:  # never a dropped connection
            logger.exception("%s %s failed", method, path)
            reply(handler, 500, {"error": {"message": f"{type(exc).__name__}: {exc}", "type": "server_error"}})
        return True

    def prefill(self, generator: Any, body: dict) -> dict:
        request = parse_prefill(body)
        target = request.target
        if target.tokens is not None:
            self._check_prompt(target.tokens, "tokens")

        def run(provider: Any) -> dict:
            model, tokenizer = loaded_model(provider)
            tokens = render(target, tokenizer, provider.cli_args)
            self._check_prompt(tokens, "messages" if target.messages is not None else "prompt")
            pc = self.cache.prefix_cache(provider.model_key)
            added = prefill(
                tokens,
                model,
                pc,
                namespace=target.namespace,
                prefill_step_size=provider.cli_args.prefill_step_size,
                pin=request.pin,
                ttl=request.ttl,
            )
            self.cache.trim_sequences(pc)
            out: dict[str, Any] = {
                "tokens_stored": len(tokens),
                "cached_before": len(tokens) - added.added,
                "pinned": added.pinned > 0,
            }
            if added.pin_error is not None:
                out["pin_error"] = added.pin_error
            logger.info(
                "prefill: %d tokens, %d cached before%s",
                len(tokens),
                out["cached_before"],
                ", pinned" if out["pinned"] else "",
            )
            return out

        return submit(generator, run)

    def _check_prompt(self, tokens: list, param: str) -> None:
        """A prefix to compute: within --max-prompt-tokens, its ids within the vocabulary (an id past it
        would be read out of bounds)."""
        if self.limits is None:
            return
        try:
            self.limits.check_prompt(len(tokens), param=param)
            if param == "tokens":
                self.limits.check_token_ids(tokens, param)
        except guard.Rejected as exc:
            raise bad_request(exc.message) from None

    def pin(self, generator: Any, body: dict) -> dict:
        target, ttl = parse_target(body), parse_ttl(body)

        def run(provider: Any) -> dict:
            _, tokenizer = loaded_model(provider)
            tokens = render(target, tokenizer, provider.cli_args)
            try:
                n = self.cache.prefix_cache(provider.model_key).pin(tokens, namespace=target.namespace, ttl=ttl)
            except PinError as exc:
                raise ControlError(409, "budget_error", str(exc)) from None
            return {"tokens_pinned": n}

        return submit(generator, run)

    def unpin(self, generator: Any, body: dict) -> dict:
        target = parse_target(body)

        def run(provider: Any) -> dict:
            _, tokenizer = loaded_model(provider)
            tokens = render(target, tokenizer, provider.cli_args)
            pc = self.cache.prefix_cache(provider.model_key)
            return {"tokens_unpinned": pc.unpin(tokens, namespace=target.namespace)}

        return submit(generator, run)

    def clear(self, generator: Any, body: dict) -> dict:
        target = parse_target(body, required=False)
        namespace = _check(body, "namespace", (str,), "a string")

        def run(provider: Any) -> dict:
            if target is None:  # everything, or one namespace, of every model
                return {"tokens_dropped": sum(pc.clear(namespace=namespace) for pc in self.cache.prefix_caches())}
            _, tokenizer = loaded_model(provider)
            tokens = render(target, tokenizer, provider.cli_args)
            pc = self.cache.prefix_cache(provider.model_key)
            return {"tokens_dropped": pc.clear(namespace=namespace, prefix=tokens)}

        return submit(generator, run)


def scoped(handler: Any, body: dict) -> dict:
    """`body` with the namespace its caller may act on: a tenant's own (and its `cache_salt`'s);
    an admin key, or any caller of a server without API keys, names any namespace (none: the
    default one, or for a clear, every namespace)."""
    caller = getattr(handler, "kvtrie_caller", None)
    salt = body.get("cache_salt")
    if caller is None or caller.admin:
        if salt is None:
            return body
        namespace = _check(body, "namespace", (str,), "a string")
        return {**body, "namespace": namespace_for(namespace, salt) if namespace else handler.kvtrie_namespace}
    if body.get("namespace") is not None:
        raise ControlError(
            403,
            "permission_error",
            'a tenant acts on its own namespace only: leave out "namespace" '
            '(a "cache_salt" separates caches within it)',
        )
    return {**body, "namespace": handler.kvtrie_namespace}


def read_body(handler: Any) -> dict:
    """The request's JSON object (an empty one for no body): as kvtrie.guard admitted it, else read here."""
    admitted = getattr(handler, "kvtrie_body", None)
    if admitted is not None:
        return admitted
    length = handler.headers.get("Content-Length")
    try:
        raw = handler.rfile.read(int(length)) if length else b""
    except ValueError:
        raise bad_request("invalid Content-Length header") from None
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"invalid JSON in the request body: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def reply(handler: Any, status: int, payload: dict) -> None:
    data = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    if status == 405:
        handler.send_header("Allow", ", ".join(m for m, p in ROUTES if p == handler.path.split("?", 1)[0]) or "GET")
    handler.end_headers()
    handler.wfile.write(data)
