# Variables, alphabetical. Every variable is typed and described; objects use optional()
# defaults so a tfvars file only names what it changes.

variable "alert_notification_channels" {
  description = "Cloud Monitoring notification channel ids (projects/P/notificationChannels/N) that the alert policies notify. Empty = alerts open incidents without notifying anyone."
  type        = list(string)
  default     = []
  nullable    = false
  validation {
    condition     = alltrue([for channel in var.alert_notification_channels : can(regex("^projects/[^/]+/notificationChannels/[0-9]+$", channel))])
    error_message = "Each alert_notification_channels entry must look like projects/PROJECT/notificationChannels/NUMBER."
  }
}

variable "api_key_digests" {
  description = "Extra API_KEYS entries (sha256(key):owner:role+role, as printed by the comfyswap CLI) for keys made outside Terraform. They only pass the gateway when gateway.api_key_required = false, since the gateway accepts Google API keys only."
  type        = list(string)
  default     = []
  nullable    = false
  validation {
    condition     = alltrue([for entry in var.api_key_digests : can(regex("^[0-9a-f]{64}:[^:,]+:(client|admin|raw_workflows|runner)(\\+(client|admin|raw_workflows|runner))*$", entry))])
    error_message = "Each api_key_digests entry must be sha256hex:owner:role+role with roles among client, admin, raw_workflows, runner."
  }
}

variable "api_keys" {
  description = "Client API keys, by short name: Google API keys restricted to this gateway, which the backends also accept (their digests go into API_KEYS with owner, default the name, and roles: client, admin, raw_workflows, runner). The key strings are never output: read one with `gcloud services api-keys get-key-string`."
  type = map(object({
    display_name = optional(string)
    owner        = optional(string)
    roles        = optional(list(string), ["client"])
  }))
  default  = {}
  nullable = false
  validation {
    condition     = alltrue([for name in keys(var.api_keys) : can(regex("^[a-z][a-z0-9-]{0,40}$", name))])
    error_message = "api_keys names must be lowercase letters, digits and hyphens, starting with a letter, at most 41 characters."
  }
  validation {
    condition     = alltrue([for key in values(var.api_keys) : length(key.roles) > 0 && alltrue([for role in key.roles : contains(["client", "admin", "raw_workflows", "runner"], role)])])
    error_message = "api_keys roles must be a non-empty list among client, admin, raw_workflows, runner."
  }
  validation {
    condition     = alltrue([for key in values(var.api_keys) : key.owner == null || can(regex("^[^:,]+$", coalesce(key.owner, "x")))])
    error_message = "api_keys owner must not contain ':' or ','."
  }
}

variable "app_env" {
  description = "APP_ENV of the functions and the runner: development, test, staging or production (production refuses keyless access)."
  type        = string
  default     = "production"
  validation {
    condition     = contains(["development", "test", "staging", "production"], var.app_env)
    error_message = "app_env must be one of development, test, staging, production."
  }
}

variable "cf_images" {
  description = "Cloudflare Images settings (non-secret part; the API token is the secret cf-images-api-token). Used when storage_provider or storage_fallback names cf_images."
  type = object({
    account_id      = optional(string, "")
    delivery_domain = optional(string, "")
  })
  default  = {}
  nullable = false
}

variable "comfyui" {
  description = "ComfyUI co-located in the runner container: enabled = the supervisor starts it and the runner serves the `comm` environment; url and client_id become COMFYUI_URL and COMFYUI_CLIENT_ID."
  type = object({
    client_id = optional(string, "comfyswap-runner")
    enabled   = optional(bool, true)
    url       = optional(string, "http://127.0.0.1:8188")
  })
  default  = {}
  nullable = false
  validation {
    condition     = can(regex("^https?://", var.comfyui.url))
    error_message = "comfyui.url must be an http(s) URL, e.g. http://127.0.0.1:8188."
  }
}

variable "deletion_protection" {
  description = "Protect the Firestore database, the Cloud Run runner and non-empty buckets from `terraform destroy`. Set to false and apply before tearing down."
  type        = bool
  default     = true
  nullable    = false
}

