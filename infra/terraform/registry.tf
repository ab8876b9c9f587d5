# Artifact Registry repositories: the runner image (pushed by you, docs/deploy.md), and
# the functions' build images (written by Cloud Build as the build account, which may
# write only there).

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

# Next to the runner's repository, same project, region and labels.
resource "google_artifact_registry_repository" "functions" {
  #checkov:skip=CKV_GCP_84:Google-managed encryption is enough for images built from this repository's own function sources.
  project       = google_artifact_registry_repository.images.project
  location      = google_artifact_registry_repository.images.location
  repository_id = "${var.prefix}-functions"
  description   = "ComfySwap function build images (written by Cloud Build only)."
  format        = google_artifact_registry_repository.images.format
  labels        = google_artifact_registry_repository.images.labels

  # Every deploy of a function builds a new image; keep the recent ones for rollbacks.
  cleanup_policy_dry_run = false
  cleanup_policies {
    id     = "keep-recent"
    action = "KEEP"
    most_recent_versions {
      keep_count = 5
    }
  }
  cleanup_policies {
    id     = "delete-old"
    action = "DELETE"
    condition {
      older_than = "2592000s"
    }
  }

  depends_on = [google_project_service.apis]
}
