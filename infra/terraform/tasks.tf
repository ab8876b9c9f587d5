# Cloud Tasks queue that pushes task ids to the Cloud Run runner (push mode). It
# exists in vm mode too (empty), so switching modes does not churn it.

resource "google_cloud_tasks_queue" "runner" {
  project  = var.project_id
  name     = local.queue_name
  location = var.region

  # At most one delivery per free engine slot; a busy runner answers 429/503 and the
  # retry policy below backs off. Cloud Tasks caps max_dispatches_per_second at 500 and
  # max_concurrent_dispatches at 5000 (RateLimits, Cloud Tasks API reference); 16 slots
  # x 100 instances would ask for 1600.
  rate_limits {
    max_concurrent_dispatches = min(local.runner_capacity, 5000)
    max_dispatches_per_second = min(local.runner_capacity, 500)
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
