"""Cloudflare Images (API v1 over httpx): still images only, served from its variants.

Decisions (documented here because Cloudflare's API shapes them):

* **Deterministic id.** Each upload sends a custom ``id`` (Cloudflare allows up to 1,024
  characters) derived from the storage key, so a retried upload targets the same image
  rather than adding a second one with a random UUID. Custom ids may contain ``/``, but
  the management API addresses an image as ``/images/v1/{id}``, where an encoded slash
  is at the mercy of every proxy on the way; ``/`` is therefore mapped to ``~`` (an
  unreserved URL character, never produced by ``result_key``), which keeps the mapping
  one-to-one and the ids safe in both API and delivery URLs.
* **Overwrite.** Cloudflare refuses an existing custom id (HTTP 409, error 5409,
  "already exists"). A retry may carry different bytes (the job ran again), so "same
  key overwrites" is kept by deleting the old image and uploading again, once. Between
  the two calls the URL briefly answers 404, and Cloudflare's edge may keep serving the
  cached old variant for a while; both are acceptable for a retried result.
* **Limits.** Only JPEG, PNG, GIF, WebP and SVG are accepted (``accepts`` is false for
  anything else, so a video moves on to the next provider of the chain), and files over
  Cloudflare's documented 10 MB limit for stored images are refused before any upload.
* **URLs.** The ``public`` variant (else the first) from the upload response; with
  ``CF_IMAGES_DELIVERY_DOMAIN`` the documented custom-domain form
  ``https://<domain>/cdn-cgi/imagedelivery/<account hash>/<id>/<variant>``. Cloudflare
  transcodes on delivery (WebP/AVIF by Accept header), so the bytes served may differ
  from the bytes uploaded; custom ids cannot be private, so SIGNED_URLS does not apply.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import httpx

from shared.errors import ComfySwapError, PayloadTooLarge, ValidationFailed
from shared.storage import require_configured, upstream_error
from shared.storage.base import LazyClient, StorageProvider, StoredObject, missing_settings

if TYPE_CHECKING:
    from shared.settings import Settings

__all__ = ["ACCEPTED_CONTENT_TYPES", "MAX_IMAGE_BYTES", "CloudflareImagesStorage", "image_id_for_key"]

DEFAULT_API_BASE = "https://api.cloudflare.com/client/v4"
MAX_IMAGE_BYTES = 10 * 1024 * 1024
ACCEPTED_CONTENT_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp", "image/svg+xml"})
MAX_ID_CHARS = 1024
ALREADY_EXISTS_CODE = 5409
DEFAULT_VARIANT = "public"


def image_id_for_key(key: str) -> str:
    """The custom image id of a storage key: ``results/<task>/000.png`` -> ``results~<task>~000.png``."""
    if "~" in key:
        raise ValidationFailed("key", "must not contain '~' (reserved for '/' in Cloudflare Images ids)")
    image_id = key.replace("/", "~")
    if len(image_id) > MAX_ID_CHARS:
        raise ValidationFailed("key", f"longer than Cloudflare's {MAX_ID_CHARS}-character id limit")
    return image_id


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


class CloudflareImagesStorage(StorageProvider):
    name = "cf_images"

    def __init__(
        self,
        account_id: str,
        api_token: str,
        *,
        api_base: str = DEFAULT_API_BASE,
        delivery_domain: str = "",
        variant: str = DEFAULT_VARIANT,
        max_bytes: int = MAX_IMAGE_BYTES,
        timeout_s: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.account_id = account_id
        self.api_base = api_base.rstrip("/")
        self.delivery_domain = delivery_domain.strip().rstrip("/")
        self.variant = variant
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._api_token = api_token
        # Retries here cover connection set-up only; a refused request is not repeated.
        self._transport = transport or httpx.HTTPTransport(retries=2)
        self._client: LazyClient[httpx.Client] = LazyClient(self._build_client)

    @classmethod
    def from_settings(cls, settings: Settings) -> CloudflareImagesStorage:
        return cls(
            settings.cf_images_account_id,
            settings.cf_images_api_token,
            api_base=settings.cf_images_api_base,
            delivery_domain=settings.cf_images_delivery_domain,
            timeout_s=settings.storage_retry_deadline_s,
        )

    def _missing_settings(self) -> list[str]:
        return missing_settings(
            {"CF_IMAGES_ACCOUNT_ID": self.account_id, "CF_IMAGES_API_TOKEN": self._api_token}
        )

    @property
    def client(self) -> httpx.Client:
        """One pooled HTTP client per provider, built on first use."""
        return self._client.get()

    def _build_client(self) -> httpx.Client:
        require_configured(self.name, self._missing_settings())
        return httpx.Client(
            base_url=f"{self.api_base}/accounts/{quote(self.account_id, safe='')}/images/v1",
            headers={"Authorization": f"Bearer {self._api_token}"},
            timeout=httpx.Timeout(self.timeout_s, connect=10.0),
            transport=self._transport,
        )

    def close(self) -> None:
        if self._client.built is not None:
            self._client.built.close()

    # --- interface --------------------------------------------------------------------
    def accepts(self, content_type: str) -> bool:
        return _media_type(content_type) in ACCEPTED_CONTENT_TYPES

    def upload_file(self, local_path: Path, key: str, content_type: str) -> StoredObject:
        if not self.accepts(content_type):
            raise ValidationFailed(
                "content_type", f"Cloudflare Images stores only {', '.join(sorted(ACCEPTED_CONTENT_TYPES))}"
            )
        size = local_path.stat().st_size
        if size > self.max_bytes:
            raise PayloadTooLarge(
                f"cf_images: {size} bytes is over Cloudflare Images' {self.max_bytes}-byte limit",
                code="cf_images_too_large",
                details={"provider": self.name, "size": size, "limit": self.max_bytes, "key": key},
            )
        image_id = image_id_for_key(key)
        try:
            response = self._post_image(local_path, image_id, content_type)
            replaced = False
            if self._already_exists(response):
                self._delete_image(image_id, key)
                response = self._post_image(local_path, image_id, content_type)
                replaced = True
        except httpx.HTTPError as exc:
            raise upstream_error(
                self.name, f"Cloudflare Images unreachable: {type(exc).__name__}: {exc}", key=key
            ) from exc
        result = self._result(response, key)
        variants = [str(variant) for variant in result.get("variants") or []]
        return StoredObject(
            provider=self.name,
            key=key,
            url=self._delivery_url(variants, key),
            content_type=content_type,
            size=size,
            extra={"image_id": result.get("id") or image_id, "variants": variants, "replaced": replaced},
        )

    def health(self) -> dict[str, Any]:
        """Configured and the token accepted: the image-count endpoint, never an upload."""
        missing = self._missing_settings()
        if missing:
            return {"status": "error", "reason": f"not configured: set {', '.join(missing)}"}
        try:
            response = self.client.get("/stats", timeout=5.0)
            result = self._result(response, None)
        except ComfySwapError as error:
            return {"status": "error", "error": error.to_dict()}
        except httpx.HTTPError as exc:
            return {"status": "error", "error": {"code": "storage_upload_failed", "message": str(exc)}}
        return {"status": "configured", "count": result.get("count", {})}

    def delete(self, key: str) -> bool:
        response = self.client.delete(f"/{quote(image_id_for_key(key), safe='')}")
        if response.status_code == httpx.codes.NOT_FOUND:
            return False
        self._result(response, key)
        return True

    # --- API calls --------------------------------------------------------------------
    def _post_image(self, local_path: Path, image_id: str, content_type: str) -> httpx.Response:
        with local_path.open("rb") as image_file:
            # httpx streams a file object in the multipart body rather than reading it whole.
            return self.client.post(
                "",
                files={"file": (local_path.name, image_file, _media_type(content_type))},
                data={"id": image_id},
            )

    def _delete_image(self, image_id: str, key: str) -> None:
        response = self.client.delete(f"/{quote(image_id, safe='')}")
        if response.status_code == httpx.codes.NOT_FOUND:
            return  # gone already (a concurrent retry deleted it): the upload can proceed
        self._result(response, key)

    @staticmethod
    def _already_exists(response: httpx.Response) -> bool:
        if response.status_code == httpx.codes.CONFLICT:
            return True
        envelope = _envelope(response)
        for error in envelope.get("errors") or []:
            if isinstance(error, dict) and (
                error.get("code") == ALREADY_EXISTS_CODE
                or "already exists" in str(error.get("message", "")).lower()
            ):
                return True
        return False

    def _result(self, response: httpx.Response, key: str | None) -> dict[str, Any]:
        """The ``result`` of a successful envelope; anything else raises with status and body."""
        envelope = _envelope(response)
        if response.is_success and envelope.get("success") is True:
            result = envelope.get("result")
            return result if isinstance(result, dict) else {}
        errors = envelope.get("errors") or []
        summary = "; ".join(
            f"{error.get('code')}: {error.get('message')}" for error in errors if isinstance(error, dict)
        )
        raise upstream_error(
            self.name,
            f"Cloudflare Images refused the request ({response.status_code}): {summary or 'no details'}",
            status=response.status_code,
            body=response.text,
            key=key,
        )

    # --- URLs -------------------------------------------------------------------------
    def _delivery_url(self, variants: list[str], key: str) -> str:
        if not variants:
            raise upstream_error(self.name, "upload succeeded but returned no variant URL", key=key)
        chosen = next((url for url in variants if url.rstrip("/").endswith(f"/{self.variant}")), variants[0])
        if not self.delivery_domain:
            return chosen
        # imagedelivery.net/<account hash>/<id>/<variant> -> <domain>/cdn-cgi/imagedelivery/<same path>
        domain = self.delivery_domain if "://" in self.delivery_domain else f"https://{self.delivery_domain}"
        return f"{domain}/cdn-cgi/imagedelivery{urlsplit(chosen).path}"


def _envelope(response: httpx.Response) -> dict[str, Any]:
    """The JSON envelope, or an empty one when the body is not JSON (a proxy's HTML page)."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
