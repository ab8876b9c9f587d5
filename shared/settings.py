"""One settings object per process, read from the environment and validated at start-up.

The seed service's variable names are part of the interface (existing deployments set
them), so they are kept verbatim; new names are documented in the README's settings table.
A bad value stops the process with a message that names the variable.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, BeforeValidator, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.pools import RunnerPool, parse_runner_pools

__all__ = ["Settings", "get_settings", "reset_settings_cache"]

StorageProviderName = Literal["local", "gcs", "r2", "cf_images"]


def _comma_separated(value: object) -> object:
    """``"a, b,,a"`` -> ``("a", "b")``: the environment's comma lists; sequences (kwargs in
    tests) pass through. Each item is then checked against the field's item type."""
    if isinstance(value, str):
        value = [name.strip() for name in value.split(",")]
    if isinstance(value, list | tuple):
        return tuple(dict.fromkeys(name for name in value if name))
    return value


# A comma-separated environment variable read as a tuple of checked names (NoDecode: not JSON).
CommaSeparated = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_comma_separated)]
ProviderNames = Annotated[tuple[StorageProviderName, ...], NoDecode, BeforeValidator(_comma_separated)]
# RUNNER_POOLS: a JSON list read by shared.pools (NoDecode: its own messages name the pool at fault).
RunnerPools = Annotated[tuple[RunnerPool, ...], NoDecode, BeforeValidator(parse_runner_pools)]