variable "engine_slots" {
  description = "ENGINE_SLOTS: concurrent jobs per engine in one runner instance; also the runner's max concurrent requests and, times runner_max_instances, the queue's concurrency."
  type        = number
  default     = 1
  nullable    = false
  validation {
    condition     = var.engine_slots >= 1 && var.engine_slots <= 16 && floor(var.engine_slots) == var.engine_slots
    error_message = "engine_slots must be a whole number from 1 to 16 (the runner's ENGINE_SLOTS range)."
  }
}

variable "face_swap" {
  description = "Face swap engine of the runner: engine (FACE_SWAP_ENGINE: cpu, facefusion or facefusion_api), api_url (FACE_SWAP_API_URL, for facefusion_api), timeout_s and retry_count per call."
  type = object({
    api_url     = optional(string, "http://127.0.0.1:8000")
    engine      = optional(string, "facefusion")
    retry_count = optional(number, 3)
    timeout_s   = optional(number, 120)
  })
  default  = {}
  nullable = false
  validation {
    condition     = contains(["cpu", "facefusion", "facefusion_api"], var.face_swap.engine)
    error_message = "face_swap.engine must be one of cpu, facefusion, facefusion_api."
  }
  validation {
    condition     = var.face_swap.retry_count >= 1 && var.face_swap.retry_count <= 10 && var.face_swap.timeout_s > 0
    error_message = "face_swap.retry_count must be 1-10 and face_swap.timeout_s greater than 0."
  }
}

variable "firestore" {
  description = "Firestore (native mode) holding the tasks: database id, collection, and location (null = region; nam5 or eur3 for a multi-region)."
  type = object({
    collection = optional(string, "tasks")
    database   = optional(string, "(default)")
    location   = optional(string)
  })
  default  = {}
  nullable = false
  validation {
    condition     = can(regex("^[a-z][a-z0-9_-]{0,62}$", var.firestore.collection))
    error_message = "firestore.collection must start with a lowercase letter and hold only lowercase letters, digits, '_' and '-'."
  }
  validation {
    condition     = var.firestore.database == "(default)" || can(regex("^[a-z][a-z0-9-]{2,61}[a-z0-9]$", var.firestore.database))
    error_message = "firestore.database must be \"(default)\" or 4-63 lowercase letters, digits and hyphens."
  }
}

variable "functions" {
  description = "Sizing shared by the three HTTPS functions (create_task, get_task, fetch_task): concurrency = requests one instance serves at once (each `?wait=` or runner fetch long poll holds one for up to 25 s; Cloud Functions needs cpu >= 1 for concurrency > 1), cpu, memory, instance counts and timeout."
  type = object({
    concurrency   = optional(number, 80)
    cpu           = optional(string, "1")
    max_instances = optional(number, 20)
    memory        = optional(string, "512Mi")
    min_instances = optional(number, 0)
    timeout_s     = optional(number, 60)
  })
  default  = {}
  nullable = false
  validation {
    condition     = var.functions.min_instances >= 0 && var.functions.max_instances >= max(1, var.functions.min_instances)
    error_message = "functions.max_instances must be at least 1 and at least functions.min_instances."
  }
  validation {
    condition     = var.functions.timeout_s >= 1 && var.functions.timeout_s <= 3600
    error_message = "functions.timeout_s must be between 1 and 3600 seconds."
  }
  validation {
    # https://cloud.google.com/functions/docs/configuring/concurrency
    condition     = var.functions.concurrency >= 1 && var.functions.concurrency <= 1000 && (var.functions.concurrency == 1 || tonumber(var.functions.cpu) >= 1)
    error_message = "functions.concurrency must be 1-1000, and above 1 only with functions.cpu at least 1 (a Cloud Functions requirement)."
  }
}

