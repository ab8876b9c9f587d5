# Cloud Scheduler job for the lease reaper: tasks whose runner stopped renewing its lease
# go back to PENDING (and are re-dispatched) until max attempts, then FAILED.

locals {
  reaper_url = var.reaper.target == "runner" ? local.runner_url : google_cloudfunctions2_function.api[var.reaper.target].service_config[0].uri
  reaper_service_name = (
    var.reaper.target == "runner"
    ? (local.push_mode ? google_cloud_run_v2_service.runner[0].name : "")
    : google_cloudfunctions2_function.api[var.reaper.target].name
  )
}

resource "google_cloud_scheduler_job" "reaper" {
  project          = var.project_id
  region           = var.region
  name             = "${var.prefix}-lease-reaper"
  description      = "Re-dispatch tasks whose lease expired."
  schedule         = var.reaper.schedule
  time_zone        = var.reaper.time_zone
  attempt_deadline = "60s"

  retry_config {
    retry_count = 0
  }

  http_target {
    http_method = "POST"
    uri         = "${local.reaper_url}${var.reaper.path}"
    # The reap route needs an admin key (shared/auth.py); the OIDC token gets the call
    # past Cloud Run's IAM check.
    headers = {
      "Content-Type" = "application/json"
      "X-API-Key"    = google_apikeys_key.reaper.key_string
    }
    body = base64encode("{}")
    oidc_token {
      service_account_email = google_service_account.scheduler.email
      audience              = local.reaper_url
    }
  }

  depends_on = [
    google_project_service.apis,
    google_cloud_run_v2_service_iam_member.scheduler_reaper,
  ]
}
