"""``python -m benchmarks.upload_probe --file F [--raw ...]``: one upload, its time and memory.

A lean process on purpose (stdlib only until the client library is chosen), so that
the RSS high-water mark after the upload is the upload's own. Without ``--raw`` the
file goes through ``make_storage_chain`` as the runner uploads (STORAGE_PROVIDER and the
provider's settings from the environment); with ``--raw`` it is one plain transfer to the
same place by the same protocol (a file copy; a GCS resumable upload or an S3 multipart
upload in the provider's piece size, over plain HTTP). Prints one line
of JSON: seconds, CPU seconds, RSS before and peak RSS (MB).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.rss import peak_rss_mb


def _provider_chain() -> Any:
    """The chain as the runner holds it: built once at start (settings read, client made
    and its connection opened by a health check), so the timed part is the upload alone.
    Timing the settings and the client too cost ``local`` two thirds of its figure."""
    from shared.settings import get_settings
    from shared.storage import make_storage_chain

    chain = make_storage_chain(get_settings())
    chain.health()
    return chain


def _upload_raw(path: Path, key: str, target: str, url: str, bucket: str) -> None:
    """The same protocol as the provider, done plainly: a kernel file copy (``local``), a
    resumable upload in the provider's chunk size (``gcs``), a multipart upload in the
    provider's part size and concurrency (``r2``). No SDK, no signing, no checksums."""
    if target == "local":
        destination = Path(url) / key
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)
        return
    import httpx

    with httpx.Client(timeout=300) as client:
        if target == "gcs":
            _gcs_resumable(client, path, key, url, bucket)
        elif target == "r2":
            _s3_multipart(client, path, key, url, bucket)
        else:
            _one_request(client, path, key, target, url, bucket)


def _one_request(client: Any, path: Path, key: str, target: str, url: str, bucket: str) -> None:
    """The whole file in one streamed request (``gcs-single``, ``r2-single``): what an
    emulator does at best, a reference for the note, not the protocol the providers use."""
    headers = {"Content-Type": "video/mp4", "Content-Length": str(path.stat().st_size)}

    def chunks() -> Iterator[bytes]:
        with path.open("rb") as file:
            while chunk := file.read(1 << 20):
                yield chunk

    if target == "gcs-single":
        response = client.post(
            f"{url}/upload/storage/v1/b/{bucket}/o",
            params={"uploadType": "media", "name": key},
            content=chunks(),
            headers=headers,
        )
    else:
        response = client.put(f"{url}/{bucket}/{key}", content=chunks(), headers=headers)
    response.raise_for_status()


def _gcs_resumable(client: Any, path: Path, key: str, url: str, bucket: str) -> None:
    """Start a session, then PUT the file in the provider's chunk size with Content-Range,
    each answered 308 until the last (what google-resumable-media sends)."""
    from shared.storage.gcs import DEFAULT_CHUNK_SIZE

    size = path.stat().st_size
    started = client.post(
        f"{url}/upload/storage/v1/b/{bucket}/o",
        params={"uploadType": "resumable", "name": key},
        json={"contentType": "video/mp4"},
        headers={"X-Upload-Content-Type": "video/mp4"},
    )
    started.raise_for_status()
    session = started.headers["Location"]
    with path.open("rb") as file:
        offset = 0
        while chunk := file.read(DEFAULT_CHUNK_SIZE):
            end = offset + len(chunk) - 1
            response = client.put(
                session, content=chunk, headers={"Content-Range": f"bytes {offset}-{end}/{size}"}
            )
            if response.status_code not in (200, 201, 308):
                response.raise_for_status()
            offset = end + 1


def _s3_multipart(client: Any, path: Path, key: str, url: str, bucket: str) -> None:
    """Create, PUT the parts (the provider's part size, as many at once as it sends),
    complete: the calls boto3's transfer manager makes, unsigned (moto checks no signature)."""
    import re
    from concurrent.futures import ThreadPoolExecutor

    from shared.storage.r2 import DEFAULT_CHUNK_SIZE, DEFAULT_MAX_CONCURRENCY

    object_url = f"{url}/{bucket}/{key}"
    created = client.post(object_url, params={"uploads": ""}, headers={"Content-Type": "video/mp4"})
    created.raise_for_status()
    match = re.search(r"<UploadId>([^<]+)</UploadId>", created.text)
    assert match, created.text
    upload_id = match.group(1)
    size = path.stat().st_size
    parts = range(1, -(-size // DEFAULT_CHUNK_SIZE) + 1)

    def put_part(number: int) -> str:
        with path.open("rb") as file:
            file.seek((number - 1) * DEFAULT_CHUNK_SIZE)
            data = file.read(DEFAULT_CHUNK_SIZE)
        response = client.put(object_url, params={"partNumber": number, "uploadId": upload_id}, content=data)
        response.raise_for_status()
        return str(response.headers["ETag"])

    with ThreadPoolExecutor(DEFAULT_MAX_CONCURRENCY) as pool:
        etags = list(pool.map(put_part, parts))
    body = "".join(
        f"<Part><PartNumber>{number}</PartNumber><ETag>{etag}</ETag></Part>"
        for number, etag in zip(parts, etags, strict=True)
    )
    completed = client.post(
        object_url,
        params={"uploadId": upload_id},
        content=f"<CompleteMultipartUpload>{body}</CompleteMultipartUpload>",
    )
    completed.raise_for_status()


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    key = f"results/bench-{uuid.uuid4().hex}/000.mp4"
    # The client libraries are imported before the RSS mark: the figure is the upload's memory.
    if args.raw:
        import httpx  # noqa: F401

        import shared.storage.gcs
        import shared.storage.r2  # noqa: F401  # their piece sizes, imported before the mark
    else:
        provider = os.environ.get("STORAGE_PROVIDER", "local")
        if provider == "gcs":
            importlib.import_module("google.cloud.storage")
        elif provider == "r2":
            import boto3  # noqa: F401
    chain = None if args.raw else _provider_chain()
    # Both sides start with no dirty pages of the previous upload to write back: the kernel
    # throttles a writer behind them, and whichever ran second paid for the first.
    os.sync()
    rss_before = peak_rss_mb()
    cpu_before = _cpu_seconds()
    started = time.perf_counter()
    if chain is None:
        _upload_raw(args.file, key, args.target, args.url, args.bucket)
    else:
        chain.upload(args.file, key, "video/mp4")
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "cpu_s": _cpu_seconds() - cpu_before,
        "rss_before_mb": rss_before,
        "peak_rss_mb": peak_rss_mb(),
    }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--file", type=Path, required=True)
    parser.add_argument("--raw", action="store_true")
    parser.add_argument("--target", default="")
    parser.add_argument("--url", default="")
    parser.add_argument("--bucket", default="")
    print(json.dumps(_measure(parser.parse_args())))


if __name__ == "__main__":
    main()