variable "gateway" {
  description = "API Gateway in front of the functions and the runner: api_key_required (x-api-key checked by the gateway on client routes; routes that may reach the GPU runner always need one), runner_ops (route the runner's status and ComfyUI routes to the runner: any client key then wakes a GPU instance; false = get_task answers them), region (null = region; API Gateway exists in fewer regions than Cloud Run), deadline_s per backend call and process_deadline_s for the synchronous POST /api/face-swap/process."
  type = object({
    api_key_required   = optional(bool, true)
    deadline_s         = optional(number, 60)
    process_deadline_s = optional(number, 600)
    region             = optional(string)
    runner_ops         = optional(bool, false)
  })
  default  = {}
  nullable = false
  validation {
    condition     = var.gateway.deadline_s > 0 && var.gateway.process_deadline_s >= var.gateway.deadline_s
    error_message = "gateway.deadline_s must be positive and gateway.process_deadline_s at least gateway.deadline_s."
  }
}

variable "gpu_type" {
  description = "GPU of the runner: on Cloud Run the node_selector accelerator (nvidia-l4, nvidia-rtx-pro-6000); on a VM the guest accelerator type (nvidia-l4 needs a g2 machine type, nvidia-tesla-t4 an n1)."
  type        = string
  default     = "nvidia-l4"
  nullable    = false
  validation {
    condition     = contains(["nvidia-l4", "nvidia-rtx-pro-6000", "nvidia-tesla-t4"], var.gpu_type)
    error_message = "gpu_type must be nvidia-l4, nvidia-rtx-pro-6000 (Cloud Run) or nvidia-tesla-t4 (VM only)."
  }
}

variable "labels" {
  description = "Labels added to every resource that takes labels."
  type        = map(string)
  default     = {}
  nullable    = false
}

variable "log_level" {
  description = "LOG_LEVEL of the functions and the runner."
  type        = string
  default     = "INFO"
  nullable    = false
  validation {
    condition     = contains(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], var.log_level)
    error_message = "log_level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL."
  }
}

variable "models_bucket" {
  description = "Existing GCS bucket holding engine models, mounted read-only at /models in the runner. null = create PREFIX-models-PROJECT."
  type        = string
  default     = null
}

variable "prefix" {
  description = "Prefix of every resource name (no random suffixes): lowercase letters, digits and hyphens."
  type        = string
  nullable    = false
  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,14}[a-z0-9]$", var.prefix))
    error_message = "prefix must be 2-16 characters: a lowercase letter first, then lowercase letters, digits or hyphens, not ending in a hyphen (service account ids are at most 30 characters)."
  }
}

variable "project_id" {
  description = "Id of the Google Cloud project to deploy into."
  type        = string
  nullable    = false
  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project_id))
    error_message = "project_id must be a project id (6-30 lowercase letters, digits, hyphens), not a project name or number."
  }
}

variable "public_results" {
  description = "false (default): the results bucket enforces public access prevention and the runner returns signed URLs (SIGNED_URLS=true). true: prevention is inherited and plain object URLs are returned; this module still grants no public access, so make the objects readable yourself (e.g. a CDN or a reviewed IAM grant). Inputs sent as data: (people's photos) then go to a private inputs bucket of their own (INPUTS_BUCKET), since a bucket anyone may read is listable by anyone."
  type        = bool
  default     = false
  nullable    = false
}

variable "queue" {
  description = "Cloud Tasks push dispatch: shards (N queues; a task goes to the one a hash of its environment and id picks, CLOUD_TASKS_QUEUES; one queue dispatches at most 500 tasks/s, so 1,000 tasks/s needs at least 2, see docs/scale.md), dispatch_deadline_s (how long Cloud Tasks waits for the runner's answer: 15-1800 s, and it must outlast task_limits.timeout_s plus transfers) and the retry policy. Busy runners answer 429/503 and Cloud Tasks backs off, so attempts here count deliveries, not engine runs (those are bounded by task_limits.max_attempts)."
  type = object({
    shards               = optional(number, 1)
    dispatch_deadline_s  = optional(number, 1800)
    max_attempts         = optional(number, 100)
    max_backoff_s        = optional(number, 300)
    max_doublings        = optional(number, 5)
    max_retry_duration_s = optional(number, 86400)
    min_backoff_s        = optional(number, 5)
  })
  default  = {}
  nullable = false
  validation {
    condition     = var.queue.max_attempts >= 1 && var.queue.min_backoff_s >= 0.1 && var.queue.max_backoff_s >= var.queue.min_backoff_s
    error_message = "queue.max_attempts must be at least 1, queue.min_backoff_s at least 0.1 and queue.max_backoff_s at least queue.min_backoff_s."
  }
  validation {
    # Queues per project: 1,000 by default (Cloud Tasks quotas and limits,
    # https://cloud.google.com/tasks/docs/quotas); leave room for other queues.
    condition     = var.queue.shards >= 1 && var.queue.shards <= 100 && floor(var.queue.shards) == var.queue.shards
    error_message = "queue.shards must be a whole number from 1 to 100."
  }
  validation {
    # Task.dispatch_deadline of HTTP targets: 15 s to 30 min.
    # https://cloud.google.com/tasks/docs/reference/rest/v2/projects.locations.queues.tasks#Task
    condition     = var.queue.dispatch_deadline_s >= 15 && var.queue.dispatch_deadline_s <= 1800
    error_message = "queue.dispatch_deadline_s must be between 15 and 1800 seconds (Cloud Tasks' limits for HTTP targets)."
  }
}

