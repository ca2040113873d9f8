"""Who is asking: API keys mapped to tenants, and the cache namespace a request selects.

A prompt cache shared by several people is a side channel (a restored prefix answers faster,
which tells that someone sent it), so each tenant's cache is its own namespace on every tier:
the namespace is the tenant's name, and a request's `cache_salt` (vLLM's field) separates it
further as `TENANT/salt:HASH`. Without API keys every request is the tenant "default", as
before. A namespace's tenant is what precedes its first "/" (`tenant_of`): byte shares and
per-tenant figures group namespaces by it. Pure Python: never imports mlx.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from typing import Any, Optional

import attrs

DEFAULT_TENANT = "default"  # every request without --api-keys (and kvtrie's own default namespace)
ADMIN = "admin"  # the optional third field of a keys file line: sees every tenant's figures, clears every cache
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
MAX_SALT_CHARS = 1024
MIN_KEY_CHARS = 16


class KeysFileError(ValueError):
    """A keys file that cannot be used: unreadable, a malformed line, a short or repeated key."""


@attrs.frozen
class Tenant:
    """An authenticated caller: its tenant name, and whether its key is an admin key."""

    name: str
    admin: bool = False


@attrs.frozen
class Tenants:
    """The API keys a server accepts (kept as SHA-256 digests) and the tenant each one names."""

    by_digest: Mapping[bytes, Tenant] = attrs.field(repr=False)

    @classmethod
    def load(cls, path: str) -> Tenants:
        """Read a keys file: one `KEY TENANT [admin]` per line; blank lines and `#` comments are skipped."""
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise KeysFileError(f"cannot read the API keys file {path}: {exc}") from None
        return cls.parse(text, source=path)

    @classmethod
    def parse(cls, text: str, source: str = "<keys>") -> Tenants:
        """Keys from the text of a keys file (see `load`)."""
        by_digest: dict[bytes, Tenant] = {}
        for number, line in enumerate(text.splitlines(), 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            where = f"{source}, line {number}"
            if len(fields) not in (2, 3) or (len(fields) == 3 and fields[2] != ADMIN):
                raise KeysFileError(f"{where}: expected `KEY TENANT` or `KEY TENANT admin`, got {len(fields)} fields")
            key, name = fields[0], fields[1]
            if len(key) < MIN_KEY_CHARS:
                raise KeysFileError(
                    f"{where}: a key must have at least {MIN_KEY_CHARS} characters "
                    f"(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
                )
            if not TENANT_NAME.fullmatch(name) or name == DEFAULT_TENANT:
                raise KeysFileError(
                    f"{where}: a tenant name is 1-64 of A-Z a-z 0-9 _ . @ - (starting with a letter or "
                    f"digit) and not {DEFAULT_TENANT!r}, got {name!r}"
                )
            digest = _digest(key)
            if digest in by_digest:
                raise KeysFileError(f"{where}: this key is already given to tenant {by_digest[digest].name!r}")
            by_digest[digest] = Tenant(name, admin=len(fields) == 3)
        if not by_digest:
            raise KeysFileError(f"{source}: no keys (one `KEY TENANT` per line)")
        return cls(by_digest)

    def authenticate(self, headers: Any) -> Optional[Tenant]:
        """The tenant whose key the request presents (`Authorization: Bearer KEY` or `x-api-key: KEY`), or None."""
        key = presented_key(headers)
        if key is None:
            return None
        digest = _digest(key)
        found = None
        for known, tenant in self.by_digest.items():  # every digest compared, in constant time each
            if hmac.compare_digest(known, digest):
                found = tenant
        return found

    @property
    def names(self) -> frozenset[str]:
        return frozenset(t.name for t in self.by_digest.values())


def presented_key(headers: Any) -> Optional[str]:
    """The API key in `headers` (OpenAI clients send `Authorization: Bearer`, Anthropic's `x-api-key`)."""
    auth = headers.get("Authorization") or ""
    scheme, _, value = auth.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    key = (headers.get("x-api-key") or "").strip()
    return key or None


def check_salt(value: Any) -> Optional[str]:
    """A request's `cache_salt`: None, or a non-empty string of at most 1024 characters."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f'"cache_salt" must be a string, got {type(value).__name__}')
    if not 0 < len(value) <= MAX_SALT_CHARS:
        raise ValueError(f'"cache_salt" must be 1 to {MAX_SALT_CHARS} characters, got {len(value)}')
    return value


def namespace_for(tenant: Optional[str], salt: Optional[str] = None) -> str:
    """The cache namespace of a request: its tenant's name ("default" without one), and with a
    `cache_salt` a namespace of its own within the tenant (the salt enters only as a hash)."""
    name = tenant or DEFAULT_TENANT
    if salt is None:
        return name
    return f"{name}/salt:{hashlib.sha256(salt.encode()).hexdigest()[:32]}"


def tenant_of(namespace: str) -> str:
    """The tenant a namespace belongs to: what precedes its first "/"."""
    return namespace.split("/", 1)[0]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def share_function(tenant_bytes: Any) -> Optional[Any]:
    """`PrefixCache(tenant_bytes=)` as a function tenant -> its share of memory in bytes (None: no share).

    An int is every tenant's share; a mapping gives shares by tenant name, "*" for the others
    (a tenant neither names has no share). None: no shares at all."""
    if tenant_bytes is None:
        return None

    def checked(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"tenant_bytes{name} must be an int number of bytes, got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"tenant_bytes{name} must be >= 0, got {value}")
        return value

    if isinstance(tenant_bytes, Mapping):
        shares = {}
        for tenant, value in tenant_bytes.items():
            if not isinstance(tenant, str):
                raise TypeError(f"tenant_bytes keys must be tenant names (str), got {type(tenant).__name__}")
            shares[tenant] = checked(f"[{tenant!r}]", value)
        default = shares.get("*")
        return lambda tenant: shares.get(tenant, default)
    share = checked("", tenant_bytes)
    return lambda tenant: share
