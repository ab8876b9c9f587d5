"""Cloudflare R2 through its S3 API (boto3): one bucket, public-domain or presigned URLs.

boto3 costs a noticeable import; it is imported when the provider is built, never when
this package is imported, so the slim functions that only read tasks do not pay for it.

Uploads use ``upload_file`` with a transfer config: files over the threshold go up as a
multipart upload read piece by piece from disk, so memory stays near
``chunk_size * max_concurrency`` whatever the file's size.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from shared.errors import ComfySwapError
from shared.storage import require_configured, upstream_error
from shared.storage.base import LazyClient, StorageProvider, StoredObject, bucket_options, missing_settings

if TYPE_CHECKING:
    from shared.settings import Settings

__all__ = ["R2Storage"]

DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024
DEFAULT_MAX_CONCURRENCY = 4
# Threads running S3 calls under a deadline (a call past its deadline keeps its thread
# until botocore's own timeouts end it).
_CALLS = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="r2-call")


class R2Storage(StorageProvider):
    name = "r2"

    def __init__(
        self,
        bucket_name: str,
        *,
        account_id: str = "",
        access_key: str = "",
        secret_key: str = "",
        endpoint_url: str = "",
        public_domain: str = "",
        signed_urls: bool = False,
        signed_url_ttl_s: int = 3600,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        max_attempts: int = 3,  # botocore's count, first try included; bounds the wait before a fallback
        timeout_s: float | None = None,
        retry_deadline_s: float = 30.0,
    ) -> None:
        self.bucket_name = bucket_name
        self.account_id = account_id
        self.endpoint_url = (endpoint_url or self._account_endpoint(account_id)).rstrip("/")
        self.public_domain = public_domain.strip().removeprefix("https://").rstrip("/")
        self.signed_urls = signed_urls
        self.signed_url_ttl_s = signed_url_ttl_s
        self.chunk_size = chunk_size
        self.max_concurrency = max_concurrency
        self.max_attempts = max_attempts
        # One deadline per operation (STORAGE_RETRY_DEADLINE_S): botocore retries each
        # request up to max_attempts times, so each try gets an equal share of it.
        self.retry_deadline_s = retry_deadline_s
        self.timeout_s = min(timeout_s or retry_deadline_s, retry_deadline_s / max(1, max_attempts))
        self._access_key = access_key
        self._secret_key = secret_key
        self._client: LazyClient[Any] = LazyClient(self._build_client)

    @classmethod
    def from_settings(cls, settings: Settings) -> R2Storage:
        return cls(
            settings.r2_bucket_name,
            account_id=settings.r2_account_id,
            access_key=settings.r2_access_key,
            secret_key=settings.r2_secret_key,
            endpoint_url=settings.r2_endpoint_url,
            public_domain=settings.r2_public_domain,
            **bucket_options(settings),
        )

    @staticmethod
    def _account_endpoint(account_id: str) -> str:
        return f"https://{account_id}.r2.cloudflarestorage.com" if account_id else ""

    def _missing_settings(self) -> list[str]:
        return missing_settings(
            {
                "R2_BUCKET_NAME": self.bucket_name,
                "R2_ACCOUNT_ID (or R2_ENDPOINT_URL)": self.endpoint_url,
                "R2_ACCESS_KEY": self._access_key,
                "R2_SECRET_KEY": self._secret_key,
            }
        )

    # --- client -----------------------------------------------------------------------
    @property
    def client(self) -> Any:
        """One boto3 S3 client per provider (thread-safe for calls), built on first use."""
        return self._client.get()

    def _build_client(self) -> Any:
        require_configured(self.name, self._missing_settings())
        import boto3
        from botocore.config import Config

        config = Config(
            region_name="auto",
            signature_version="s3v4",
            # R2 documents path-style and virtual-host access; path style also works
            # with an IP-address endpoint (tests) where bucket subdomains cannot resolve.
            s3={"addressing_style": "path"},
            retries={"total_max_attempts": self.max_attempts, "mode": "standard"},
            connect_timeout=min(10.0, self.timeout_s),
            read_timeout=self.timeout_s,
            # Newer botocore adds CRC checksums to every request by default; only send
            # them where the S3 API requires them, which every S3-compatible store accepts.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self._access_key,
            aws_secret_access_key=self._secret_key,
            config=config,
        )

    # --- interface --------------------------------------------------------------------
    def upload_file(self, local_path: Path, key: str, content_type: str) -> StoredObject:
        size = local_path.stat().st_size
        with self._service_errors(key):
            from boto3.s3.transfer import TransferConfig

            transfer = TransferConfig(
                multipart_threshold=self.chunk_size,
                multipart_chunksize=self.chunk_size,
                max_concurrency=self.max_concurrency,
                use_threads=True,
            )
            self._within_deadline(
                key,
                self.client.upload_file,
                str(local_path),
                self.bucket_name,
                key,
                ExtraArgs={"ContentType": content_type},
                Config=transfer,
            )
            url = self.url_for(key)
        return StoredObject(
            provider=self.name,
            key=key,
            url=url,
            content_type=content_type,
            size=size,
            extra={"bucket": self.bucket_name, "signed": url != self.public_url(key)},
        )

    def _within_deadline(self, key: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one S3 call, giving up after STORAGE_RETRY_DEADLINE_S whatever botocore does
        meanwhile (its per-try timeouts, 100-continue waits and retry backoff add up past
        any timeout one can configure). An abandoned call ends on its own timeouts; an
        object it still writes is removed by the chain or the orphan sweep."""
        future = _CALLS.submit(call, *args, **kwargs)
        try:
            return future.result(timeout=self.retry_deadline_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise upstream_error(
                self.name, f"no answer within STORAGE_RETRY_DEADLINE_S={self.retry_deadline_s:g}s", key=key
            ) from None

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        with self._service_errors(key):
            self._within_deadline(
                key,
                self.client.put_object,
                Bucket=self.bucket_name,
                Key=key,
                Body=data,
                ContentType=content_type,
            )

    def _exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        with self._service_errors(key):
            try:
                self._within_deadline(key, self.client.head_object, Bucket=self.bucket_name, Key=key)
            except ClientError as exc:
                if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    return False
                raise
        return True

    def read_bytes(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        with self._service_errors(key):
            try:
                response = self._within_deadline(
                    key, self.client.get_object, Bucket=self.bucket_name, Key=key
                )
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    raise self._no_object(key) from None
                raise
            data: bytes = response["Body"].read()
        return data

    def delete(self, key: str) -> bool:
        # S3 answers 204 whether or not the key existed; ask first so the caller knows.
        if not self._exists(key):
            return False
        with self._service_errors(key):
            self._within_deadline(key, self.client.delete_object, Bucket=self.bucket_name, Key=key)
        return True

    def list_keys(self, prefix: str) -> list[tuple[str, dt.datetime]]:
        keys: list[tuple[str, dt.datetime]] = []
        with self._service_errors(prefix):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket_name, Prefix=prefix):
                keys.extend((item["Key"], item["LastModified"]) for item in page.get("Contents", []))
        return keys

    def health(self) -> dict[str, Any]:
        """Configured and the bucket reachable with these keys (HEAD bucket, no upload)."""
        missing = self._missing_settings()
        if missing:
            return {"status": "error", "reason": f"not configured: set {', '.join(missing)}"}
        try:
            self.client.head_bucket(Bucket=self.bucket_name)
        except Exception as exc:
            error = exc if isinstance(exc, ComfySwapError) else self._wrap(exc, None)
            return {"status": "error", "bucket": self.bucket_name, "error": error.to_dict()}
        return {"status": "configured", "bucket": self.bucket_name, "endpoint": self.endpoint_url}

    # --- URLs -------------------------------------------------------------------------
    def public_url(self, key: str) -> str:
        return f"https://{self.public_domain}/{quote(key, safe='/')}" if self.public_domain else ""

    def url_for(self, key: str) -> str:
        """The public-domain URL, unless signed URLs are asked for or no public domain exists."""
        if self.public_domain and not self.signed_urls:
            return self.public_url(key)
        url: str = self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket_name, "Key": key},
            ExpiresIn=self.signed_url_ttl_s,
        )
        return url

    # --- errors -----------------------------------------------------------------------
    def _wrap(self, exc: Exception, key: str | None) -> ComfySwapError:
        """Map boto3/botocore failures onto the service's tree with the S3 status and error."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(exc, ClientError):
            response: dict[str, Any] = dict(exc.response)
            error = response.get("Error", {})
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            body = f"{error.get('Code', '')}: {error.get('Message', '')}".strip(": ")
            return upstream_error(
                self.name, f"R2 refused the request: {body}", status=status, body=body, key=key
            )
        if isinstance(exc, S3UploadFailedError):
            # upload_file flattens the S3 error into a message; the original, when chained,
            # still has the status that decides whether a retry can help.
            cause = exc.__cause__ or exc.__context__
            status = (
                cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if isinstance(cause, ClientError)
                else None
            )
            return upstream_error(
                self.name, f"R2 upload failed: {exc}", status=status, body=str(exc), key=key
            )
        if isinstance(exc, BotoCoreError):
            return upstream_error(self.name, f"R2 unreachable: {type(exc).__name__}: {exc}", key=key)
        return upstream_error(self.name, f"R2 upload failed: {type(exc).__name__}: {exc}", key=key)
