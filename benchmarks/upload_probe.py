"""``python -m benchmarks.upload_probe --file F [--raw ...]``: one upload, its time and memory.

A lean process on purpose (stdlib only until the client library is chosen), so that
the RSS high-water mark after the upload is the upload's own. Without ``--raw`` the
file goes through ``make_storage_chain`` as the runner uploads (STORAGE_PROVIDER and the
provider's settings from the environment); with ``--raw`` it is one plain transfer to the
same place (a file copy, or one streamed HTTP request to the emulator). Prints one line
of JSON: seconds, CPU seconds, RSS before and peak RSS (MB).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _peak_rss_mb() -> float:
    """This process's own RSS high-water mark (VmHWM). ``ru_maxrss`` would do, but Linux
    carries it over from the parent across fork+exec, so a child of a big process reports
    the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _file_chunks(path: Path, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    with path.open("rb") as file:
        while chunk := file.read(chunk_bytes):
            yield chunk


def _upload_with_provider(path: Path, key: str) -> None:
    from shared.settings import get_settings
    from shared.storage import make_storage_chain

    chain = make_storage_chain(get_settings())
    chain.upload(path, key, "video/mp4")


def _upload_raw(path: Path, key: str, target: str, url: str, bucket: str) -> None:
    if target == "local":
        destination = Path(url) / key
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)
        return
    import httpx

    size = str(path.stat().st_size)
    headers = {"Content-Type": "video/mp4", "Content-Length": size}
    with httpx.Client(timeout=300) as client:
        if target == "gcs":
            response = client.post(
                f"{url}/upload/storage/v1/b/{bucket}/o",
                params={"uploadType": "media", "name": key},
                content=_file_chunks(path),
                headers=headers,
            )
        else:
            response = client.put(f"{url}/{bucket}/{key}", content=_file_chunks(path), headers=headers)
        response.raise_for_status()


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    key = f"results/bench-{uuid.uuid4().hex}/000.mp4"
    # The client libraries are imported before the RSS mark: the figure is the upload's memory.
    if args.raw:
        import httpx  # noqa: F401
    else:
        provider = os.environ.get("STORAGE_PROVIDER", "local")
        if provider == "gcs":
            import google.cloud.storage  # type: ignore[import-untyped]  # noqa: F401  # no py.typed
        elif provider == "r2":
            import boto3  # noqa: F401
        from shared.storage import make_storage_chain  # noqa: F401
    rss_before = _peak_rss_mb()
    cpu_before = _cpu_seconds()
    started = time.perf_counter()
    if args.raw:
        _upload_raw(args.file, key, args.target, args.url, args.bucket)
    else:
        _upload_with_provider(args.file, key)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "cpu_s": _cpu_seconds() - cpu_before,
        "rss_before_mb": rss_before,
        "peak_rss_mb": _peak_rss_mb(),
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
