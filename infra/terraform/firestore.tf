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
