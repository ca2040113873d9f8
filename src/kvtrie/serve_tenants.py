"""Tenancy on the server: a request's API key and `cache_salt` choose its cache namespace, and
the namespace travels with the request to the generation thread, where mlx-lm's loop fetches
and stores caches without knowing whose they are.

The handler thread decides (`Gate.admit`: 401 without a known key, 400 for a bad salt) and
keeps the namespace for this thread (`current_namespace`); the ResponseGenerator wrapper
(`with_tenants`) writes it on the request's generation arguments when the handler submits
it, and tells the cache which namespace it is serving when the generation thread takes the
request from its queue. Caches the batch generator hands back carry their request's
namespace (`Tagged`), so a store never lands in the namespace of whichever request came last.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any, Optional

from .tenants import DEFAULT_TENANT, Tenant, Tenants, check_salt, namespace_for

logger = logging.getLogger("kvtrie.serve")

_scope = threading.local()  # the handler thread's request: its namespace and caller
OPEN_PATHS = ("/health",)  # answered without a key


def current_namespace() -> str:
    """The namespace of the request this handler thread is serving ("default" outside one)."""
    return getattr(_scope, "namespace", DEFAULT_TENANT)


class Tagged(list):
    """A list of layer caches that knows the namespace of the request it belongs to."""

    kvtrie_namespace: str = DEFAULT_TENANT

    @classmethod
    def of(cls, caches: Any, namespace: str) -> "Tagged":
        out = cls(caches)
        out.kvtrie_namespace = namespace
        return out


def namespace_of_caches(caches: Any) -> Optional[str]:
    """The namespace a `Tagged` list carries (None for an untagged one)."""
    return getattr(caches, "kvtrie_namespace", None)


class Gate:
    """Admission of a request by its API key (with `--api-keys`) and the namespace it selects."""

    def __init__(self, tenants: Optional[Tenants]):
        self.tenants = tenants
        self.refused = 0

    @property
    def enabled(self) -> bool:
        return self.tenants is not None

    def admit(self, handler: Any, body: Any = None) -> Optional[Tenant]:
        """The caller of `handler`'s request, its namespace kept for this thread and on the handler
        (`kvtrie_namespace`, `kvtrie_caller`); None after answering 401 (no known key) or 400 (a bad
        `cache_salt`). `body` is the request's parsed JSON, where it has one."""
        _scope.namespace = DEFAULT_TENANT
        handler.kvtrie_namespace, handler.kvtrie_caller = DEFAULT_TENANT, None
        path = handler.path.split("?", 1)[0]
        if self.tenants is None:
            caller = Tenant(DEFAULT_TENANT, admin=True)
        elif path in OPEN_PATHS:
            return Tenant(DEFAULT_TENANT)
        else:
            caller = self.tenants.authenticate(handler.headers)
            if caller is None:
                self.refused += 1
                send_error(handler, 401, "authentication_error",
                           "a valid API key is required: send `Authorization: Bearer KEY` or `x-api-key: KEY`")
                return None
        try:
            salt = check_salt(body.get("cache_salt")) if isinstance(body, dict) else None
        except (TypeError, ValueError) as exc:
            send_error(handler, 400, "invalid_request_error", str(exc), param="cache_salt")
            return None
        namespace = namespace_for(caller.name if self.enabled else None, salt)
        _scope.namespace = handler.kvtrie_namespace = namespace
        handler.kvtrie_caller = caller
        return caller


def send_error(handler: Any, status: int, kind: str, message: str, *, param: Optional[str] = None) -> None:
    """An error in the endpoint's shape: Anthropic's under /v1/messages, kvtrie's under /kvtrie/,
    OpenAI's elsewhere."""
    path = handler.path.split("?", 1)[0]
    if path.startswith("/v1/messages"):
        from .anthropic import error_body

        payload: dict = error_body(kind, message)
    elif path.startswith("/kvtrie/"):
        payload = {"error": {"message": message, "type": kind}}
    else:
        code = "invalid_api_key" if status == 401 else None
        openai_kind = kind if kind != "authentication_error" else "invalid_request_error"
        payload = {"error": {"message": message, "type": openai_kind, "param": param, "code": code}}
    data = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    if status == 401:
        handler.send_header("WWW-Authenticate", 'Bearer realm="kvtrie"')
    handler.end_headers()
    handler.wfile.write(data)


def with_tenants(base: type, cache: Any) -> type:
    """mlx-lm's ResponseGenerator that carries each request's namespace to the generation thread
    (`cache.serving(namespace)` as the thread takes the request)."""

    class TenantGenerator(base):
        def generate(self, request: Any, generation_args: Any, progress_callback: Any = None):
            generation_args.kvtrie_namespace = current_namespace()
            return super().generate(request, generation_args, progress_callback)

        def _next_request(self, timeout: Optional[float] = None):
            request = super()._next_request(timeout)
            if request is not None and request[2] is not None:  # (control jobs carry no arguments)
                cache.serving(getattr(request[2], "kvtrie_namespace", DEFAULT_TENANT))
            return request

    return TenantGenerator