variable "r2" {
  description = "Cloudflare R2 settings (non-secret part; the keys are the secrets r2-access-key and r2-secret-key). Used when storage_provider or storage_fallback names r2."
  type = object({
    account_id    = optional(string, "")
    bucket_name   = optional(string, "")
    public_domain = optional(string, "")
  })
  default  = {}
  nullable = false
}

variable "reaper" {
  description = "Cloud Scheduler job that re-dispatches tasks whose lease expired: cron schedule, target (the function serving POST /internal/reap) and path. The job authenticates with an OIDC token of its own service account, which the function checks (REAPER_INVOKER_EMAIL); no API key is involved."
  type = object({
    path      = optional(string, "/internal/reap")
    schedule  = optional(string, "*/2 * * * *")
    target    = optional(string, "get_task")
    time_zone = optional(string, "Etc/UTC")
  })
  default  = {}
  nullable = false
  validation {
    # Only get_task routes POST /internal/reap (functions/get_task/main.py); any other
    # target would 404 on every run, silently.
    condition     = contains(["get_task"], var.reaper.target)
    error_message = "reaper.target must be get_task, the only function that serves POST /internal/reap."
  }
  validation {
    condition     = startswith(var.reaper.path, "/")
    error_message = "reaper.path must start with '/'."
  }
}

variable "region" {
  description = "Region of the functions, the queue, the runner and the buckets. Cloud Run L4 GPUs exist only in some regions (e.g. us-central1, europe-west1, europe-west4, asia-southeast1)."
  type        = string
  default     = "us-central1"
  nullable    = false
  validation {
    condition     = can(regex("^[a-z]+-[a-z]+[0-9]$", var.region))
    error_message = "region must be a Google Cloud region such as us-central1."
  }
}

variable "result_retention_days" {
  description = "Results (and uploaded inputs) are deleted from the results bucket this many days after upload."
  type        = number
  default     = 7
  nullable    = false
  validation {
    condition     = var.result_retention_days >= 1 && var.result_retention_days <= 3650
    error_message = "result_retention_days must be between 1 and 3650."
  }
}

variable "results_bucket" {
  description = "The results bucket: location (null = region) and storage class."
  type = object({
    location      = optional(string)
    storage_class = optional(string, "STANDARD")
  })
  default  = {}
  nullable = false
  validation {
    condition     = contains(["STANDARD", "NEARLINE", "COLDLINE", "ARCHIVE"], var.results_bucket.storage_class)
    error_message = "results_bucket.storage_class must be STANDARD, NEARLINE, COLDLINE or ARCHIVE."
  }
}

