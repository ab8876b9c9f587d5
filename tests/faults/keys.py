"""The fault tests' tenants: an API key each, with its role, as API_KEYS carries them."""

from __future__ import annotations

from shared.auth import hash_api_key

__all__ = ["ROLES", "api_keys_setting", "tenant_keys"]

ROLES = {"alice": "client", "bob": "client", "admin": "admin", "runner": "runner"}


def tenant_keys(tag: str, *names: str) -> dict[str, str]:
    """A key for each of ``names`` (every tenant of ROLES by default), unique to ``tag`` (the
    test file) so a key from one file's stack never opens another's."""
    return {name: f"csk_{name}_{tag}" for name in names or ROLES}


def api_keys_setting(keys: dict[str, str]) -> str:
    """The API_KEYS value for ``keys``: each key's hash, its tenant and the tenant's role."""
    return ",".join(f"{hash_api_key(key)}:{name}:{ROLES[name]}" for name, key in keys.items())
