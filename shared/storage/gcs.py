"""Google Cloud Storage: results as objects in one bucket, public or v4-signed URLs.

The client is built once per provider (clients are expensive and pool connections) and
only on first use, so constructing the provider, or asking its health while it is not
configured, needs neither credentials nor network. ``STORAGE_EMULATOR_HOST`` points the
same code at fake-gcs-server with anonymous credentials.

Files over 8 MB go up as resumable uploads in ``chunk_size`` pieces (the library's
threshold), so a 1 GB video never sits in memory. Public URLs need the bucket to grant
``allUsers`` object read (Terraform does); otherwise set ``SIGNED_URLS=true``.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from shared.errors import ComfySwapError
from shared.storage import upstream_error
from shared.storage.base import LazyClient, StorageProvider, StoredObject, bucket_options

if TYPE_CHECKING:
    from google.auth.credentials import Credentials
    from google.cloud.storage import Bucket, Client

    from shared.settings import Settings

__all__ = ["GCSStorage"]

PUBLIC_HOST = "https://storage.googleapis.com"
# Resumable upload pieces; must be a multiple of 256 KiB. 8 MiB bounds memory per upload.
DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024
_SCOPES = ["https://www.googleapis.com/auth/devstorage.read_write"]


class GCSStorage(StorageProvider):
    name = "gcs"

    def __init__(
        self,
        bucket_name: str,
        *,
        project: str | None = None,
        emulator_host: str = "",
        credentials_file: str = "",
        signed_urls: bool = False,
        signed_url_ttl_s: int = 3600,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        timeout_s: float | None = None,
        retry_deadline_s: float = 30.0,
        bucket_region: str = "",
    ) -> None:
        if chunk_size % (256 * 1024):
            raise ValueError("chunk_size must be a multiple of 256 KiB (a GCS resumable-upload rule)")
        self.bucket_name = bucket_name
        # GCS_BUCKET_REGION (a seed setting): where the bucket is meant to be. The health
        # check compares it with the bucket's real location, so a results bucket created in
        # another region than the runner (egress cost, latency) shows up in /api/status.
        self.bucket_region = bucket_region
        self.project = project
        self.emulator_host = emulator_host.rstrip("/")
        self.credentials_file = credentials_file
        self.signed_urls = signed_urls
        self.signed_url_ttl_s = signed_url_ttl_s
        self.chunk_size = chunk_size
        # One deadline per operation (STORAGE_RETRY_DEADLINE_S): each request's timeout is
        # capped by it too, so a hung request cannot outlast it (the library's default is 120 s).
        self.retry_deadline_s = retry_deadline_s
        self.timeout_s = min(timeout_s or retry_deadline_s, retry_deadline_s)
        self._client: LazyClient[Client] = LazyClient(self._build_client)
        self._signing_credentials: Credentials | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> GCSStorage:
        return cls(
            settings.gcs_bucket_name,
            project=settings.google_cloud_project,
            emulator_host=settings.storage_emulator_host,
            credentials_file=settings.google_application_credentials,
            bucket_region=settings.gcs_bucket_region,
            **bucket_options(settings),
        )

    # --- client -----------------------------------------------------------------------
    @property
    def client(self) -> Client:
        """The one client of this provider, built on first use (runner threads share it)."""
        return self._client.get()

    def _build_client(self) -> Client:
        import google.auth
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        if self.emulator_host:
            # The emulator checks no credentials; a key file, when given, is kept only to
            # sign URLs, exactly as in production.
            if self.credentials_file:
                self._signing_credentials = self._load_credentials_file()
            return storage.Client(
                project=self.project,
                credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]  # untyped in google-auth
                client_options={"api_endpoint": self.emulator_host},
            )
        if self.credentials_file:
            credentials = self._load_credentials_file()
        else:
            credentials, _ = google.auth.default(scopes=_SCOPES)
        self._signing_credentials = credentials
        return storage.Client(project=self.project, credentials=credentials)

    def _load_credentials_file(self) -> Credentials:
        import google.auth

        loaded = google.auth.load_credentials_from_file(  # type: ignore[no-untyped-call]  # untyped in google-auth
            self.credentials_file, scopes=_SCOPES
        )
        credentials: Credentials = loaded[0]
        return credentials

    def _bucket(self) -> Bucket:
        if not self.bucket_name:
            raise upstream_error(
                self.name, "GCS_BUCKET_NAME is not set", code="storage_not_configured", retryable=False
            )
        return self.client.bucket(self.bucket_name)

    # --- interface --------------------------------------------------------------------
    def upload_file(self, local_path: Path, key: str, content_type: str) -> StoredObject:
        size = local_path.stat().st_size
        with self._service_errors(key):
            blob = self._bucket().blob(key, chunk_size=self.chunk_size)
            # Retrying an unconditional upload is safe here because a key always holds the
            # same task output: a repeat only overwrites. The deadline is ours (not the
            # library's 120 s) so a dead primary hands over to the fallback quickly.
            blob.upload_from_filename(str(local_path), content_type=content_type, **self._within_deadline())
            url = self._url_for(blob)
        return StoredObject(
            provider=self.name,
            key=key,
            url=url,
            content_type=content_type,
            size=size,
            extra={"bucket": self.bucket_name, "generation": blob.generation, "signed": self.signed_urls},
        )

    def _within_deadline(self) -> dict[str, Any]:
        """Per-request timeout and retry budget of one operation, both within its deadline."""
        from google.cloud.storage.retry import DEFAULT_RETRY

        return {"timeout": self.timeout_s, "retry": DEFAULT_RETRY.with_timeout(self.retry_deadline_s)}

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        with self._service_errors(key):
            self._bucket().blob(key, chunk_size=self.chunk_size).upload_from_string(
                data, content_type=content_type, **self._within_deadline()
            )

    def read_bytes(self, key: str) -> bytes:
        from google.api_core import exceptions as api_exceptions

        with self._service_errors(key):
            try:
                data: bytes = self._bucket().blob(key).download_as_bytes(**self._within_deadline())
            except api_exceptions.NotFound:
                raise self._no_object(key) from None
        return data

    def delete(self, key: str) -> bool:
        from google.api_core import exceptions as api_exceptions

        with self._service_errors(key):
            try:
                self._bucket().blob(key).delete(**self._within_deadline())
            except api_exceptions.NotFound:
                return False
        return True

    def list_keys(self, prefix: str) -> list[tuple[str, dt.datetime]]:
        with self._service_errors(prefix):
            blobs = self.client.list_blobs(self.bucket_name, prefix=prefix, **self._within_deadline())
            return [(blob.name, blob.updated or blob.time_created) for blob in blobs]

    def health(self) -> dict[str, Any]:
        """Configured and the bucket readable: one metadata GET, never an upload."""
        if not self.bucket_name:
            return {"status": "error", "reason": "GCS_BUCKET_NAME is not set"}
        try:
            bucket = self._bucket()
            bucket.reload(timeout=5.0, retry=None)
        except Exception as exc:
            error = exc if isinstance(exc, ComfySwapError) else self._wrap(exc, None)
            return {"status": "error", "bucket": self.bucket_name, "error": error.to_dict()}
        report: dict[str, Any] = {
            "status": "configured",
            "bucket": self.bucket_name,
            "signed_urls": self.signed_urls,
            "location": bucket.location,
        }
        if self.bucket_region and bucket.location and bucket.location.lower() != self.bucket_region.lower():
            report["warning"] = (
                f"bucket {self.bucket_name} is in {bucket.location}, "
                f"not in GCS_BUCKET_REGION={self.bucket_region}"
            )
        return report

    # --- URLs -------------------------------------------------------------------------
    def public_url(self, key: str) -> str:
        host = self.emulator_host or PUBLIC_HOST
        return f"{host}/{self.bucket_name}/{quote(key, safe='/')}"

    def _url_for(self, blob: Any) -> str:
        if not self.signed_urls:
            return self.public_url(blob.name)
        url: str = blob.generate_signed_url(
            version="v4",
            method="GET",
            expiration=dt.timedelta(seconds=self.signed_url_ttl_s),
            api_access_endpoint=self.emulator_host or PUBLIC_HOST,
            **self._signing_arguments(),
        )
        return url

    def _signing_arguments(self) -> dict[str, Any]:
        """How to sign: with a private key when we hold one, else through IAM signBlob.

        On Cloud Run the runtime credentials carry no private key; the library can then
        sign through the IAM API given the service account's email and an access token
        (the account needs ``iam.serviceAccounts.signBlob`` on itself).
        """
        credentials = self._signing_credentials
        if credentials is None:
            raise upstream_error(
                self.name,
                "signed URLs need credentials: set GOOGLE_APPLICATION_CREDENTIALS to a service-account key "
                "(with STORAGE_EMULATOR_HOST) or run with a service account",
                code="storage_not_configured",
                retryable=False,
            )
        if hasattr(credentials, "sign_bytes") and getattr(credentials, "signer_email", None):
            return {"credentials": credentials}
        from google.auth.transport.requests import Request

        if not credentials.valid:
            credentials.refresh(Request())  # type: ignore[no-untyped-call]  # untyped in google-auth
        email = getattr(credentials, "service_account_email", None)
        if not email:
            raise upstream_error(
                self.name,
                "these credentials cannot sign URLs (no service account)",
                code="storage_not_configured",
                retryable=False,
            )
        return {"service_account_email": email, "access_token": credentials.token}

    # --- errors -----------------------------------------------------------------------
    def _wrap(self, exc: Exception, key: str | None) -> ComfySwapError:
        """Map library exceptions onto the service's tree, keeping the upstream status and body."""
        from google.api_core import exceptions as api_exceptions
        from google.auth import exceptions as auth_exceptions

        if isinstance(exc, auth_exceptions.DefaultCredentialsError):
            # No credentials on this machine: a deployment problem a retry cannot fix.
            return upstream_error(
                self.name,
                f"no Google credentials: {exc}",
                key=key,
                code="storage_not_configured",
                retryable=False,
            )
        if isinstance(exc, api_exceptions.GoogleAPICallError):
            status = int(exc.code) if exc.code is not None else None
            body = getattr(exc.response, "text", None) or exc.message
            return upstream_error(
                self.name, f"GCS refused the request: {exc.message}", status=status, body=body, key=key
            )
        return upstream_error(self.name, f"GCS unreachable: {type(exc).__name__}: {exc}", key=key)
