# Service accounts, one per role, and least-privilege grants: no primitive roles, no
# public members, resource-level bindings wherever the resource allows one.

# --- service accounts ------------------------------------------------------------------

resource "google_service_account" "build" {
  project      = var.project_id
  account_id   = "${var.prefix}-build"
  display_name = "ComfySwap function builds (Cloud Build)"
}

resource "google_service_account" "function" {
  for_each     = local.functions
  project      = var.project_id
  account_id   = "${var.prefix}-${replace(each.key, "_", "-")}"
  display_name = "ComfySwap function ${each.key}"
}

resource "google_service_account" "gateway" {
  project      = var.project_id
  account_id   = "${var.prefix}-gateway"
  display_name = "ComfySwap API Gateway backend caller"
}

# One account per runner pool, so each pool's grants (its queues, its runner) are its
# own. The primary pool keeps the single-region account.
moved {
  from = google_service_account.runner
  to   = google_service_account.runner["primary"]
}

resource "google_service_account" "runner" {
  for_each     = local.runner_pools
  project      = var.project_id
  account_id   = each.key == "primary" ? "${var.prefix}-runner" : "${var.prefix}-run-${each.key}"
  display_name = each.key == "primary" ? "ComfySwap GPU runner" : "ComfySwap GPU runner, pool ${each.key}"
}

resource "google_service_account" "scheduler" {
  project      = var.project_id
  account_id   = "${var.prefix}-scheduler"
  display_name = "ComfySwap lease reaper schedule"
}

# Identity whose OIDC token Cloud Tasks attaches to pushes (CLOUD_TASKS_INVOKER_EMAIL),
# one per pool: it may invoke that pool's runner only.
moved {
  from = google_service_account.tasks_invoker[0]
  to   = google_service_account.tasks_invoker["primary"]
}

resource "google_service_account" "tasks_invoker" {
  for_each     = local.push_mode ? local.runner_pools : {}
  project      = var.project_id
  account_id   = each.key == "primary" ? "${var.prefix}-tasks-invoker" : "${var.prefix}-inv-${each.key}"
  display_name = each.key == "primary" ? "ComfySwap Cloud Tasks push identity" : "ComfySwap Cloud Tasks push identity, pool ${each.key}"
}

# --- builds ----------------------------------------------------------------------------

# The minimal set for a custom function build account (instead of the broader
# roles/cloudbuild.builds.builder), per Cloud Functions' build service account page:
# write build logs (project level: logs have no narrower resource), retrieve the
# sources (storage.objectAdmin, on the sources bucket only), and push the built image
# (artifactregistry.writer on the functions' own repository only: functions.tf sets
# docker_repository, so the account can neither write gcf-artifacts nor overwrite a
# runner image).
resource "google_project_iam_member" "build" {
  for_each = toset(["roles/logging.logWriter"])
  project  = var.project_id
  role     = each.key
  member   = google_service_account.build.member
}

resource "google_storage_bucket_iam_member" "build_sources" {
  bucket = google_storage_bucket.sources.name
  role   = "roles/storage.objectAdmin"
  member = google_service_account.build.member
}

resource "google_artifact_registry_repository_iam_member" "build_functions" {
  project    = var.project_id
  location   = google_artifact_registry_repository.functions.location
  repository = google_artifact_registry_repository.functions.name
  role       = "roles/artifactregistry.writer"
  member     = google_service_account.build.member
}

# --- functions -------------------------------------------------------------------------

resource "google_project_iam_member" "function_datastore" {
  for_each = local.functions
  project  = var.project_id
  role     = "roles/datastore.user"
  member   = google_service_account.function[each.key].member
}

# Who enqueues Cloud Tasks in push mode: create_task and the reaper's function, on every
# pool's queues (they dispatch to any region), and each pool's runner on its own pool's
# queues only (it re-dispatches a task it releases at SIGTERM, schedules a retry's
# backoff as a Cloud Task, and re-queues expired leases every few seconds).
# One grant per enqueuer and queue; the primary pool's shard 0 key is the enqueuer's
# name alone and its shard i WHO/i, as before pools, so no existing grant changes.
locals {
  # Who may enqueue into which pools' queues (variable-only: tests/infra evaluates it).
  enqueuer_pools = local.push_mode ? merge(
    { for name in local.dispatching_functions : name => keys(local.runner_pools) },
    { for pool in keys(local.runner_pools) : (pool == "primary" ? "runner" : "runner-${pool}") => [pool] },
  ) : {}
  enqueuer_members = local.push_mode ? merge(
    { for name in local.dispatching_functions : name => google_service_account.function[name].member },
    { for pool in keys(local.runner_pools) : (pool == "primary" ? "runner" : "runner-${pool}") => google_service_account.runner[pool].member },
  ) : {}
  enqueuer_grants = merge([
    for who, pools in local.enqueuer_pools : {
      for key, queue in local.queues : (key == "0" ? who : "${who}/${key}") => { who = who, queue = key } if contains(pools, queue.pool)
    }
  ]...)
  # actAs on each pool's invoker, once per enqueuer and pool it enqueues into (two
  # iam_member resources for the same binding would remove it for both when one is
  # destroyed); the primary pool's key is the enqueuer's name, as before pools.
  invoker_users = merge([
    for who, pools in local.enqueuer_pools : {
      for pool in pools : (pool == "primary" ? who : "${who}@${pool}") => { who = who, pool = pool }
    }
  ]...)
}