variable "runner" {
  description = "Cloud Run runner service: cpu and memory limits (Cloud Run's GPU minimums: an L4 needs at least 4 CPU and 16Gi, an RTX PRO 6000 20 CPU and 80Gi), ingress (all = reachable by the gateway, still IAM-authenticated; internal = Cloud Tasks and Scheduler only, the gateway's runner routes then fail), gpu_zonal_redundancy (false = cheaper, best-effort failover), timeout_s per request."
  type = object({
    cpu                  = optional(string, "8")
    gpu_zonal_redundancy = optional(bool, false)
    ingress              = optional(string, "all")
    memory               = optional(string, "32Gi")
    timeout_s            = optional(number, 3600)
  })
  default  = {}
  nullable = false
  validation {
    condition     = contains(["all", "internal"], var.runner.ingress)
    error_message = "runner.ingress must be all or internal."
  }
  validation {
    condition     = var.runner.timeout_s >= 1 && var.runner.timeout_s <= 3600
    error_message = "runner.timeout_s must be between 1 and 3600 seconds (Cloud Run's limit)."
  }
  validation {
    condition     = can(regex("^[0-9]+$", var.runner.cpu)) && can(regex("^[0-9]+Gi$", var.runner.memory))
    error_message = "runner.cpu must be a whole number of CPUs (e.g. \"8\") and runner.memory a number of GiB (e.g. \"32Gi\")."
  }
  validation {
    # Cloud Run GPU minimums: L4 4 CPU / 16 GiB, RTX PRO 6000 20 CPU / 80 GiB.
    # https://cloud.google.com/run/docs/configuring/services/gpu
    condition = var.runner_mode != "cloud_run" || !can(regex("^[0-9]+Gi$", var.runner.memory)) || (
      tonumber(var.runner.cpu) >= lookup({ "nvidia-l4" = 4, "nvidia-rtx-pro-6000" = 20 }, var.gpu_type, 0) &&
      tonumber(trimsuffix(var.runner.memory, "Gi")) >= lookup({ "nvidia-l4" = 16, "nvidia-rtx-pro-6000" = 80 }, var.gpu_type, 0)
    )
    error_message = "runner.cpu and runner.memory are below Cloud Run's minimum for gpu_type: nvidia-l4 needs 4 CPU and 16Gi, nvidia-rtx-pro-6000 20 CPU and 80Gi."
  }
  validation {
    # A push delivery is one request: Cloud Run must not cut it before Cloud Tasks' deadline.
    condition     = var.runner_mode != "cloud_run" || var.runner.timeout_s >= var.queue.dispatch_deadline_s
    error_message = "runner.timeout_s must be at least queue.dispatch_deadline_s: Cloud Run would end a push request Cloud Tasks still waits for."
  }
}

variable "runner_image" {
  description = "Runner container image, e.g. us-central1-docker.pkg.dev/PROJECT/PREFIX-images/runner:TAG (build it from gpu_runner/Dockerfile; see docs/deploy.md)."
  type        = string
  nullable    = false
  validation {
    condition     = can(regex("^[a-z0-9.-]+(:[0-9]+)?/[^ ]+(:[A-Za-z0-9._-]+|@sha256:[0-9a-f]{64})$", var.runner_image))
    error_message = "runner_image must be a full image reference with a tag or digest, e.g. us-central1-docker.pkg.dev/PROJECT/REPO/runner:v1."
  }
}

variable "runner_max_instances" {
  description = "Most runner instances (Cloud Run max instances, or the number of GPU VMs). Bounded by your GPU quota."
  type        = number
  default     = 1
  nullable    = false
  validation {
    condition     = var.runner_max_instances >= 1 && var.runner_max_instances <= 100 && floor(var.runner_max_instances) == var.runner_max_instances
    error_message = "runner_max_instances must be a whole number from 1 to 100."
  }
}

variable "runner_min_instances" {
  description = "Runner instances kept warm on Cloud Run (each one bills its GPU all the time). 0 = scale to zero."
  type        = number
  default     = 0
  nullable    = false
  validation {
    condition     = var.runner_min_instances >= 0 && var.runner_min_instances <= var.runner_max_instances
    error_message = "runner_min_instances must be between 0 and runner_max_instances."
  }
}

variable "runner_mode" {
  description = "Where the runner runs: cloud_run (Cloud Run GPU service, push dispatch through Cloud Tasks) or vm (GPU Compute Engine VMs in pull mode)."
  type        = string
  default     = "cloud_run"
  nullable    = false
  validation {
    condition     = contains(["cloud_run", "vm"], var.runner_mode)
    error_message = "runner_mode must be cloud_run or vm."
  }
}

