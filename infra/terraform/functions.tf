# The three HTTPS functions (Cloud Functions gen2, python311). `make bundle` copies
# shared/ next to each main.py under build/functions/NAME; the zip is uploaded under
# its md5, so a code change is a new object and a redeploy.

data "archive_file" "function" {
  for_each    = local.functions
  type        = "zip"
  source_dir  = "${path.module}/../../build/functions/${each.key}"
  output_path = "${path.module}/../../build/terraform/${each.key}.zip"
  excludes    = ["__pycache__", "**/__pycache__/**", "**/*.pyc"]
}

resource "google_storage_bucket_object" "function_source" {
  for_each = local.functions
  name     = "functions/${each.key}-${data.archive_file.function[each.key].output_md5}.zip"
  bucket   = google_storage_bucket.sources.name
  source   = data.archive_file.function[each.key].output_path
}

resource "google_cloudfunctions2_function" "api" {
  #checkov:skip=CKV_GCP_124:API Gateway is not an internal source, so ingress must allow all; every call still needs run.invoker (gateway and scheduler accounts only).
  for_each    = local.functions
  project     = var.project_id
  location    = var.region
  name        = "${var.prefix}-${replace(each.key, "_", "-")}"
  description = each.value.description
  labels      = local.labels

  build_config {
    runtime         = "python311"
    entry_point     = each.key
    service_account = google_service_account.build.id
    # Built images go to this deployment's own repository, the only one the build
    # account may write (not gcf-artifacts project-wide, not the runner images). The API
    # wants projects/P/locations/L/repositories/R in the function's own project and
    # region, format DOCKER (Cloud Functions v2 BuildConfig.docker_repository): the id.
    docker_repository = google_artifact_registry_repository.functions.id
    source {
      storage_source {
        bucket = google_storage_bucket.sources.name
        object = google_storage_bucket_object.function_source[each.key].name
      }
    }
  }

  service_config {
    available_memory   = var.functions.memory
    available_cpu      = var.functions.cpu
    timeout_seconds    = var.functions.timeout_s
    min_instance_count = var.functions.min_instances
    max_instance_count = var.functions.max_instances
    # `?wait=` and the runner's fetch hold a request up to 25 s doing nothing but wait:
    # with concurrency 1 each waiting client would pin (and bill) an instance.
    max_instance_request_concurrency = var.functions.concurrency
    # Reached through the gateway (and by Cloud Scheduler); IAM still requires an
    # authenticated caller with run.invoker (iam.tf).
    ingress_settings               = "ALLOW_ALL"
    all_traffic_on_latest_revision = true
    service_account_email          = google_service_account.function[each.key].email
    environment_variables          = local.function_env

    dynamic "secret_environment_variables" {
      for_each = local.function_secret_env
      content {
        key        = secret_environment_variables.key
        project_id = var.project_id
        secret     = google_secret_manager_secret.secret[secret_environment_variables.value].secret_id
        version    = "latest"
      }
    }
  }

  depends_on = [
    google_project_service.apis,
    google_project_iam_member.build,
    google_storage_bucket_iam_member.function_inputs,
    google_artifact_registry_repository_iam_member.build_functions,
    google_storage_bucket_iam_member.build_sources,
    google_secret_manager_secret_iam_member.function,
    google_secret_manager_secret_version.secret,
  ]
}
