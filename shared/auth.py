"""Who is calling: API keys for clients, runner credentials for fetch_task.

Keys are random tokens shown once; only their SHA-256 digest is stored (API_KEYS_FILE
or the API_KEYS setting holds ``digest:owner:roles`` entries), so a leaked config or
database does not leak usable keys. With no keys configured the embedded default runs
open, for one local user, and says so at start-up; APP_ENV=production refuses that.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared.errors import Forbidden, Unauthorized
from shared.settings import Settings

__all__ = ["Principal", "authenticate", "hash_api_key", "keys_need_io", "new_api_key"]

ROLES = frozenset({"client", "admin", "raw_workflows", "runner"})
LOCAL_OWNER = "local"


@dataclasses.dataclass(frozen=True)
class Principal:
    owner: str
    roles: frozenset[str]
    open_mode: bool = False

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles

    @property
    def is_runner(self) -> bool:
        return "runner" in self.roles or self.is_admin

    @property
    def may_send_raw_workflows(self) -> bool:
        return "raw_workflows" in self.roles or self.is_admin

    def can_see(self, owner: str) -> bool:
        return self.is_admin or owner == self.owner

    def require_client(self) -> None:
        """Client routes (create, read, cancel, direct swap) need a client or admin key; a
        runner's credentials claim work, they do not submit it."""
        if not self.roles & {"client", "admin"}:
            raise Forbidden("this route needs a client API key", code="client_required")

    def require_admin(self) -> None:
        if not self.is_admin:
            raise Forbidden("this route needs an admin API key", code="admin_required")

    def require_runner(self) -> None:
        if not self.is_runner:
            raise Forbidden("this route needs runner credentials", code="runner_required")


# The one caller of an open (keyless) deployment; frozen, so every request shares it.
_OPEN_PRINCIPAL = Principal(
    owner=LOCAL_OWNER, roles=frozenset({"client", "admin", "raw_workflows", "runner"}), open_mode=True
)


def new_api_key() -> str:
    return "csk_" + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_key_entries(raw: str) -> dict[str, Principal]:
    """``digest:owner:role+role,digest:owner:role`` -> {digest: Principal}."""
    entries: dict[str, Principal] = {}
    for item in raw.replace("\n", ",").split(","):
        item = item.strip()
        if not item or item.startswith("#"):
            continue
        digest, owner, roles = [*item.split(":"), "", ""][:3]
        role_set = frozenset(role for role in roles.split("+") if role) or frozenset({"client"})
        if len(digest) != 64 or not owner or not role_set <= ROLES:
            raise ValueError(f"bad API key entry for owner {owner!r}: want sha256hex:owner:role+role")
        entries[digest] = Principal(owner=owner, roles=role_set)
    return entries


@functools.lru_cache(maxsize=8)
def _parse_cached(
    api_keys: str, keys_file: Path | None, file_version: tuple[int, int]
) -> dict[str, Principal]:
    """Parsed once per (API_KEYS, API_KEYS_FILE content version): a request costs one stat."""
    raw = api_keys
    if keys_file is not None:
        raw = raw + "," + keys_file.read_text()
    return parse_key_entries(raw)


def _load_keys(settings: Settings) -> dict[str, Principal]:
    file_version = (0, 0)
    if settings.api_keys_file:
        # A rotated or edited file has a new mtime (or size): it is read again, once.
        stat = settings.api_keys_file.stat()
        file_version = (stat.st_mtime_ns, stat.st_size)
    return _parse_cached(settings.api_keys, settings.api_keys_file or None, file_version)


def keys_need_io(settings: Settings) -> bool:
    """True when authenticating touches the file system (API_KEYS_FILE): async callers
    run ``authenticate`` in a thread then, so a slow disk never stalls an event loop."""
    return bool(settings.api_keys_file)


def open_mode(settings: Settings) -> bool:
    return not settings.api_keys and not settings.api_keys_file


def authenticate(headers: Mapping[str, str] | Any, settings: Settings) -> Principal:
    """The caller of this request, from ``X-API-Key`` or ``Authorization: Bearer``."""
    if open_mode(settings):
        return _OPEN_PRINCIPAL
    presented = headers.get("X-API-Key") or ""
    authorization = headers.get("Authorization") or ""
    if not presented and authorization.lower().startswith("bearer "):
        presented = authorization[7:].strip()
    if not presented:
        raise Unauthorized("missing API key: send it in the X-API-Key header", code="missing_api_key")
    digest = hash_api_key(presented)
    for known_digest, principal in _load_keys(settings).items():
        if hmac.compare_digest(known_digest, digest):
            return principal
    raise Unauthorized("unknown or revoked API key", code="invalid_api_key")