variable "runner_pools" {
  description = "GPU runner pools, by name (a short lowercase name: it ends up in service, queue and service account names): each is a runner in its own region (region, null = region) with its own Cloud Tasks queues (queue_shards, null = queue.shards), GPU (gpu_type, null = gpu_type), instances (min_instances and max_instances, null = runner_min_instances and runner_max_instances), the environments it serves (empty = all; an environment served by one pool only is pinned to it) and weight (its share of the other tasks; 0 = fallback only). Push dispatch tries a task's pools in a weighted hash order and falls over to the next when a region's queue refuses it (RUNNER_POOLS, shared/pools.py). The pool named primary keeps the single-region names and state addresses: keep it for an existing deployment. vm mode: each pool is max_instances VMs in its region (zone, null = runner_vm.zone for primary, else the GPU zone table in runner.tf) pulling its environments."
  type = map(object({
    environments  = optional(list(string), [])
    gpu_type      = optional(string)
    max_instances = optional(number)
    min_instances = optional(number)
    queue_shards  = optional(number)
    region        = optional(string)
    weight        = optional(number, 1)
    zone          = optional(string)
  }))
  default  = { primary = {} }
  nullable = false
  # Cloud Run bounds a service's instances by the region's CPU, memory and GPU quotas,
  # not by a fixed number (https://cloud.google.com/run/docs/configuring/max-instances-limits).
  validation {
    # Service account ids are at most 30 characters: PREFIX(16)-run-NAME.
    condition     = length(var.runner_pools) >= 1 && length(var.runner_pools) <= 10 && alltrue([for name in keys(var.runner_pools) : can(regex("^[a-z][a-z0-9]{0,8}$", name))])
    error_message = "runner_pools must name 1 to 10 pools, each 1-9 lowercase letters or digits starting with a letter (e.g. primary, eu, asia)."
  }
  validation {
    condition     = alltrue([for pool in values(var.runner_pools) : pool.region == null || can(regex("^[a-z]+-[a-z]+[0-9]+$", coalesce(pool.region, "x")))])
    error_message = "runner_pools region must be a Google Cloud region such as europe-west4 (or null for region)."
  }
  validation {
    condition     = alltrue([for pool in values(var.runner_pools) : pool.weight >= 0 && pool.weight <= 1000 && floor(pool.weight) == pool.weight]) && sum([for pool in values(var.runner_pools) : pool.weight]) > 0
    error_message = "runner_pools weight must be a whole number from 0 to 1000, and at least one pool needs a weight above 0 (0 = fallback only)."
  }
  validation {
    condition = alltrue([for pool in values(var.runner_pools) : (
      coalesce(pool.max_instances, var.runner_max_instances) >= 1 && coalesce(pool.max_instances, var.runner_max_instances) <= (var.runner_mode == "cloud_run" ? 5000 : 100) &&
      floor(coalesce(pool.max_instances, var.runner_max_instances)) == coalesce(pool.max_instances, var.runner_max_instances) &&
      coalesce(pool.min_instances, var.runner_min_instances) >= 0 &&
      coalesce(pool.min_instances, var.runner_min_instances) <= coalesce(pool.max_instances, var.runner_max_instances)
    )])
    error_message = "runner_pools max_instances must be a whole number from 1 to 5000 on Cloud Run (its real bound is the region's GPU quota) or 1 to 100 VMs per pool, and min_instances between 0 and max_instances."
  }
  validation {
    # Queues per project: 1,000 by default (Cloud Tasks quotas); this deployment takes at most 100.
    condition = alltrue([for pool in values(var.runner_pools) : coalesce(pool.queue_shards, var.queue.shards) >= 1 && floor(coalesce(pool.queue_shards, var.queue.shards)) == coalesce(pool.queue_shards, var.queue.shards)]) && sum([
      for pool in values(var.runner_pools) : coalesce(pool.queue_shards, var.queue.shards)
    ]) <= 100
    error_message = "runner_pools queue_shards must be whole numbers of at least 1, and all pools together at most 100 queues."
  }
  validation {
    condition     = alltrue([for pool in values(var.runner_pools) : contains(["nvidia-l4", "nvidia-rtx-pro-6000", "nvidia-tesla-t4"], coalesce(pool.gpu_type, var.gpu_type))])
    error_message = "runner_pools gpu_type must be nvidia-l4, nvidia-rtx-pro-6000 (Cloud Run) or nvidia-tesla-t4 (VM only)."
  }
  validation {
    # Cloud Run GPU regions (https://cloud.google.com/run/docs/configuring/services/gpu,
    # "Supported regions", read 2026-12): L4 in these six (asia-south1 by invitation).
    # The RTX PRO 6000 is in Preview and its regions change; Cloud Run checks those at
    # apply. T4s exist on VMs only.
    condition = var.runner_mode != "cloud_run" || alltrue([for pool in values(var.runner_pools) : (
      coalesce(pool.gpu_type, var.gpu_type) == "nvidia-rtx-pro-6000" ||
      (coalesce(pool.gpu_type, var.gpu_type) == "nvidia-l4" && contains(["asia-south1", "asia-southeast1", "europe-west1", "europe-west4", "us-central1", "us-east4"], coalesce(pool.region, var.region)))
    )])
    error_message = "runner_pools: Cloud Run offers nvidia-l4 GPUs only in asia-south1, asia-southeast1, europe-west1, europe-west4, us-central1 and us-east4 (and nvidia-tesla-t4 not at all): move the pool or use runner_mode = \"vm\"."
  }
  validation {
    condition = var.runner_mode != "cloud_run" || !can(regex("^[0-9]+Gi$", var.runner.memory)) || !can(tonumber(var.runner.cpu)) || alltrue([for pool in values(var.runner_pools) : (
      tonumber(var.runner.cpu) >= lookup({ "nvidia-l4" = 4, "nvidia-rtx-pro-6000" = 20 }, coalesce(pool.gpu_type, var.gpu_type), 0) &&
      tonumber(trimsuffix(var.runner.memory, "Gi")) >= lookup({ "nvidia-l4" = 16, "nvidia-rtx-pro-6000" = 80 }, coalesce(pool.gpu_type, var.gpu_type), 0)
    )])
    error_message = "runner.cpu and runner.memory are below Cloud Run's minimum for a pool's gpu_type: nvidia-l4 needs 4 CPU and 16Gi, nvidia-rtx-pro-6000 20 CPU and 80Gi."
  }
  validation {
    condition     = alltrue([for pool in values(var.runner_pools) : alltrue([for environment in pool.environments : can(regex("^[a-z][a-z0-9_]{0,39}$", environment))])])
    error_message = "runner_pools environments must be environment names such as face_swap or comm."
  }
  validation {
    # Every environment the runner serves needs a pool, or its tasks would wait forever.
    condition = alltrue([for environment in(var.comfyui.enabled ? ["face_swap", "comm"] : ["face_swap"]) : anytrue([
      for pool in values(var.runner_pools) : length(pool.environments) == 0 || contains(pool.environments, environment)
    ])])
    error_message = "runner_pools: every environment (face_swap, and comm while comfyui.enabled) must be served by some pool (a pool with environments = [] serves all)."
  }
  validation {
    condition     = alltrue([for pool in values(var.runner_pools) : pool.zone == null || can(regex("^[a-z]+-[a-z]+[0-9]+-[a-z]$", coalesce(pool.zone, "x")))])
    error_message = "runner_pools zone must be a zone of the pool's region such as europe-west4-a (or null)."
  }
}

