# Log-based metrics from the JSON logs (shared/logs.py: jsonPayload.event and its
# fields), a dashboard, and alert policies.

locals {
  # Logs of this deployment: its Cloud Run services (functions run on Cloud Run too)
  # and its runner VMs.
  log_scope     = "(resource.type=\"cloud_run_revision\" AND resource.labels.service_name=~\"^${var.prefix}-\") OR (resource.type=\"gce_instance\" AND labels.\"compute.googleapis.com/resource_name\"=~\"^${local.runner_name}-\")"
  metric_prefix = "logging.googleapis.com/user/${var.prefix}"
  # Every pool's runner service: primary's is RUNNER, the others RUNNER-POOL.
  runner_filter = "resource.type=\"cloud_run_revision\" AND resource.labels.service_name=starts_with(\"${local.runner_name}\")"
  # A log-based metric's series carry the monitored resource of the entries it counts,
  # and the Monitoring API refuses an alert filter without resource.type. The runner
  # logs as a Cloud Run revision or as a VM; the functions (the reaper included) always
  # as Cloud Run revisions. tests/infra checks each alert against who logs its event.
  runner_resource_type   = local.push_mode ? "cloud_run_revision" : "gce_instance"
  function_resource_type = "cloud_run_revision"
}

resource "google_logging_metric" "task_finished" {
  project = var.project_id
  name    = "${var.prefix}/task_finished"
  filter  = "(${local.log_scope}) AND jsonPayload.event=\"task_finished\""

  metric_descriptor {
    metric_kind  = "DELTA"
    value_type   = "INT64"
    unit         = "1"
    display_name = "ComfySwap tasks finished"
    labels {
      key         = "outcome"
      value_type  = "STRING"
      description = "COMPLETED, FAILED or CANCELLED."
    }
    labels {
      key         = "code"
      value_type  = "STRING"
      description = "Error code of a failed task."
    }
    labels {
      key         = "engine"
      value_type  = "STRING"
      description = "Engine that ran the task."
    }
  }

  label_extractors = {
    code    = "EXTRACT(jsonPayload.code)"
    engine  = "EXTRACT(jsonPayload.engine)"
    outcome = "EXTRACT(jsonPayload.outcome)"
  }
}

resource "google_logging_metric" "queue_wait" {
  project         = var.project_id
  name            = "${var.prefix}/queue_wait_s"
  filter          = "(${local.log_scope}) AND jsonPayload.event=\"task_claimed\""
  value_extractor = "EXTRACT(jsonPayload.queue_wait_s)"

  metric_descriptor {
    metric_kind  = "DELTA"
    value_type   = "DISTRIBUTION"
    unit         = "s"
    display_name = "ComfySwap queue wait"
  }

  bucket_options {
    exponential_buckets {
      num_finite_buckets = 20
      growth_factor      = 2
      scale              = 0.1
    }
  }
}

resource "google_logging_metric" "engine_time" {
  project         = var.project_id
  name            = "${var.prefix}/engine_s"
  filter          = "(${local.log_scope}) AND jsonPayload.event=\"task_finished\" AND jsonPayload.engine_s:*"
  value_extractor = "EXTRACT(jsonPayload.engine_s)"

  metric_descriptor {
    metric_kind  = "DELTA"
    value_type   = "DISTRIBUTION"
    unit         = "s"
    display_name = "ComfySwap engine time"
    labels {
      key         = "engine"
      value_type  = "STRING"
      description = "Engine that ran the task."
    }
  }

  label_extractors = {
    engine = "EXTRACT(jsonPayload.engine)"
  }

  bucket_options {
    exponential_buckets {
      num_finite_buckets = 20
      growth_factor      = 2
      scale              = 0.1
    }
  }
}

# The reaper logs the queue's state on every run: event "queue_stats" with
# oldest_pending_age_s (0 when nothing waits) and pending.
resource "google_logging_metric" "oldest_pending_age" {
  project         = var.project_id
  name            = "${var.prefix}/oldest_pending_age_s"
  filter          = "(${local.log_scope}) AND jsonPayload.event=\"queue_stats\""
  value_extractor = "EXTRACT(jsonPayload.oldest_pending_age_s)"

  metric_descriptor {
    metric_kind  = "DELTA"
    value_type   = "DISTRIBUTION"
    unit         = "s"
    display_name = "ComfySwap age of the oldest PENDING task"
  }

  bucket_options {
    exponential_buckets {
      num_finite_buckets = 24
      growth_factor      = 2
      scale              = 1
    }
  }
}

# Runner liveness: the runner logs "runner_heartbeat" while it is up (every lease
# renewal, or idle ticks), whether on Cloud Run or a VM.
resource "google_logging_metric" "runner_heartbeat" {
  project = var.project_id
  name    = "${var.prefix}/runner_heartbeat"
  filter  = "(${local.log_scope}) AND jsonPayload.event=\"runner_heartbeat\""

  metric_descriptor {
    metric_kind  = "DELTA"
    value_type   = "INT64"
    unit         = "1"
    display_name = "ComfySwap runner heartbeats"
  }
}