resource "google_cloud_tasks_queue_iam_member" "enqueuer" {
  for_each = local.enqueuer_grants
  project  = var.project_id
  location = google_cloud_tasks_queue.runner[each.value.queue].location
  name     = google_cloud_tasks_queue.runner[each.value.queue].name
  role     = "roles/cloudtasks.enqueuer"
  member   = local.enqueuer_members[each.value.who]
}

# Enqueuing a task with an OIDC token for an invoker requires actAs on it.
resource "google_service_account_iam_member" "acts_as_invoker" {
  for_each           = local.invoker_users
  service_account_id = google_service_account.tasks_invoker[each.value.pool].name
  role               = "roles/iam.serviceAccountUser"
  member             = local.enqueuer_members[each.value.who]
}

# data: and uploaded inputs live under inputs/<task_id>/ (in the results bucket, or the
# inputs bucket when results are public: storage.tf) while their
# task runs (shared/inputs.py): create_task writes them and deletes them on cancel,
# get_task's reaper deletes those of ended tasks (listing the prefix first). Only that
# prefix: an IAM condition on the object name, and on the list prefix for listings
# (Cloud Storage IAM conditions, storage.googleapis.com/objectListPrefix).
resource "google_storage_bucket_iam_member" "function_inputs" {
  for_each = toset(["create_task", "get_task"])
  bucket   = local.inputs_bucket
  role     = "roles/storage.objectUser"
  member   = google_service_account.function[each.key].member

  condition {
    title       = "inputs-only"
    description = "Objects under inputs/ only."
    expression  = "resource.name.startsWith(\"projects/_/buckets/${local.inputs_bucket}/objects/inputs/\") || api.getAttribute(\"storage.googleapis.com/objectListPrefix\", \"\").startsWith(\"inputs/\")"
  }
}

# DELETE /api/tasks/{id} (create_task) removes the task's results as well: the same
# role, limited to results/ (objects and listings).
resource "google_storage_bucket_iam_member" "function_results_delete" {
  bucket = google_storage_bucket.results.name
  role   = "roles/storage.objectUser"
  member = google_service_account.function["create_task"].member

  condition {
    title       = "results-only"
    description = "Objects under results/ only."
    expression  = "resource.name.startsWith(\"projects/_/buckets/${google_storage_bucket.results.name}/objects/results/\") || api.getAttribute(\"storage.googleapis.com/objectListPrefix\", \"\").startsWith(\"results/\")"
  }
}

resource "google_secret_manager_secret_iam_member" "function" {
  for_each = {
    for pair in setproduct(keys(local.functions), [for id, secret in local.secrets : id if secret.functions]) :
    "${pair[0]}/${pair[1]}" => { function = pair[0], secret = pair[1] }
  }
  project   = var.project_id
  secret_id = google_secret_manager_secret.secret[each.value.secret].secret_id
  role      = "roles/secretmanager.secretAccessor"
  member    = google_service_account.function[each.value.function].member
}

# The gateway calls the functions' Cloud Run services with its own ID token.
resource "google_cloud_run_v2_service_iam_member" "gateway_functions" {
  for_each = local.functions
  project  = var.project_id
  location = var.region
  name     = google_cloudfunctions2_function.api[each.key].name
  role     = "roles/run.invoker"
  member   = google_service_account.gateway.member
}

# --- runner ----------------------------------------------------------------------------

# Each pool's runner account gets the same project, bucket and secret roles; the primary
# pool's grants keep their keys (a role, a secret id) and addresses.
locals {
  runner_project_roles = concat(
    ["roles/datastore.user", "roles/logging.logWriter", "roles/monitoring.metricWriter"],
    # The VM pulls its image itself (Cloud Run's service agent pulls for the service).
    var.runner_mode == "vm" ? ["roles/artifactregistry.reader"] : [],
  )
  runner_secret_ids = [for id, secret in local.secrets : id if secret.runner]
}

