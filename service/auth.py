"""Bearer-token authentication and the loopback rule for running without auth.

Tokens are opaque random strings; the store keeps only their sha256 and answers
``authenticate(token)`` with the user or None (unknown or revoked). The API keeps a short-lived
:class:`TokenCache` in front of that lookup, so a revoked token stops working within its TTL.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.settings import Settings
    from service.store import Store

LOCAL_ADMIN_NAME = "local-admin"
ADMIN_TOKEN_NAME = "admin"
ADMIN_USER_NAME = "admin"
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
# How long the API trusts a token lookup: a revocation takes effect within this many seconds.
TOKEN_CACHE_TTL_S = 5.0
TOKEN_CACHE_SIZE = 1024


class AuthError(Exception):
    """Raised when a request carries no usable credentials; the API turns it into a 401."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InsecureConfigError(RuntimeError):
    """Raised when the service would listen beyond loopback without authentication."""


def is_loopback(host: str | None) -> bool:
    """True when ``host`` (a name or an IP literal) only reaches this machine."""
    if not host:
        return False
    host = host.strip().strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_auth_allowed(auth: bool, host: str) -> None:
    """Refuse a configuration where a server bound beyond loopback runs without auth."""
    if not auth and not is_loopback(host):
        raise InsecureConfigError(
            f"auth is off but the server would listen on {host!r}, which is not loopback: "
            "set NORMCORE_AUTH=true or bind to 127.0.0.1"
        )


def parse_bearer(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header, or AuthError."""
    if not authorization:
        raise AuthError("missing bearer token: send 'Authorization: Bearer <token>'")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError("malformed Authorization header: expected 'Bearer <token>'")
    return token


class TokenCache:
    """Live tokens' users for ``ttl`` seconds: sha256(token) -> UserRecord, least recently used
    dropped past ``maxsize`` entries.

    Only successful lookups are kept (an unknown or revoked token always asks the store), so a
    revoked token is refused at most ``ttl`` seconds after the revocation, and hostile random
    tokens cannot evict live ones. Keys are digests: the cache holds no plaintext token.
    Thread-safe (the event loop reads it, threads of the pool fill it).
    """

    def __init__(
        self,
        ttl: float = TOKEN_CACHE_TTL_S,
        maxsize: int = TOKEN_CACHE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl < 0 or maxsize < 1:
            raise ValueError("ttl must be >= 0 and maxsize >= 1")
        self.ttl = ttl
        self.maxsize = maxsize
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[float, Any]] = OrderedDict()

    @staticmethod
    def key(token: str) -> str:
        """The cache key of a token: its sha256 hex digest."""
        return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()

    def get(self, token: str) -> Any | None:
        """The cached user of ``token``, or None if absent or older than the TTL."""
        key = self.key(token)
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[0] <= now:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return entry[1]

    def put(self, token: str, user: Any) -> None:
        """Remember ``user`` for ``token`` until the TTL runs out."""
        key = self.key(token)
        expires = self._clock() + self.ttl
        with self._lock:
            self._entries[key] = (expires, user)
            self._entries.move_to_end(key)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


def authenticate(store: Store, authorization: str | None, cache: TokenCache | None = None) -> Any:
    """The UserRecord behind the request's bearer token; AuthError if none or revoked.

    With ``cache``, a token seen live within the cache's TTL is not looked up again.
    """
    token = parse_bearer(authorization)
    if cache is not None:
        user = cache.get(token)
        if user is not None:
            return user
    user = store.authenticate(token)
    if user is None:
        raise AuthError("invalid or revoked token")
    if cache is not None:
        cache.put(token, user)
    return user


def local_admin(store: Store) -> Any:
    """The built-in admin every request acts as when auth is off (created on first use)."""
    return store.create_user(LOCAL_ADMIN_NAME, admin=True)


def new_token_name(prefix: str = "token") -> str:
    """A fresh, unique-enough token name for automatic tokens."""
    return f"{prefix}-{secrets.token_hex(4)}"


def ensure_admin_token(store: Store, settings: Settings) -> tuple[str | None, Any]:
    """Create the first admin token if the store has no users yet.

    Returns ``(token, path)``: the plaintext token when one was created now (also written to
    ``<data_dir>/admin.token`` with mode 0600), else None; ``path`` is where the token file lives.
    Callers print the path, never the token: output that reaches a log must not hold it.
    """
    import os
    from pathlib import Path

    path = Path(settings.data_dir) / "admin.token"
    if store.has_users() and path.exists():
        return None, path
    if store.has_users() and not path.exists():
        # Users exist but the file is gone (deleted by hand): issue a new admin token.
        token = store.create_token(ADMIN_USER_NAME, new_token_name("admin"), admin=True)
    else:
        token = store.create_token(ADMIN_USER_NAME, ADMIN_TOKEN_NAME, admin=True)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Written whole under a temporary name, then renamed: never a half-written token file, and
    # 0600 from its first byte (O_CREAT's mode; chmod for a temporary left by an earlier crash).
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(token + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return token, path
