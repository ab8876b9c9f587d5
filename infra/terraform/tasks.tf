# Cloud Tasks queue that pushes task ids to the Cloud Run runner (push mode). It
# exists in vm mode too (empty), so switching modes does not churn it.

resource "google_cloud_tasks_queue" "runner" {
  project  = var.project_id
  name     = "${var.prefix}-runner"
  location = var.region

  # At most one delivery per free engine slot; a busy runner answers 429/503 and the
  # retry policy below backs off.
  rate_limits {
    max_concurrent_dispatches = local.runner_capacity
    max_dispatches_per_second = local.runner_capacity
  }

  retry_config {
    max_attempts       = var.queue.max_attempts
    max_backoff        = "${var.queue.max_backoff_s}s"
    max_doublings      = var.queue.max_doublings
    max_retry_duration = "${var.queue.max_retry_duration_s}s"
    min_backoff        = "${var.queue.min_backoff_s}s"
  }

  stackdriver_logging_config {
    sampling_ratio = 1.0
  }

  depends_on = [google_project_service.apis]
}