variable "runner_vm" {
  description = "GPU VM settings (runner_mode = vm): zone (null = a zone of the region that offers gpu_type, from the table in runner.tf; set it for regions not in the table; the primary pool's, other runner_pools set their own), machine type matching gpu_type, boot disk size, network, subnetwork (the primary pool's; other pools use the network's subnet in their region), and whether it gets an external IP (it only needs egress; without one, give the subnet Cloud NAT)."
  type = object({
    boot_disk_size_gb = optional(number, 200)
    external_ip       = optional(bool, true)
    image             = optional(string, "cos-cloud/cos-stable")
    machine_type      = optional(string, "g2-standard-8")
    network           = optional(string, "default")
    subnetwork        = optional(string)
    zone              = optional(string)
  })
  default  = {}
  nullable = false
  validation {
    condition     = var.runner_vm.boot_disk_size_gb >= 50
    error_message = "runner_vm.boot_disk_size_gb must be at least 50 (the runner image alone is over 10 GB)."
  }
}

variable "secret_values" {
  description = "Secret values Terraform should store as secret versions, by secret id (cf-images-api-token, r2-access-key, r2-secret-key, webhook-signing-secret). They end up in the state: prefer adding versions out of band and listing them in secrets_out_of_band. Use {} for none."
  type        = map(string)
  sensitive   = true
  nullable    = false
  validation {
    condition     = alltrue([for id in keys(var.secret_values) : contains(["cf-images-api-token", "r2-access-key", "r2-secret-key", "webhook-signing-secret"], id)])
    error_message = "secret_values keys must be among cf-images-api-token, r2-access-key, r2-secret-key, webhook-signing-secret."
  }
}

