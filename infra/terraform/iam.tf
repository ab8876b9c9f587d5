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

resource "google_service_account" "runner" {
  project      = var.project_id
  account_id   = "${var.prefix}-runner"
  display_name = "ComfySwap GPU runner"
}

resource "google_service_account" "scheduler" {
  project      = var.project_id
  account_id   = "${var.prefix}-scheduler"
  display_name = "ComfySwap lease reaper schedule"
}

# Identity whose OIDC token Cloud Tasks attaches to pushes (CLOUD_TASKS_INVOKER_EMAIL).
resource "google_service_account" "tasks_invoker" {
  count        = local.push_mode ? 1 : 0
  project      = var.project_id
  account_id   = "${var.prefix}-tasks-invoker"
  display_name = "ComfySwap Cloud Tasks push identity"
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

# Who enqueues Cloud Tasks in push mode: create_task, the reaper's function, and the
# runner itself (it re-dispatches a task it releases at SIGTERM, schedules a retry's
# backoff as a Cloud Task, and re-queues expired leases every few seconds).
# One grant per enqueuer and queue shard; shard 0's key is the enqueuer's name alone,
# as when there was one queue, so adding shards changes no existing grant.
locals {
  enqueuers = local.push_mode ? merge(
    { for name in local.dispatching_functions : name => google_service_account.function[name].member },
    { runner = google_service_account.runner.member },
  ) : {}
  enqueuer_grants = merge([
    for who, member in local.enqueuers : {
      for shard, queue in local.queues : (shard == "0" ? who : "${who}/${shard}") => { member = member, shard = shard }
    }
  ]...)
}

resource "google_cloud_tasks_queue_iam_member" "enqueuer" {
  for_each = local.enqueuer_grants
  project  = var.project_id
  location = google_cloud_tasks_queue.runner[each.value.shard].location
  name     = google_cloud_tasks_queue.runner[each.value.shard].name
  role     = "roles/cloudtasks.enqueuer"
  member   = each.value.member
}

# Enqueuing a task with an OIDC token for the invoker requires actAs on it: once per
# enqueuer (shard 0's grants), not per queue: two iam_member resources for the same
# binding would remove it for both when one is destroyed.
resource "google_service_account_iam_member" "acts_as_invoker" {
  for_each           = local.push_mode ? { for who, grant in google_cloud_tasks_queue_iam_member.enqueuer : who => grant if local.enqueuer_grants[who].shard == "0" } : {}
  service_account_id = google_service_account.tasks_invoker[0].name
  role               = "roles/iam.serviceAccountUser"
  member             = each.value.member
}

# data: and uploaded inputs live in the results bucket under inputs/<task_id>/ while their
# task runs (shared/inputs.py): create_task writes them and deletes them on cancel,
# get_task's reaper deletes those of ended tasks (listing the prefix first). Only that
# prefix: an IAM condition on the object name, and on the list prefix for listings
# (Cloud Storage IAM conditions, storage.googleapis.com/objectListPrefix).
resource "google_storage_bucket_iam_member" "function_inputs" {
  for_each = toset(["create_task", "get_task"])
  bucket   = google_storage_bucket.results.name
  role     = "roles/storage.objectUser"
  member   = google_service_account.function[each.key].member

  condition {
    title       = "inputs-only"
    description = "Objects under inputs/ only."
    expression  = "resource.name.startsWith(\"projects/_/buckets/${google_storage_bucket.results.name}/objects/inputs/\") || api.getAttribute(\"storage.googleapis.com/objectListPrefix\", \"\").startsWith(\"inputs/\")"
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

resource "google_project_iam_member" "runner" {
  for_each = toset(concat(
    ["roles/datastore.user", "roles/logging.logWriter", "roles/monitoring.metricWriter"],
    # The VM pulls its image itself (Cloud Run's service agent pulls for the service).
    var.runner_mode == "vm" ? ["roles/artifactregistry.reader"] : [],
  ))
  project = var.project_id
  role    = each.key
  member  = google_service_account.runner.member
}

resource "google_storage_bucket_iam_member" "runner_results" {
  bucket = google_storage_bucket.results.name
  role   = "roles/storage.objectAdmin"
  member = google_service_account.runner.member
}

resource "google_storage_bucket_iam_member" "runner_models" {
  bucket = local.models_bucket
  role   = "roles/storage.objectViewer"
  member = google_service_account.runner.member
}

resource "google_secret_manager_secret_iam_member" "runner" {
  for_each  = { for id, secret in local.secrets : id => secret if secret.runner }
  project   = var.project_id
  secret_id = google_secret_manager_secret.secret[each.key].secret_id
  role      = "roles/secretmanager.secretAccessor"
  member    = google_service_account.runner.member
}

# Signed result URLs without a key file: the runner signs through IAM signBlob as itself.
resource "google_service_account_iam_member" "runner_signs_urls" {
  count              = var.public_results ? 0 : 1
  service_account_id = google_service_account.runner.name
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = google_service_account.runner.member
}

resource "google_cloud_run_v2_service_iam_member" "runner_invokers" {
  for_each = local.push_mode ? {
    gateway       = google_service_account.gateway.member
    tasks_invoker = google_service_account.tasks_invoker[0].member
  } : {}
  project  = var.project_id
  location = var.region
  name     = google_cloud_run_v2_service.runner[0].name
  role     = "roles/run.invoker"
  member   = each.value
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
