# Secret Manager secrets. Values come out of band (gcloud secrets versions add) or from
# the sensitive variable secret_values; they are never outputs.

resource "google_secret_manager_secret" "secret" {
  for_each  = local.secrets
  project   = var.project_id
  secret_id = "${var.prefix}-${each.key}"
  labels    = local.labels

  replication {
    auto {}
  }

  depends_on = [google_project_service.apis]
}

resource "google_secret_manager_secret_version" "secret" {
  for_each    = nonsensitive(toset(keys(var.secret_values)))
  secret      = google_secret_manager_secret.secret[each.key].id
  secret_data = var.secret_values[each.key]
}