variable "secrets_out_of_band" {
  description = "Secret ids whose versions you add yourself (gcloud secrets versions add). A secret is mounted into its consumers only when it has a version: from secret_values or listed here."
  type        = list(string)
  default     = []
  nullable    = false
  validation {
    condition     = alltrue([for id in var.secrets_out_of_band : contains(["cf-images-api-token", "r2-access-key", "r2-secret-key", "webhook-signing-secret"], id)])
    error_message = "secrets_out_of_band entries must be among cf-images-api-token, r2-access-key, r2-secret-key, webhook-signing-secret."
  }
}

variable "storage_fallback" {
  description = "STORAGE_FALLBACK: providers tried, in order, after storage_provider fails (or cannot take the file, e.g. a video for cf_images)."
  type        = list(string)
  default     = []
  nullable    = false
  validation {
    condition     = alltrue([for provider in var.storage_fallback : contains(["gcs", "r2", "cf_images"], provider)])
    error_message = "storage_fallback entries must be among gcs, r2, cf_images (local storage does not survive a Cloud Run instance)."
  }
}

variable "storage_provider" {
  description = "STORAGE_PROVIDER: where results are uploaded: gcs (the results bucket), r2 or cf_images."
  type        = string
  default     = "gcs"
  nullable    = false
  validation {
    condition     = contains(["gcs", "r2", "cf_images"], var.storage_provider)
    error_message = "storage_provider must be gcs, r2 or cf_images (local storage does not survive a Cloud Run instance)."
  }
}

variable "task_limits" {
  description = "Task limits read by functions and runner: lease_seconds (LEASE_SECONDS, renewed by heartbeat), max_attempts (MAX_ATTEMPTS: engine runs before FAILED) and timeout_s (TASK_TIMEOUT_S: engine time per task; in cloud_run mode at most queue.dispatch_deadline_s - 300, the delivery also covers downloads and the upload)."
  type = object({
    lease_seconds = optional(number, 60)
    max_attempts  = optional(number, 3)
    timeout_s     = optional(number, 1500)
  })
  default  = {}
  nullable = false
  validation {
    condition     = var.task_limits.lease_seconds >= 5 && var.task_limits.lease_seconds <= 3600
    error_message = "task_limits.lease_seconds must be between 5 and 3600 (the runner's LEASE_SECONDS range)."
  }
  validation {
    condition     = var.task_limits.max_attempts >= 1 && var.task_limits.max_attempts <= 20 && var.task_limits.timeout_s > 0
    error_message = "task_limits.max_attempts must be 1-20 and task_limits.timeout_s greater than 0."
  }
  validation {
    # The push handler runs the task inside the Cloud Tasks delivery: if the delivery's
    # deadline passes first, Cloud Tasks redelivers a task that is still running.
    # 300 s covers the input downloads (FETCH_TIMEOUT_S each) and the result upload.
    condition     = var.runner_mode != "cloud_run" || var.task_limits.timeout_s + 300 <= var.queue.dispatch_deadline_s
    error_message = "task_limits.timeout_s + 300 s of transfers must fit in queue.dispatch_deadline_s (at most 1800) in cloud_run mode; longer tasks need runner_mode = \"vm\" (pull mode has no delivery deadline)."
  }
}
