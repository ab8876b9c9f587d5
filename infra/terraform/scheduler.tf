# Cloud Scheduler job for the lease reaper: tasks whose runner stopped renewing its lease
# go back to PENDING (and are re-dispatched) until max attempts, then FAILED.
#
# The job carries no API key: it sends an OIDC token of the scheduler's service account,
# Cloud Run checks it (run.invoker, iam.tf) and the function accepts it only for that
# account and audience (REAPER_INVOKER_EMAIL, REAPER_OIDC_AUDIENCE in main.tf). Nothing
# usable on the public gateway is stored in the job.

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
    uri         = "${google_cloudfunctions2_function.api[var.reaper.target].service_config[0].uri}${var.reaper.path}"
    headers = {
      "Content-Type" = "application/json"
    }
    body = base64encode("{}")
    oidc_token {
      service_account_email = google_service_account.scheduler.email
      audience              = local.reaper_audience
    }
  }

  depends_on = [
    google_project_service.apis,
    google_cloud_run_v2_service_iam_member.scheduler_reaper,
  ]
}
