# Locals only; resources live in files named by what they hold.

locals {
  # The three HTTPS functions, by the folder name under functions/ (the entry point is
  # the function of the same name in its main.py).
  functions = {
    create_task = { description = "Validate, store and dispatch a task." }
    fetch_task  = { description = "Runner pull: claim the next task with a lease." }
    get_task    = { description = "Read tasks, lists, queue stats and health." }
  }

  # Functions that enqueue Cloud Tasks (dispatch, and re-dispatch by the reaper).
  dispatching_functions = toset(["create_task", var.reaper.target])

  push_mode   = var.runner_mode == "cloud_run"
  runner_port = 8080
  runner_name = "${var.prefix}-runner"
  queue_name  = "${var.prefix}-runner"

  # Runner pools (var.runner_pools) with every default resolved. The pool named primary
  # keeps the single-region names (service, queues, VMs, service accounts) and, by the
  # moved blocks beside each resource, its state addresses: a deployment from before
  # pools plans no replacement. Others are named after the pool (a queue's name may
  # not be reused for 7 days after deletion, so names never depend on the order).
  runner_pools = {
    for name, pool in var.runner_pools : name => {
      environments  = pool.environments
      gpu_type      = coalesce(pool.gpu_type, var.gpu_type)
      max_instances = coalesce(pool.max_instances, var.runner_max_instances)
      min_instances = coalesce(pool.min_instances, var.runner_min_instances)
      queue_name    = name == "primary" ? local.queue_name : "${local.queue_name}-${name}"
      queue_shards  = coalesce(pool.queue_shards, var.queue.shards)
      region        = coalesce(pool.region, var.region)
      runner_name   = name == "primary" ? local.runner_name : "${local.runner_name}-${name}"
      weight        = pool.weight
      zone          = pool.zone != null ? pool.zone : (name == "primary" ? var.runner_vm.zone : null)
    }
  }
  # The pool the gateway's runner routes and the single-queue settings name: primary,
  # else the first by name.
  home_pool = contains(keys(var.runner_pools), "primary") ? "primary" : sort(keys(var.runner_pools))[0]

  # Queues per pool in the dispatcher's order (RUNNER_POOLS queues, hashed by position):
  # shard 0 keeps the pool's queue name (no churn when N grows), shard i is NAME-i.
  queue_names = {
    for name, pool in local.runner_pools : name => [
      for shard in range(pool.queue_shards) : shard == 0 ? pool.queue_name : "${pool.queue_name}-${shard}"
    ]
  }
  # Every queue, keyed by primary's shard number (the keys of the single-region
  # version) or POOL/SHARD. Each asks for its share of its pool's runner slots.
  queues = merge([
    for name, names in local.queue_names : {
      for shard, queue in names : (name == "primary" ? tostring(shard) : "${name}/${shard}") => {
        capacity = ceil(var.engine_slots * local.runner_pools[name].max_instances / length(names))
        name     = queue
        pool     = name
        region   = local.runner_pools[name].region
      }
    }
  ]...)
  # Queue keys per pool, in shard order.
  pool_queue_keys = {
    for name, names in local.queue_names : name => [
      for shard in range(length(names)) : name == "primary" ? tostring(shard) : "${name}/${shard}"
    ]
  }

  # Cloud Run's deterministic URL (https://SERVICE-PROJECT_NUMBER.REGION.run.app): known
  # before the service exists, so each runner can be told its own OIDC audience.
  runner_urls = {
    for name, pool in local.runner_pools : name => local.push_mode ? "https://${pool.runner_name}-${data.google_project.project.number}.${pool.region}.run.app" : ""
  }
  runner_url = local.runner_urls[local.home_pool]
  # The same for the function the reaper schedule calls: the audience of its OIDC token,
  # which the function checks (REAPER_OIDC_AUDIENCE) without referring to itself.
  reaper_audience = "https://${var.prefix}-${replace(var.reaper.target, "_", "-")}-${data.google_project.project.number}.${var.region}.run.app"

  # RUNNER_POOLS entries (shared/pools.py): where each pool's pushes go and as whom.
  runner_pool_settings = {
    for name, pool in local.runner_pools : name => {
      audience      = local.runner_urls[name]
      environments  = pool.environments
      invoker_email = local.push_mode ? google_service_account.tasks_invoker[name].email : ""
      location      = pool.region
      name          = name
      queues        = [for key in local.pool_queue_keys[name] : google_cloud_tasks_queue.runner[key].name]
      runner_url    = local.runner_urls[name]
      weight        = pool.weight
    }
  }

  gateway_region = coalesce(var.gateway.region, var.region)
  gateway_url    = "https://${google_api_gateway_gateway.api.default_hostname}"

  # API_KEYS (shared/auth.py): sha256(key):owner:role+role. The same key string passes
  # the gateway's check (a Google API key) and the application's (its digest here).
  # Digests of random keys reveal nothing, so the env maps stay non-sensitive (a
  # sensitive map cannot drive the runner's dynamic env blocks).
  api_key_entries = concat(
    [for name, key in google_apikeys_key.client : "${sha256(key.key_string)}:${coalesce(var.api_keys[name].owner, name)}:${join("+", var.api_keys[name].roles)}"],
    [for key in google_apikeys_key.runner : "${sha256(key.key_string)}:runner:runner"],
    var.api_key_digests,
  )

  # A conditional, not coalesce(): coalesce evaluates every argument, and models[0] does
  # not exist when models_bucket is set ("Invalid index").
  models_bucket = var.models_bucket != null ? var.models_bucket : one(google_storage_bucket.models[*].name)

  storage_providers = distinct(concat([var.storage_provider], var.storage_fallback))

  # Secret Manager secrets: the env name each is mounted as and who reads it.
  secrets = {
    "cf-images-api-token"    = { env = "CF_IMAGES_API_TOKEN", functions = false, runner = true }
    "r2-access-key"          = { env = "R2_ACCESS_KEY", functions = false, runner = true }
    "r2-secret-key"          = { env = "R2_SECRET_KEY", functions = false, runner = true }
    "runner-api-key"         = { env = "RUNNER_API_KEY", functions = false, runner = true }
    "webhook-signing-secret" = { env = "WEBHOOK_SECRET", functions = true, runner = true }
  }
  # A secret is mounted only once it has a version, else the deploy fails on "latest".
  # Terraform writes runner-api-key itself in vm mode (the pulling runner's key).
  secrets_with_version = setunion(
    nonsensitive(toset(keys(var.secret_values))),
    toset(var.secrets_out_of_band),
    var.runner_mode == "vm" ? toset(["runner-api-key"]) : toset([]),
  )
  function_secret_env = { for id, secret in local.secrets : secret.env => id if secret.functions && contains(local.secrets_with_version, id) }
  runner_secret_env   = { for id, secret in local.secrets : secret.env => id if secret.runner && contains(local.secrets_with_version, id) }

  # Settings read by both the functions and the runner (names: shared/settings.py).
  common_env = {
    API_KEYS                  = nonsensitive(join(",", local.api_key_entries))
    APP_ENV                   = var.app_env
    CF_IMAGES_ACCOUNT_ID      = var.cf_images.account_id
    CF_IMAGES_DELIVERY_DOMAIN = var.cf_images.delivery_domain
    CLOUD_TASKS_INVOKER_EMAIL = local.runner_pool_settings[local.home_pool].invoker_email
    CLOUD_TASKS_LOCATION      = local.runner_pools[local.home_pool].region
    CLOUD_TASKS_QUEUE         = local.runner_pool_settings[local.home_pool].queues[0]
    CLOUD_TASKS_QUEUES        = join(",", local.runner_pool_settings[local.home_pool].queues)
    DISPATCH_MODE             = local.push_mode ? "push" : "pull"
    FIRESTORE_COLLECTION      = var.firestore.collection
    FIRESTORE_DATABASE        = google_firestore_database.tasks.name
    GCS_BUCKET_NAME           = google_storage_bucket.results.name
    GCS_BUCKET_REGION         = google_storage_bucket.results.location
    INPUTS_BUCKET             = var.public_results ? local.inputs_bucket : ""
    GOOGLE_CLOUD_PROJECT      = var.project_id
    LEASE_SECONDS             = tostring(var.task_limits.lease_seconds)
    LOG_LEVEL                 = var.log_level
    MAX_ATTEMPTS              = tostring(var.task_limits.max_attempts)
    R2_ACCOUNT_ID             = var.r2.account_id
    R2_BUCKET_NAME            = var.r2.bucket_name
    R2_PUBLIC_DOMAIN          = var.r2.public_domain
    RUNNER_OIDC_AUDIENCE      = local.runner_url
    RUNNER_URL                = local.runner_url
    SIGNED_URLS               = var.public_results ? "false" : "true"
    STORAGE_FALLBACK          = join(",", var.storage_fallback)
    STORAGE_PROVIDER          = var.storage_provider
    TASK_STORE                = "firestore"
  }

  function_env = merge(local.common_env, {
    CLOUD_RUN_INVOKER_IAM           = "true"
    CLOUD_TASKS_DISPATCH_DEADLINE_S = tostring(var.queue.dispatch_deadline_s)
    REAPER_INVOKER_EMAIL            = google_service_account.scheduler.email
    REAPER_OIDC_AUDIENCE            = local.reaper_audience
    # Every pool: the functions (create_task, the reaper) dispatch to any region.
    RUNNER_POOLS = local.push_mode ? jsonencode([for name in sort(keys(local.runner_pools)) : local.runner_pool_settings[name]]) : ""
    # functions-framework serves with gunicorn threads (default 4 per CPU): one per
    # request the instance accepts, or long polls queue behind each other.
    THREADS = tostring(var.functions.concurrency)
  })

  # The image starts ComfyUI by default (COMFYUI_COMMAND, gpu_runner/Dockerfile); an
  # empty command turns it off.
  # CLOUD_RUN_INVOKER_IAM: the Cloud Run service keeps invoker IAM on (iam.tf grants
  # run.invoker to the gateway and the Cloud Tasks identity only), so Cloud Run has
  # verified a push's ID token before the runner sees it (docs/deploy.md, "Push tokens").
  runner_env = merge(local.common_env, var.comfyui.enabled ? {} : { COMFYUI_COMMAND = "" }, {
    CLOUD_RUN_INVOKER_IAM = local.push_mode ? "true" : "false"
    COMFYUI_CLIENT_ID     = var.comfyui.client_id
    COMFYUI_URL           = var.comfyui.enabled ? var.comfyui.url : ""
    DATA_DIR              = "/tmp/comfyswap"
    ENGINE_SLOTS          = tostring(var.engine_slots)
    FACE_SWAP_API_URL     = var.face_swap.api_url
    FACE_SWAP_ENGINE      = var.face_swap.engine
    FACE_SWAP_RETRY_COUNT = tostring(var.face_swap.retry_count)
    FACE_SWAP_TIMEOUT     = tostring(var.face_swap.timeout_s)
    RUNNER_HOST           = "0.0.0.0"
    RUNNER_PORT           = tostring(local.runner_port)
    TASK_TIMEOUT_S        = tostring(var.task_limits.timeout_s)
  })

  # What differs per pool. A pool's runner verifies pushes for its own URL and invoker,
  # and re-dispatches (release, retry backoff, expired leases) into its own pool only:
  # its account may enqueue on its own queues alone (iam.tf).
  pool_runner_env = {
    for name, pool in local.runner_pools : name => {
      CLOUD_TASKS_INVOKER_EMAIL = local.runner_pool_settings[name].invoker_email
      CLOUD_TASKS_LOCATION      = pool.region
      CLOUD_TASKS_QUEUE         = local.runner_pool_settings[name].queues[0]
      CLOUD_TASKS_QUEUES        = join(",", local.runner_pool_settings[name].queues)
      RUNNER_ENVIRONMENTS       = local.pool_runner_environments[name]
      RUNNER_OIDC_AUDIENCE      = local.runner_urls[name]
      RUNNER_POOLS              = local.push_mode ? jsonencode([local.runner_pool_settings[name]]) : ""
      RUNNER_URL                = local.runner_urls[name]
    }
  }
  # A pool's runners serve (and in pull mode claim) the pool's environments, else all.
  pool_runner_environments = {
    for name, pool in local.runner_pools : name => length(pool.environments) > 0 ? join(",", pool.environments) : local.served_environments
  }
  # Every environment this deployment serves (a pool that names none serves them all).
  served_environments = var.comfyui.enabled ? "face_swap,comm" : "face_swap"

  # Pull mode on a VM: the runner claims tasks through the gateway (the Cloud Run
  # runner must not read the gateway's URL: the gateway's config depends on the runner).
  vm_runner_env = merge(local.runner_env, {
    TASK_API_URL = "${local.gateway_url}/api"
  })

  # Firestore composite indexes: infra/firestore_indexes.json (written from
  # shared/store/firestore.py REQUIRED_INDEXES) when present, else the same list here.
  firestore_indexes_file = "${path.module}/../firestore_indexes.json"
  firestore_indexes_fallback = [
    [["status", "ASCENDING"], ["environment", "ASCENDING"], ["priority", "DESCENDING"], ["available_at", "ASCENDING"]],
    [["status", "ASCENDING"], ["environment", "ASCENDING"], ["shard", "ASCENDING"], ["priority", "DESCENDING"], ["available_at", "ASCENDING"]],
    [["status", "ASCENDING"], ["environment", "ASCENDING"], ["owner", "ASCENDING"]],
    [["status", "ASCENDING"], ["available_at", "ASCENDING"]],
    [["status", "ASCENDING"], ["lease_expires_at", "ASCENDING"]],
    [["owner", "ASCENDING"], ["created_at", "DESCENDING"]],
    [["status", "ASCENDING"], ["created_at", "DESCENDING"]],
    [["owner", "ASCENDING"], ["status", "ASCENDING"], ["created_at", "DESCENDING"]],
    [["status", "ASCENDING"], ["environment", "ASCENDING"], ["updated_at", "DESCENDING"]],
    [["status", "ASCENDING"], ["created_at", "ASCENDING"]],
    [["owner", "ASCENDING"], ["status", "ASCENDING"], ["created_at", "ASCENDING"]],
  ]
  firestore_index_list = fileexists(local.firestore_indexes_file) ? [
    for index in jsondecode(file(local.firestore_indexes_file)).indexes : {
      collection = index.collectionGroup == "tasks" ? var.firestore.collection : index.collectionGroup
      fields     = [for field in index.fields : [field.fieldPath, field.order]]
    }
    ] : [
    for fields in local.firestore_indexes_fallback : { collection = var.firestore.collection, fields = fields }
  ]
  # Keyed by the field list so adding an index never re-creates the others.
  firestore_indexes = {
    for index in local.firestore_index_list :
    "${index.collection}:${join(",", [for field in index.fields : "${field[0]}-${lower(field[1])}"])}" => index
  }

  # Backends of the public routes (templates/openapi2.yaml.tftpl). Only the runner's
  # routes can wake a GPU instance, so they are kept apart: tests/infra checks that every
  # route whose backend may be the runner needs an API key at the gateway.
  # runner_backend: POST /api/face-swap/process, the synchronous swap (a GPU by design).
  # runner_ops_backend: the runner's read-only and ComfyUI routes; they reach the runner
  # only with gateway.runner_ops = true, else get_task answers those it knows and 404s
  # the rest, so no client key wakes (and bills) a GPU for a status call.
  # In vm mode no runner is reachable from the gateway: both go to get_task.
  function_backends = { for name, function in google_cloudfunctions2_function.api : name => function.service_config[0].uri }
  # The gateway reaches the home pool's runner only (one backend URL per route).
  runner_backend     = local.push_mode ? google_cloud_run_v2_service.runner[local.home_pool].uri : local.function_backends["get_task"]
  runner_ops_backend = local.push_mode && var.gateway.runner_ops ? google_cloud_run_v2_service.runner[local.home_pool].uri : local.function_backends["get_task"]

  labels = merge(var.labels, { app = "comfyswap", prefix = var.prefix })
}
