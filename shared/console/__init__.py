"""The web console's files (index.html, console.css, console.js), served at /console.

They live inside ``shared/`` so every function bundle (scripts/bundle_functions.py)
ships them; get_task serves them. The page is static and holds no secret: every call it
makes to the API carries the API key the person pasted, kept in sessionStorage for the
tab only, and the API checks it as for any other client.
"""

from __future__ import annotations

import functools
from pathlib import Path

__all__ = ["ASSETS", "CONTENT_SECURITY_POLICY", "read_asset"]

ASSET_DIR = Path(__file__).resolve().parent

# name -> content type; anything else under /console/ is a 404 (no path is ever joined
# from the request, so nothing outside this folder can be asked for).
ASSETS: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
}

# Only this origin's scripts, styles and API; results may live on a storage host (GCS, R2,
# Cloudflare Images), so images and videos may come from any http(s) origin, and from
# blob: (results fetched with the key, previews of dropped files). No inline script, no
# framing, no form posts elsewhere.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' blob: data: https: http:; media-src 'self' blob: https: http:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@functools.cache
def read_asset(name: str) -> bytes:
    """The bytes of one console file; KeyError for a name that is not one of ASSETS."""
    if name not in ASSETS:
        raise KeyError(name)
    return (ASSET_DIR / name).read_bytes()
