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

import logging
import threading
from collections.abc import Callable
from typing import Any, Optional

from .guard import linger, send_error
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
    def of(cls, caches: Any, namespace: str) -> Tagged:
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

    def admit(self, handler: Any, read_body: Optional[Callable[[], bool]] = None) -> Optional[Tenant]:
        """The caller of `handler`'s request, its namespace kept for this thread and on the handler
        (`kvtrie_namespace`, `kvtrie_caller`); None once the request was answered: 401 without a
        known key (checked first, before any body is read), or whatever `read_body()` answered
        (False: it refused the body), or 400 for a bad `cache_salt` in the body it left in
        `handler.kvtrie_body`."""
        _scope.namespace = DEFAULT_TENANT
        handler.kvtrie_namespace, handler.kvtrie_caller, handler.kvtrie_body = DEFAULT_TENANT, None, None
        path = handler.path.split("?", 1)[0]
        caller: Optional[Tenant]
        if self.tenants is None:
            caller = Tenant(DEFAULT_TENANT, admin=True)
        elif path in OPEN_PATHS:
            return Tenant(DEFAULT_TENANT)
        else:
            caller = self.tenants.authenticate(handler.headers)
            if caller is None:
                self.refused += 1
                unread = (handler.headers.get("Content-Length") or "0").strip() not in ("", "0")
                send_error(
                    handler,
                    401,
                    "a valid API key is required: send `Authorization: Bearer KEY` or `x-api-key: KEY`",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": 'Bearer realm="kvtrie"'},
                    close=unread,
                )
                if unread:  # (its body is never read: the connection closes once the client has the answer)
                    linger(handler)
                return None
        if read_body is not None and not read_body():
            return None
        body = handler.kvtrie_body
        try:
            salt = check_salt(body.get("cache_salt")) if isinstance(body, dict) else None
        except (TypeError, ValueError) as exc:
            send_error(handler, 400, str(exc), param="cache_salt")
            return None
        namespace = namespace_for(caller.name if self.enabled else None, salt)
        _scope.namespace = handler.kvtrie_namespace = namespace
        handler.kvtrie_caller = caller
        return caller


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
