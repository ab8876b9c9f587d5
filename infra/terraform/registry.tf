# Artifact Registry repository for the runner image.

resource "google_artifact_registry_repository" "images" {
  #checkov:skip=CKV_GCP_84:Google-managed encryption is enough for a public-source runner image; CMEK needs a KMS key this deployment does not own.
  project       = var.project_id
  location      = var.region
  repository_id = "${var.prefix}-images"
  description   = "ComfySwap runner images."
  format        = "DOCKER"
  labels        = local.labels

  # Untagged images pile up on every push; keep the 10 most recent versions.
  cleanup_policy_dry_run = false
  cleanup_policies {
    id     = "keep-recent"
    action = "KEEP"
    most_recent_versions {
      keep_count = 10
    }
  }
  cleanup_policies {
    id     = "delete-untagged"
    action = "DELETE"
    condition {
      tag_state  = "UNTAGGED"
      older_than = "604800s"
    }
  }

  depends_on = [google_project_service.apis]
}