# A runner pool's queue refused an enqueue (shared/dispatch/cloud_tasks.py) and the task
# went to the next pool: a region in trouble shows here before any task waits.
resource "google_logging_metric" "dispatch_failovers" {
  project = var.project_id
  name    = "${var.prefix}/dispatch_failovers"
  filter  = "(${local.log_scope}) AND jsonPayload.event=\"dispatch_pool_failed\""

  metric_descriptor {
    metric_kind  = "DELTA"
    value_type   = "INT64"
    unit         = "1"
    display_name = "ComfySwap dispatches moved to another runner pool"
    labels {
      key         = "pool"
      value_type  = "STRING"
      description = "The runner pool whose queue refused the enqueue."
    }
  }

  label_extractors = {
    pool = "EXTRACT(jsonPayload.pool)"
  }
}

# The Monitoring API knows a new log-based metric only after a while: an alert policy
# created right after it fails with "Cannot find metric(s) ... it could take up to 10
# minutes to become available" (hashicorp/terraform-provider-google#11102). The alerts
# wait here; the wait runs again only when a metric is re-created.
resource "time_sleep" "log_metrics" {
  create_duration = "10m"
  triggers = {
    engine_time        = google_logging_metric.engine_time.id
    oldest_pending_age = google_logging_metric.oldest_pending_age.id
    queue_wait         = google_logging_metric.queue_wait.id
    runner_heartbeat   = google_logging_metric.runner_heartbeat.id
    task_finished      = google_logging_metric.task_finished.id
  }
}

resource "google_monitoring_dashboard" "comfyswap" {
  project        = var.project_id
  dashboard_json = jsonencode(local.dashboard)
}

locals {
  # Built from variables only (tests/infra evaluates it). Fields equal to their default
  # (empty groupByFields, xPos/yPos 0) are left out: the API drops them and every plan
  # would show a diff.
  dashboard = {
    displayName = "ComfySwap (${var.prefix})"
    mosaicLayout = {
      columns = 12
      tiles = [
        for index, tile in [
          {
            title  = "Cloud Tasks queue depth by region"
            filter = "metric.type=\"cloudtasks.googleapis.com/queue/depth\" AND resource.type=\"cloud_tasks_queue\" AND resource.labels.queue_id=starts_with(\"${local.queue_name}\")"
            align  = "ALIGN_MEAN"
            reduce = "REDUCE_SUM"
            group  = ["resource.label.location"]
          },
          {
            title  = "Age of the oldest PENDING task (s, max)"
            filter = "metric.type=\"${local.metric_prefix}/oldest_pending_age_s\""
            align  = "ALIGN_PERCENTILE_99"
            reduce = "REDUCE_MAX"
          },
          {
            title  = "Throughput: tasks finished by outcome (per s)"
            filter = "metric.type=\"${local.metric_prefix}/task_finished\""
            align  = "ALIGN_RATE"
            reduce = "REDUCE_SUM"
            group  = ["metric.label.outcome"]
          },
          {
            title  = "Failures by code (per s)"
            filter = "metric.type=\"${local.metric_prefix}/task_finished\" AND metric.label.outcome=\"FAILED\""
            align  = "ALIGN_RATE"
            reduce = "REDUCE_SUM"
            group  = ["metric.label.code"]
          },
          {
            title  = "Queue wait p95 (s)"
            filter = "metric.type=\"${local.metric_prefix}/queue_wait_s\""
            align  = "ALIGN_PERCENTILE_95"
            reduce = "REDUCE_MAX"
          },
          {
            title  = "Engine time p95 by engine (s)"
            filter = "metric.type=\"${local.metric_prefix}/engine_s\""
            align  = "ALIGN_PERCENTILE_95"
            reduce = "REDUCE_MAX"
            group  = ["metric.label.engine"]
          },
          {
            title  = "Runner instances by region"
            filter = "metric.type=\"run.googleapis.com/container/instance_count\" AND ${local.runner_filter}"
            align  = "ALIGN_MAX"
            reduce = "REDUCE_SUM"
            group  = ["resource.label.location", "metric.label.state"]
          },
          {
            title  = "Runner GPU utilisation (p95)"
            filter = "metric.type=\"run.googleapis.com/container/gpu/utilizations\" AND ${local.runner_filter}"
            align  = "ALIGN_PERCENTILE_95"
            reduce = "REDUCE_MAX"
          },
          {
            title  = "Dispatch failovers by refusing pool (per s)"
            filter = "metric.type=\"${local.metric_prefix}/dispatch_failovers\""
            align  = "ALIGN_RATE"
            reduce = "REDUCE_SUM"
            group  = ["metric.label.pool"]
          },
          ] : merge(
          { for axis, position in { xPos = (index % 2) * 6, yPos = floor(index / 2) * 4 } : axis => position if position != 0 },
          {
            width  = 6
            height = 4
            widget = {
              title = tile.title
              xyChart = {
                dataSets = [{
                  plotType = "LINE"
                  timeSeriesQuery = {
                    timeSeriesFilter = {
                      filter = tile.filter
                      aggregation = merge(
                        {
                          alignmentPeriod    = "60s"
                          perSeriesAligner   = tile.align
                          crossSeriesReducer = tile.reduce
                        },
                        { for field, group in { groupByFields = lookup(tile, "group", []) } : field => group if length(group) > 0 },
                      )
                    }
                  }
                }]
              }
            }
          },
        )
      ]
    }
  }
}

