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

# The pulling runner's API key (vm mode), written here so it never sits in VM metadata.
resource "google_secret_manager_secret_version" "runner_api_key" {
  for_each    = google_apikeys_key.runner
  secret      = google_secret_manager_secret.secret["runner-api-key"].id
  secret_data = each.value.key_string
}

resource "google_secret_manager_secret_version" "secret" {
  for_each    = nonsensitive(toset(keys(var.secret_values)))
  secret      = google_secret_manager_secret.secret[each.key].id
  secret_data = var.secret_values[each.key]
}
