"""Figure 6: upload throughput and peak memory of each storage provider, on its emulator.

Each upload runs in a fresh, lean process (``python -m benchmarks.upload_probe``) that
reports its time and its RSS high-water mark, so the memory is the upload's own. A 200 MB and a
20 MB file go through the provider as the runner calls it (``make_storage_chain``):
memory that does not grow with the file shows the upload is streamed. The baseline is
the same protocol done plainly (issue 15), to the same place: a file copy for ``local``, a
resumable upload in the same 8 MiB chunks to fake-gcs-server for ``gcs``, a multipart
upload in the same parts, as many at once, to moto for ``r2`` (httpx, no SDK). The note
adds the whole file in one request, which shows what the protocol itself costs there.
The provider is built before the clock starts, as the runner builds it once.
``cf_images`` is skipped: Cloudflare Images takes images of at most 10 MB.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from benchmarks.common import Row, run_json_subprocess, verdict

__all__ = ["storage_rows"]

LARGE_MB = 200
SMALL_MB = 20
RSS_GROWTH_TARGET = 1.2
UPLOAD_RATIO_TARGET = 0.8
PLAIN = {
    "local": "plain file copy (kernel copy)",
    "gcs": "plain resumable upload, same 8 MiB chunks",
    "r2": "plain multipart upload, same 8 MiB parts, same 4 at once",
}
GCS_PROJECT = "comfyswap-bench"
R2_ACCESS_KEY = "bench-access-key"
R2_SECRET_KEY = "bench-secret-key"  # noqa: S105  # moto checks no signature; not a secret


# --- orchestration -------------------------------------------------------------------------------
def _write_file(path: Path, megabytes: int) -> None:
    with path.open("wb") as file:
        for _ in range(megabytes):
            file.write(os.urandom(1 << 20))


def _upload(path: Path, env: dict[str, str], *, raw: tuple[str, str, str] | None = None) -> dict[str, Any]:
    args = ["-m", "benchmarks.upload_probe", "--file", str(path)]
    if raw is not None:
        target, url, bucket = raw
        args += ["--raw", "--target", target, "--url", url, "--bucket", bucket]
    result: dict[str, Any] = run_json_subprocess(args, timeout_s=300, env=env)
    return result


def _provider_rows(
    name: str, env: dict[str, str], raw: tuple[str, str, str], large: Path, small: Path
) -> list[Row]:
    small_result = _upload(small, env)
    large_result = _upload(large, env)
    raw_result = _upload(large, env, raw=raw)
    throughput = LARGE_MB / large_result["seconds"]
    raw_throughput = LARGE_MB / raw_result["seconds"]
    ratio = throughput / raw_throughput
    growth = large_result["peak_rss_mb"] / small_result["peak_rss_mb"]
    note = (
        f"uploader CPU {large_result['cpu_s']:.1f} s of {large_result['seconds']:.1f} s wall "
        f"(plain: {raw_result['cpu_s']:.1f} s of {raw_result['seconds']:.1f} s)"
    )
    target, url, bucket = raw
    if target != "local":
        # The same bytes in one request: how much of the gap to it is the protocol's
        # (requests per piece, the emulator's handling of pieces), not the provider's.
        single = _upload(large, env, raw=(f"{target}-single", url, bucket))
        note += (
            f"; the whole file in one plain request: {LARGE_MB / single['seconds']:.0f} MB/s "
            f"(the protocol's cost on this emulator, paid by the plain transfer too)"
        )
    return [
        Row(
            f"6. storage `{name}`: {LARGE_MB} MB upload",
            f"{throughput:.0f} MB/s = {ratio:.2f}x",
            f">= {UPLOAD_RATIO_TARGET}x of the same protocol done plainly (issue 15)",
            f"{PLAIN[target]}: {raw_throughput:.0f} MB/s",
            verdict(ratio >= UPLOAD_RATIO_TARGET),
            note,
        ),
        Row(
            f"6. storage `{name}`: peak RSS of the uploading process",
            f"{large_result['peak_rss_mb']:.0f} MB for {LARGE_MB} MB, "
            f"{small_result['peak_rss_mb']:.0f} MB for {SMALL_MB} MB ({growth:.2f}x)",
            f"streamed: <= {RSS_GROWTH_TARGET}x for {LARGE_MB // SMALL_MB}x the bytes",
            f"before the upload: {large_result['rss_before_mb']:.0f} MB; "
            f"plain transfer peak: {raw_result['peak_rss_mb']:.0f} MB",
            verdict(growth <= RSS_GROWTH_TARGET),
        ),
    ]


def storage_rows(workdir: Path) -> list[Row]:
    from tests.servers import free_port, start_server
    from tests.storage.conftest import fake_gcs_server_binary, moto_server_binary

    large, small = workdir / "upload-200mb.bin", workdir / "upload-20mb.bin"
    _write_file(large, LARGE_MB)
    _write_file(small, SMALL_MB)
    rows: list[Row] = []
    base_env = {"PYTHONPATH": str(Path(__file__).resolve().parent.parent), "DATA_DIR": str(workdir / "data")}

    local_env = {**base_env, "STORAGE_PROVIDER": "local"}
    rows += _provider_rows("local", local_env, ("local", str(workdir / "raw-local"), ""), large, small)

    gcs_binary = fake_gcs_server_binary()
    if gcs_binary is None:
        rows.append(
            Row("6. storage `gcs`", "not measured: fake-gcs-server binary not found", "", "", "not measured")
        )
    else:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(
            "fake-gcs-server",
            [str(gcs_binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
             "-backend", "memory", "-external-url", url, "-public-host", f"127.0.0.1:{port}"],
            url=url,
            log_dir=workdir,
            health_path="/storage/v1/b",
        )  # fmt: skip
        try:
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            import httpx

            httpx.post(
                f"{url}/storage/v1/b", params={"project": GCS_PROJECT}, json={"name": bucket}
            ).raise_for_status()
            env = {
                **base_env,
                "STORAGE_PROVIDER": "gcs",
                "GCS_BUCKET_NAME": bucket,
                "STORAGE_EMULATOR_HOST": url,
                "GOOGLE_CLOUD_PROJECT": GCS_PROJECT,
            }
            rows += _provider_rows("gcs", env, ("gcs", url, bucket), large, small)
        finally:
            server.stop()

    moto_binary = moto_server_binary()
    if moto_binary is None:
        rows.append(Row("6. storage `r2`", "not measured: moto_server not found", "", "", "not measured"))
    else:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(
            "moto-server", [str(moto_binary), "-H", "127.0.0.1", "-p", str(port)], url=url, log_dir=workdir
        )
        try:
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            import boto3
            from botocore.config import Config

            boto3.client(
                "s3",
                endpoint_url=url,
                aws_access_key_id=R2_ACCESS_KEY,
                aws_secret_access_key=R2_SECRET_KEY,
                config=Config(region_name="auto", s3={"addressing_style": "path"}),
            ).create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "auto"})
            env = {
                **base_env,
                "STORAGE_PROVIDER": "r2",
                "R2_BUCKET_NAME": bucket,
                "R2_ENDPOINT_URL": url,
                "R2_ACCESS_KEY": R2_ACCESS_KEY,
                "R2_SECRET_KEY": R2_SECRET_KEY,
            }
            rows += _provider_rows("r2", env, ("r2", url, bucket), large, small)
        finally:
            server.stop()

    rows.append(
        Row(
            "6. storage `cf_images`",
            "not measured: Cloudflare Images takes images of at most 10 MB; a 200 MB file "
            "(a video) goes to the next provider of the chain",
            "",
            "",
            "not measured",
        )
    )
    return rows