resource "google_project_iam_member" "runner" {
  for_each = merge([
    for pool in keys(local.runner_pools) : {
      for role in local.runner_project_roles : (pool == "primary" ? role : "${pool}/${role}") => { pool = pool, role = role }
    }
  ]...)
  project = var.project_id
  role    = each.value.role
  member  = google_service_account.runner[each.value.pool].member
}

moved {
  from = google_storage_bucket_iam_member.runner_results
  to   = google_storage_bucket_iam_member.runner_results["primary"]
}

resource "google_storage_bucket_iam_member" "runner_results" {
  for_each = local.runner_pools
  bucket   = google_storage_bucket.results.name
  role     = "roles/storage.objectAdmin"
  member   = google_service_account.runner[each.key].member
}

# The runner reads a task's stored inputs and deletes them when it ends (and sweeps
# leftovers); in the results bucket its objectAdmin grant above covers that.
resource "google_storage_bucket_iam_member" "runner_inputs" {
  for_each = var.public_results ? local.runner_pools : {}
  bucket   = google_storage_bucket.inputs[0].name
  role     = "roles/storage.objectUser"
  member   = google_service_account.runner[each.key].member
}

moved {
  from = google_storage_bucket_iam_member.runner_models
  to   = google_storage_bucket_iam_member.runner_models["primary"]
}

resource "google_storage_bucket_iam_member" "runner_models" {
  for_each = local.runner_pools
  bucket   = local.models_bucket
  role     = "roles/storage.objectViewer"
  member   = google_service_account.runner[each.key].member
}

resource "google_secret_manager_secret_iam_member" "runner" {
  for_each = merge([
    for pool in keys(local.runner_pools) : {
      for id in local.runner_secret_ids : (pool == "primary" ? id : "${pool}/${id}") => { pool = pool, secret = id }
    }
  ]...)
  project   = var.project_id
  secret_id = google_secret_manager_secret.secret[each.value.secret].secret_id
  role      = "roles/secretmanager.secretAccessor"
  member    = google_service_account.runner[each.value.pool].member
}

# Signed result URLs without a key file: each runner signs through IAM signBlob as itself.
moved {
  from = google_service_account_iam_member.runner_signs_urls[0]
  to   = google_service_account_iam_member.runner_signs_urls["primary"]
}

resource "google_service_account_iam_member" "runner_signs_urls" {
  for_each           = var.public_results ? {} : local.runner_pools
  service_account_id = google_service_account.runner[each.key].name
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = google_service_account.runner[each.key].member
}

# Each pool's runner may be invoked by its own pool's push identity, and the home pool's
# by the gateway (its runner routes reach that pool only). Primary's keys are as before.
locals {
  runner_invoker_grants = local.push_mode ? merge(
    { for pool in keys(local.runner_pools) : (pool == "primary" ? "tasks_invoker" : "${pool}/tasks_invoker") => { pool = pool, who = "tasks_invoker/${pool}" } },
    { (local.home_pool == "primary" ? "gateway" : "${local.home_pool}/gateway") = { pool = local.home_pool, who = "gateway" } },
  ) : {}
  runner_invoker_members = local.push_mode ? merge(
    { for pool in keys(local.runner_pools) : "tasks_invoker/${pool}" => google_service_account.tasks_invoker[pool].member },
    { gateway = google_service_account.gateway.member },
  ) : {}
}

resource "google_cloud_run_v2_service_iam_member" "runner_invokers" {
  for_each = local.runner_invoker_grants
  project  = var.project_id
  location = google_cloud_run_v2_service.runner[each.value.pool].location
  name     = google_cloud_run_v2_service.runner[each.value.pool].name
  role     = "roles/run.invoker"
  member   = local.runner_invoker_members[each.value.who]
}

# --- lease reaper schedule -------------------------------------------------------------

# The scheduler's OIDC token passes Cloud Run's IAM check; the function then checks the
# token's email is this account's (REAPER_INVOKER_EMAIL), so no other invoker (the
# gateway's account) can reap.
resource "google_cloud_run_v2_service_iam_member" "scheduler_reaper" {
  project  = var.project_id
  location = var.region
  name     = google_cloudfunctions2_function.api[var.reaper.target].name
  role     = "roles/run.invoker"
  member   = google_service_account.scheduler.member
}
