# Firestore (native mode) holding the tasks, and the composite indexes its queries need.

resource "google_firestore_database" "tasks" {
  project                 = var.project_id
  name                    = var.firestore.database
  location_id             = coalesce(var.firestore.location, var.region)
  type                    = "FIRESTORE_NATIVE"
  concurrency_mode        = "PESSIMISTIC"
  delete_protection_state = var.deletion_protection ? "DELETE_PROTECTION_ENABLED" : "DELETE_PROTECTION_DISABLED"
  deletion_policy         = var.deletion_protection ? "ABANDON" : "DELETE"
  # Point-in-time recovery keeps 7 days of versions: a bad release can be undone.
  point_in_time_recovery_enablement = "POINT_IN_TIME_RECOVERY_ENABLED"
  depends_on                        = [google_project_service.apis]
}

resource "google_firestore_index" "tasks" {
  for_each    = local.firestore_indexes
  project     = var.project_id
  database    = google_firestore_database.tasks.name
  collection  = each.value.collection
  query_scope = "COLLECTION"

  dynamic "fields" {
    for_each = each.value.fields
    content {
      field_path = fields.value[0]
      order      = fields.value[1]
    }
  }
}

# Single-field index exemptions for the timestamps the store writes (shared/store/firestore.py).
# An index over a value that grows with time (a timestamp) puts every new entry at the
# end of the index: Firestore documents a limit of about 500 writes/s to a collection
# with sequential values in an indexed field (best practices, "hotspots"). None of
# these fields is queried on its own, so their automatic single-field indexes (asc,
# desc, array-contains) are only cost and hotspot; the composite indexes above, which
# the queries use, are not affected by an exemption. created_at and finished_at keep the
# one order a single-field query uses (the unfiltered list newest first; ended tasks by
# finished_at). Their composite and kept indexes still grow sequentially: docs/scale.md
# says what that means at 1,000 tasks/s.
# redispatched_at (when the sweep last enqueued a task again) is a timestamp too.
locals {
  firestore_sequential_fields = {
    available_at     = []
    lease_expires_at = []
    redispatched_at  = []
    started_at       = []
    updated_at       = []
    created_at       = ["DESCENDING"]
    finished_at      = ["DESCENDING"]
  }
  # Maps and lists the store writes and never queries: Firestore indexes every subfield
  # of a map and every element of a list by default, so a ComfyUI workflow in params
  # (hundreds of node inputs) or params__json (the same as a string, when it holds an
  # array in an array) would cost hundreds of index writes per status change, and
  # lease.expires_at, webhook_delivery.at and attempt_history's times are sequential
  # values again. Queries read top-level fields only (lease_expires_at, not lease).
  firestore_unqueried_fields = toset([
    "attempt_history", "error", "lease", "output_data", "params", "params__json", "progress", "timings", "webhook_delivery",
  ])
  # Field -> the automatic indexes it keeps (none for most).
  firestore_field_indexes = merge(local.firestore_sequential_fields, { for field in local.firestore_unqueried_fields : field => [] })
}

resource "google_firestore_field" "sequential" {
  for_each   = local.firestore_field_indexes
  project    = var.project_id
  database   = google_firestore_database.tasks.name
  collection = var.firestore.collection
  field      = each.key

  # An empty index_config exempts the field from every automatic index.
  index_config {
    dynamic "indexes" {
      for_each = each.value
      content {
        order       = indexes.value
        query_scope = "COLLECTION"
      }
    }
  }
}

# Finished tasks carry `expire_at` (finished_at + TASK_RETENTION_DAYS, written by the task
# store); this TTL policy makes Firestore delete them after that time (typically within a
# day). The field needs no index: nothing queries it deployed.
resource "google_firestore_field" "expire_at" {
  project    = var.project_id
  database   = google_firestore_database.tasks.name
  collection = var.firestore.collection
  field      = "expire_at"

  ttl_config {}

  index_config {}
}

# Pull-mode claimers announce themselves (shared/store/firestore.py, `_fleet_seen`) in
# <collection>_fleet/{environment}/<collection>_claimers/{worker}; `expire_at` is
# seen_at + 90 s, so this TTL policy removes the announcements of workers that stopped
# claiming. The claim counts them on `seen_at` (its automatic single-field index), never
# on expire_at: no index on it.
resource "google_firestore_field" "claimers_expire_at" {
  project    = var.project_id
  database   = google_firestore_database.tasks.name
  collection = "${var.firestore.collection}_claimers"
  field      = "expire_at"

  ttl_config {}

  index_config {}
}