class Settings(BaseSettings):
    """Every setting, by its environment name. Build with kwargs in tests."""

    model_config = SettingsConfigDict(
        env_prefix="",
        case_sensitive=False,
        extra="ignore",
        populate_by_name=True,
        validate_default=True,
    )

    # --- seed names -------------------------------------------------------------------
    app_env: Literal["development", "test", "staging", "production"] = Field(
        "development", description="APP_ENV: deployment stage; production refuses open (keyless) access."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="LOG_LEVEL: minimum severity written to stdout."
    )
    task_api_url: str = Field(
        "http://127.0.0.1:8080/api",
        description="TASK_API_URL: base URL of the task API the runner pulls from (pull mode).",
    )
    comfyui_url: str = Field(
        "", description="COMFYUI_URL: the ComfyUI server for the `comm` environment; empty = none configured."
    )
    comfyui_command: str = Field(
        "",
        description="COMFYUI_COMMAND: command line of a co-located ComfyUI the runner starts and supervises "
        "(e.g. `python /opt/ComfyUI/main.py --listen 127.0.0.1 --port 8188`); empty = don't start one.",
    )
    comfyui_client_id: str = Field("comfyswap-runner", description="COMFYUI_CLIENT_ID: websocket client id.")
    comfyui_input_dir: str = Field(
        "",
        description="COMFYUI_INPUT_DIR: ComfyUI's input folder, when on this machine: a task's uploaded "
        "inputs are deleted from it when the task ends (ComfyUI has no route for that); empty = the one "
        "COMFYUI_COMMAND's ComfyUI uses, else kept.",
    )
    comfyui_output_dir: str = Field(
        "",
        description="COMFYUI_OUTPUT_DIR: ComfyUI's output folder, when on this machine: a prompt's saved "
        "files are taken from it (a hard link, or a copy) instead of downloaded through GET /view; empty = "
        "the one COMFYUI_COMMAND's ComfyUI uses, else every output is downloaded.",
    )
    comfyui_restart_wait_s: float = Field(
        120.0,
        ge=0,
        description="COMFYUI_RESTART_WAIT_S: how long a task waits for an unreachable ComfyUI (crashed, "
        "restarting: 12-40 s) to be ready again before it spends an attempt; 0 = don't wait.",
    )
    face_swap_api_url: str = Field(
        "http://127.0.0.1:8000", description="FACE_SWAP_API_URL: the seed's FaceFusion HTTP API."
    )
    face_swap_timeout: float = Field(120.0, gt=0, description="FACE_SWAP_TIMEOUT: seconds per swap call.")
    face_swap_retry_count: int = Field(
        3, ge=1, le=10, description="FACE_SWAP_RETRY_COUNT: attempts per call."
    )
    storage_provider: StorageProviderName = Field("local", description="STORAGE_PROVIDER: primary provider.")
    gcs_bucket_name: str = Field("", description="GCS_BUCKET_NAME: results bucket for `gcs`.")
    gcs_bucket_region: str = Field(
        "us-central1",
        description="GCS_BUCKET_REGION: region the bucket should be in; the GCS health check "
        "(/api/status) warns when the bucket's location differs.",
    )
    google_application_credentials: str = Field(
        "", description="GOOGLE_APPLICATION_CREDENTIALS: service-account key file (optional on GCP)."
    )
    inputs_bucket: str = Field(
        "",
        description="INPUTS_BUCKET: a private bucket on the first GCS/R2 provider of the chain for "
        "inputs sent as `data:` (kept until their task ends); empty = `inputs/` in the results "
        "bucket. Set it whenever the results bucket is public: a public GCS bucket lists its objects.",
    )
    r2_bucket_name: str = Field("", description="R2_BUCKET_NAME: results bucket for `r2`.")
    r2_account_id: str = Field("", description="R2_ACCOUNT_ID: Cloudflare account id (endpoint host).")
    r2_access_key: str = Field("", description="R2_ACCESS_KEY: R2 access key id.", repr=False)
    r2_secret_key: str = Field("", description="R2_SECRET_KEY: R2 secret access key.", repr=False)
    r2_public_domain: str = Field("", description="R2_PUBLIC_DOMAIN: public domain; empty = presigned URLs.")
    cf_images_account_id: str = Field("", description="CF_IMAGES_ACCOUNT_ID: Cloudflare account id.")
    cf_images_api_token: str = Field("", description="CF_IMAGES_API_TOKEN: Images API token.", repr=False)
    cf_images_delivery_domain: str = Field(
        "", description="CF_IMAGES_DELIVERY_DOMAIN: custom delivery domain; empty = imagedelivery.net."
    )

    # --- new names --------------------------------------------------------------------
    pull_source: Literal["auto", "api", "store"] = Field(
        "auto",
        description="PULL_SOURCE: where a pull-mode runner claims its tasks: `api` (fetch_task at "
        "TASK_API_URL), `store` (the task store it writes statuses to anyway); `auto` = `store` for the "
        "embedded SQLite store (API and runner on one machine: no hop through the API), else `api`.",
    )
    task_store: Literal["sqlite", "firestore"] = Field(
        "sqlite", description="TASK_STORE: task store backend."
    )
    dispatch_mode: Literal["pull", "push"] = Field(
        "pull", description="DISPATCH_MODE: `pull` (runner claims via fetch_task) or `push` (Cloud Tasks)."
    )
    storage_fallback: ProviderNames = Field(
        (), description="STORAGE_FALLBACK: comma-separated providers tried after STORAGE_PROVIDER."
    )
    api_host: str = Field("127.0.0.1", description="API_HOST: bind address of the local API (dev server).")
    api_port: int = Field(8080, ge=0, le=65535, description="API_PORT: port of the local API.")
    runner_host: str = Field("127.0.0.1", description="RUNNER_HOST: bind address of the runner.")
    runner_port: int = Field(8090, ge=0, le=65535, description="RUNNER_PORT: port of the runner.")
    runner_url: str = Field(
        "",
        description="RUNNER_URL: the runner's base URL, for Cloud Tasks push targets and the dev server's "
        "forwarding; empty = http://RUNNER_HOST:RUNNER_PORT.",
    )
    data_dir: Path = Field(
        Path("./.comfyswap"), description="DATA_DIR: SQLite file, local results, temp files."
    )
    face_swap_engine: Literal["cpu", "facefusion", "facefusion_api"] = Field(
        "cpu", description="FACE_SWAP_ENGINE: face-swap engine of the runner."
    )
    facefusion_command: str = Field(
        "python /opt/facefusion/facefusion.py",
        description="FACEFUSION_COMMAND: how the `facefusion` engine starts FaceFusion (split like a shell "
        "line; run from the folder of its .py script, as FaceFusion expects).",
    )
    facefusion_execution_providers: str = Field(
        "cuda",
        description="FACEFUSION_EXECUTION_PROVIDERS: ONNX Runtime providers FaceFusion runs on, space- or "
        "comma-separated (cuda, tensorrt, cpu).",
    )
    facefusion_models_dir: str = Field(
        "",
        description="FACEFUSION_MODELS_DIR: FaceFusion's model files (checked against their .hash files "
        "at start and before each job); empty = .assets/models beside FACEFUSION_COMMAND's .py script.",
    )
    facefusion_warm: bool = Field(
        True,
        description="FACEFUSION_WARM: keep FaceFusion and its models loaded in one host process per engine "
        "slot, fed jobs over a pipe; false (or a host that cannot start) = one `headless-run` per job.",
    )
    facefusion_warm_max_rss_mb: float = Field(
        8192.0,
        gt=0,
        description="FACEFUSION_WARM_MAX_RSS_MB: a warm FaceFusion host grown past this is replaced after "
        "its job (a leak must not take the runner down).",
    )
    face_swap_shared_dir: str = Field(
        "",
        description="FACE_SWAP_SHARED_DIR: folder the FaceFusion HTTP API writes results into, shared with "
        "the runner; its output_path must resolve inside it; empty = DATA_DIR/facefusion.",
    )
    firestore_emulator_host: str = Field(
        "", description="FIRESTORE_EMULATOR_HOST: Firestore emulator host:port."
    )
    storage_emulator_host: str = Field("", description="STORAGE_EMULATOR_HOST: GCS emulator URL.")
    cloud_tasks_emulator_host: str = Field(
        "", description="CLOUD_TASKS_EMULATOR_HOST: host:port of a Cloud Tasks emulator (insecure gRPC)."
    )
    r2_endpoint_url: str = Field("", description="R2_ENDPOINT_URL: override of the R2 endpoint (tests).")
    cf_images_api_base: str = Field(
        "https://api.cloudflare.com/client/v4", description="CF_IMAGES_API_BASE: Cloudflare API base (tests)."
    )
    google_cloud_project: str = Field(
        "comfyswap-local",
        validation_alias=AliasChoices("GOOGLE_CLOUD_PROJECT", "GCP_PROJECT", "google_cloud_project"),
        description="GOOGLE_CLOUD_PROJECT: project of Firestore and Cloud Tasks.",
    )
    firestore_database: str = Field("(default)", description="FIRESTORE_DATABASE: Firestore database id.")
    firestore_collection: str = Field("tasks", description="FIRESTORE_COLLECTION: collection holding tasks.")
    cloud_tasks_location: str = Field("us-central1", description="CLOUD_TASKS_LOCATION: queue region.")
    cloud_tasks_queue: str = Field("comfyswap-runner", description="CLOUD_TASKS_QUEUE: queue id.")
    cloud_tasks_queues: str = Field(
        "",
        description=(
            "CLOUD_TASKS_QUEUES: comma-separated queue ids of one region, past one queue's 500 "
            "dispatches/s; a task goes to the queue a hash of its environment and id picks "
            "(shared/dispatch/cloud_tasks.py). Empty = CLOUD_TASKS_QUEUE alone."
        ),
    )
    runner_pools: RunnerPools = Field(
        (),
        description=(
            "RUNNER_POOLS: push dispatch across regions: a JSON list of pools, each "
            '{"name", "location", "queues": [...], "runner_url", "audience", "invoker_email", "weight", '
            '"environments": [...]} (Terraform writes it from var.runner_pools). A task goes to the pools '
            "serving its environment, first the one a weighted hash of its id picks, the others in turn when "
            "that region's queue cannot take it; each new delivery of a task starts one pool further down "
            "(shared/pools.py, shared/dispatch/cloud_tasks.py). Empty = one pool from "
            "CLOUD_TASKS_LOCATION, CLOUD_TASKS_QUEUE(S), RUNNER_URL, RUNNER_OIDC_AUDIENCE and "
            "CLOUD_TASKS_INVOKER_EMAIL."
        ),
    )
    cloud_tasks_invoker_email: str = Field(
        "", description="CLOUD_TASKS_INVOKER_EMAIL: service account whose OIDC token Cloud Tasks sends."
    )
    cloud_tasks_dispatch_deadline_s: int = Field(
        1800, ge=15, le=1800, description="CLOUD_TASKS_DISPATCH_DEADLINE_S: how long Cloud Tasks waits."
    )
    runner_oidc_audience: str = Field(
        "", description="RUNNER_OIDC_AUDIENCE: expected audience of push tokens; empty = RUNNER_URL."
    )
    google_oidc_certs_url: str = Field(
        "https://www.googleapis.com/oauth2/v1/certs",
        description="GOOGLE_OIDC_CERTS_URL: where the runner gets Google's token certificates.",
    )
    cloud_run_invoker_iam: bool = Field(
        False,
        description="CLOUD_RUN_INVOKER_IAM: this service runs on Cloud Run with invoker IAM on (Terraform "
        "sets it), so Cloud Run verified a caller's ID token before forwarding it with its signature "
        "replaced by SIGNATURE_REMOVED_BY_GOOGLE; such tokens are then accepted (audience, issuer, "
        "expiry and email still checked). Only honoured where Cloud Run's K_SERVICE is set; refused "
        "everywhere else.",
    )
    k_service: str = Field(
        "", description="K_SERVICE: the service name, set by Cloud Run and Cloud Functions."
    )
    # POST /internal/reap: Cloud Scheduler's OIDC token when set, else an admin API key.
    reaper_invoker_email: str = Field(
        "", description="REAPER_INVOKER_EMAIL: account that may reap by OIDC token."
    )
    reaper_oidc_audience: str = Field("", description="REAPER_OIDC_AUDIENCE: audience of the reaper's token.")
    runner_id: str = Field("", description="RUNNER_ID: this runner's lease owner name; empty = host-pid.")
    runner_environments: CommaSeparated = Field(
        ("face_swap", "comm"),
        min_length=1,
        description="RUNNER_ENVIRONMENTS: comma-separated environments this runner serves.",
    )
    runner_api_key: str = Field(
        "", repr=False, description="RUNNER_API_KEY: the key a pulling runner presents to fetch_task."
    )
    shutdown_grace_s: float = Field(
        5.0,
        ge=0,
        le=3600,
        description="SHUTDOWN_GRACE_S: on SIGTERM, how long in-flight tasks may finish before they are "
        "released (the default leaves room for the release inside Cloud Run's 10 s before SIGKILL).",
    )
    reaper_interval_s: float = Field(
        5.0,
        ge=0,
        le=3600,
        description="REAPER_INTERVAL_S: push mode: how often the runner re-queues (and re-dispatches) tasks "
        "whose lease expired, so a crashed runner's task runs again within LEASE_SECONDS plus this; "
        "0 = only the scheduled /internal/reap.",
    )
    orphan_sweep_interval_s: float = Field(
        900.0,
        ge=0,
        le=86400,
        description="ORPHAN_SWEEP_INTERVAL_S: how often the runner removes result objects and inputs no live "
        "task needs (a crash, a cancel mid-upload, a fallback race); 0 = never.",
    )
    progress_interval_s: float = Field(
        2.0,
        ge=0.05,
        le=300,
        description="PROGRESS_INTERVAL_S: how often at most a running task's progress is written (each write "
        "also renews the lease); lower = fresher progress, more store writes.",
    )
    engine_slots: int = Field(1, ge=1, le=16, description="ENGINE_SLOTS: concurrent jobs per engine.")
    lease_seconds: int = Field(
        60, ge=5, le=3600, description="LEASE_SECONDS: lease length; renewed by heartbeat."
    )
    max_attempts: int = Field(3, ge=1, le=20, description="MAX_ATTEMPTS: deliveries before a task is FAILED.")
    task_timeout_s: float = Field(1800.0, gt=0, description="TASK_TIMEOUT_S: engine time limit per task.")
    fetch_max_bytes: int = Field(
        100 * 1024 * 1024, gt=0, description="FETCH_MAX_BYTES: largest input a URL may deliver."
    )
    fetch_timeout_s: float = Field(30.0, gt=0, description="FETCH_TIMEOUT_S: time limit per input download.")
    max_image_pixels: int = Field(
        40_000_000, gt=0, description="MAX_IMAGE_PIXELS: largest decoded image (decompression-bomb cap)."
    )
    max_request_bytes: int = Field(
        20 * 1024 * 1024, gt=0, description="MAX_REQUEST_BYTES: largest JSON body the API accepts."
    )
    local_storage_base_url: str = Field(
        "",
        description="LOCAL_STORAGE_BASE_URL: public base of `local` results; empty = http://API_HOST:API_PORT/results.",
    )
    signed_urls: bool = Field(False, description="SIGNED_URLS: return signed (not public) result URLs.")
    signed_url_ttl_s: int = Field(
        3600, ge=60, le=604800, description="SIGNED_URL_TTL_S: signed URL lifetime."
    )
    result_url_secret: str = Field(
        "",
        repr=False,
        description="RESULT_URL_SECRET: key that signs `local` result URLs (HMAC, expiring after "
        "SIGNED_URL_TTL_S); empty = a random key kept in DATA_DIR/secrets/result-url.key.",
    )
    max_waits_per_tenant: int = Field(
        4,
        ge=1,
        le=64,
        description="MAX_WAITS_PER_TENANT: long polls (`?wait=`) one API key owner may hold at once per "
        "API instance; more answer 429 at once.",
    )
    max_running_per_tenant: int = Field(
        0,
        ge=0,
        description="MAX_RUNNING_PER_TENANT: tasks of one owner claimed (FETCHED or PROCESSING) at once; "
        "0 = no cap (tenants still take turns: the owner with the fewest running tasks goes first).",
    )
    max_video_frames: int = Field(
        18_000, gt=0, description="MAX_VIDEO_FRAMES: most frames a video input may have (from its metadata)."
    )
    max_video_duration_s: float = Field(
        600.0, gt=0, description="MAX_VIDEO_DURATION_S: longest video input, in seconds (from its metadata)."
    )
    task_retention_days: int = Field(
        30,
        ge=1,
        le=3650,
        description="TASK_RETENTION_DAYS: finished tasks are deleted this long after they end (Firestore "
        "TTL on `expire_at`; a sweep in SQLite).",
    )
    storage_retry_deadline_s: float = Field(
        30.0,
        gt=0,
        description="STORAGE_RETRY_DEADLINE_S: how long one storage provider retries transient failures "
        "before the chain moves on to the next provider.",
    )
    api_keys: str = Field(
        "",
        repr=False,
        description="API_KEYS: comma-separated `sha256(key):owner:role+role` entries (roles: client, admin, "
        "raw_workflows, runner); empty with no API_KEYS_FILE = open local mode (refused in production).",
    )
    api_keys_file: Path | None = Field(
        None, description="API_KEYS_FILE: a file of API_KEYS entries, one a line."
    )
    rate_limit_per_minute: int = Field(
        600,
        ge=1,
        description="RATE_LIMIT_PER_MINUTE: requests a minute per API key owner, per API instance "
        "(the gateway's key quota is the global limit); runner keys are not limited.",
    )
    rate_limit_burst: int = Field(
        60, ge=1, description="RATE_LIMIT_BURST: requests an API key owner may make at once before the limit."
    )
    webhook_secret: str = Field(
        "",
        repr=False,
        description="WEBHOOK_SECRET: Standard Webhooks signing secret (whsec_<base64>); empty = unsigned "
        "(refused when APP_ENV=production).",
    )
    webhook_max_attempts: int = Field(
        5, ge=1, le=20, description="WEBHOOK_MAX_ATTEMPTS: deliveries per webhook (exponential backoff)."
    )
    fetch_allow_loopback: bool = Field(
        False,
        description="FETCH_ALLOW_LOOPBACK: let input URLs point at 127.0.0.0/8 (local demos and tests only; "
        "refused when APP_ENV=production).",
    )

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret(cls, value: str) -> str:
        if value:
            import base64
            import binascii

            try:
                base64.b64decode(value.removeprefix("whsec_"), validate=True)
            except binascii.Error:
                raise ValueError("must be whsec_ followed by base64") from None
        return value

    @model_validator(mode="after")
    def _production_rules(self) -> Settings:
        """APP_ENV=production refuses what is only for one machine. Checked on the whole
        object, after every field, so no rule depends on the order the fields are declared in."""
        if self.app_env != "production":
            return self
        problems = []
        if self.fetch_allow_loopback:
            problems.append("FETCH_ALLOW_LOOPBACK must be false")
        if not self.api_keys and not self.api_keys_file:
            problems.append("API_KEYS or API_KEYS_FILE is required (no open access)")
        if not self.webhook_secret:
            problems.append("WEBHOOK_SECRET is required (webhooks are signed)")
        if problems:
            raise ValueError("APP_ENV=production: " + "; ".join(problems))
        return self

    # --- derived values ---------------------------------------------------------------
    @property
    def fallback_providers(self) -> list[str]:
        return list(self.storage_fallback)

    @property
    def environments(self) -> list[str]:
        return list(self.runner_environments)

    @property
    def effective_runner_url(self) -> str:
        return (self.runner_url or f"http://{self.runner_host}:{self.runner_port}").rstrip("/")

    @property
    def effective_local_storage_base_url(self) -> str:
        return (self.local_storage_base_url or f"http://{self.api_host}:{self.api_port}/results").rstrip("/")

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "tasks.sqlite3"


@functools.cache
def get_settings() -> Settings:
    """The process's settings; a bad value exits with a message naming the variable."""
    try:
        return Settings()
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            # A field's error names its variable; a whole-object rule names them in its message.
            prefix = f"{str(error['loc'][0]).upper()}: " if error["loc"] else ""
            lines.append(f"  {prefix}{error['msg']}")
        sys.stderr.write("comfyswap: invalid settings:\n" + "\n".join(lines) + "\n")
        raise SystemExit(2) from None


def reset_settings_cache() -> None:
    """Forget the cached settings (tests change the environment between cases)."""
    get_settings.cache_clear()
