# Cloud Tasks queues that push task ids to the Cloud Run runners (push mode). They
# exist in vm mode too (empty), so switching modes does not churn them. One queue
# dispatches at most 500 tasks/s: each runner pool has queue_shards queues in its own
# region (local.queues), and the dispatcher sends a task to a pool (a weighted hash of
# its id, shared/pools.py) and within it to the queue a hash of its environment and id
# picks (shared/dispatch/cloud_tasks.py, RUNNER_POOLS).

# The single queue of earlier versions is shard "0": kept, not re-created.
moved {
  from = google_cloud_tasks_queue.runner
  to   = google_cloud_tasks_queue.runner["0"]
}

resource "google_cloud_tasks_queue" "runner" {
  for_each = local.queues
  project  = var.project_id
  name     = each.value.name
  location = each.value.region

  # At most one delivery per free engine slot; a busy runner answers 429/503 and the
  # retry policy below backs off. Cloud Tasks caps max_dispatches_per_second at 500 and
  # max_concurrent_dispatches at 5000 (RateLimits, Cloud Tasks API reference); 16 slots
  # x 100 instances would ask for 1600. The limits are per queue and each queue asks
  # for its share of its pool's runner slots (local.queues capacity).
  rate_limits {
    max_concurrent_dispatches = min(each.value.capacity, 5000)
    max_dispatches_per_second = min(each.value.capacity, 500)
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