# Alerts of one threshold condition each: the metric, aggregated over `period`, above
# `threshold` for `duration`. Filters name resource.type (the Monitoring API refuses an
# alert filter without it; tests/infra checks each against who logs the event).
locals {
  threshold_alerts = {
    failure_rate = {
      title         = "task failures"
      documentation = "More than 5 tasks FAILED in 10 minutes. See the dashboard's failures by code, then the logs: jsonPayload.event=\"task_finished\" AND jsonPayload.outcome=\"FAILED\"."
      condition     = "Failed tasks over 10 minutes"
      filter        = "metric.type=\"${local.metric_prefix}/task_finished\" AND resource.type=\"${local.runner_resource_type}\" AND metric.label.outcome=\"FAILED\""
      threshold     = 5
      duration      = "0s"
      period        = "600s"
      aligner       = "ALIGN_SUM"
      reducer       = "REDUCE_SUM"
    }
    backlog_age = {
      title         = "backlog too old"
      documentation = "The oldest PENDING task has waited more than 15 minutes for 10 minutes: runners are down, saturated or out of GPU quota."
      condition     = "Oldest PENDING task older than 15 minutes"
      filter        = "metric.type=\"${local.metric_prefix}/oldest_pending_age_s\" AND resource.type=\"${local.function_resource_type}\""
      threshold     = 900
      duration      = "600s"
      period        = "300s"
      aligner       = "ALIGN_PERCENTILE_99"
      reducer       = "REDUCE_MAX"
    }
  }
}

resource "google_monitoring_alert_policy" "threshold" {
  for_each              = local.threshold_alerts
  project               = var.project_id
  display_name          = "ComfySwap (${var.prefix}): ${each.value.title}"
  combiner              = "OR"
  notification_channels = var.alert_notification_channels
  documentation {
    content   = each.value.documentation
    mime_type = "text/markdown"
  }

  conditions {
    display_name = each.value.condition
    condition_threshold {
      filter          = each.value.filter
      comparison      = "COMPARISON_GT"
      threshold_value = each.value.threshold
      duration        = each.value.duration
      aggregations {
        alignment_period     = each.value.period
        per_series_aligner   = each.value.aligner
        cross_series_reducer = each.value.reducer
      }
      trigger {
        count = 1
      }
    }
  }

  depends_on = [time_sleep.log_metrics]
}

# The two alerts were resources of their own before the table: keep them, not re-create.
moved {
  from = google_monitoring_alert_policy.failure_rate
  to   = google_monitoring_alert_policy.threshold["failure_rate"]
}

moved {
  from = google_monitoring_alert_policy.backlog_age
  to   = google_monitoring_alert_policy.threshold["backlog_age"]
}

# A runner is expected while tasks wait: no heartbeat for 10 minutes while the backlog
# is non-empty (scale to zero with an empty queue is not an incident).
resource "google_monitoring_alert_policy" "runner_down" {
  project               = var.project_id
  display_name          = "ComfySwap (${var.prefix}): runner down"
  combiner              = "AND"
  notification_channels = var.alert_notification_channels
  documentation {
    content   = "No runner heartbeat for 10 minutes while tasks are pending. Check the runner's logs, its startup probe (/api/health) and the GPU quota."
    mime_type = "text/markdown"
  }

  conditions {
    display_name = "No runner heartbeat"
    condition_absent {
      filter   = "metric.type=\"${local.metric_prefix}/runner_heartbeat\" AND resource.type=\"${local.runner_resource_type}\""
      duration = "600s"
      aggregations {
        alignment_period     = "300s"
        per_series_aligner   = "ALIGN_SUM"
        cross_series_reducer = "REDUCE_SUM"
      }
      trigger {
        count = 1
      }
    }
  }

  conditions {
    display_name = "Tasks are pending"
    condition_threshold {
      filter          = "metric.type=\"${local.metric_prefix}/oldest_pending_age_s\" AND resource.type=\"${local.function_resource_type}\""
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "600s"
      aggregations {
        alignment_period     = "300s"
        per_series_aligner   = "ALIGN_PERCENTILE_99"
        cross_series_reducer = "REDUCE_MAX"
      }
      trigger {
        count = 1
      }
    }
  }

  depends_on = [time_sleep.log_metrics]
}
