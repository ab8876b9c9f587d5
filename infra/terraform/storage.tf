# Buckets: results (uploaded outputs, deleted after result_retention_days), function
# sources (zips named by md5), and the engine models mounted read-only by the runner.

resource "google_storage_bucket" "results" {
  #checkov:skip=CKV_GCP_62:Access to results is recorded by Data Access audit logs; a second log bucket adds cost, not insight.
  #checkov:skip=CKV_GCP_78:Results are write-once per task and expire; versioning would keep deleted results past their retention.
  project                     = var.project_id
  name                        = "${var.prefix}-results-${var.project_id}"
  location                    = coalesce(var.results_bucket.location, var.region)
  storage_class               = var.results_bucket.storage_class
  uniform_bucket_level_access = true
  public_access_prevention    = var.public_results ? "inherited" : "enforced"
  force_destroy               = !var.deletion_protection
  labels                      = local.labels

  versioning {
    enabled = false
  }

  lifecycle_rule {
    condition {
      age = var.result_retention_days
    }
    action {
      type = "Delete"
    }
  }

  # Inputs are deleted when their task ends; this is the backstop for any left behind.
  lifecycle_rule {
    condition {
      age            = 1
      matches_prefix = ["inputs/"]
    }
    action {
      type = "Delete"
    }
  }

  # Browsers load results straight from signed URLs.
  cors {
    origin          = ["*"]
    method          = ["GET", "HEAD"]
    response_header = ["Content-Type", "Content-Length"]
    max_age_seconds = 3600
  }

  depends_on = [google_project_service.apis]
}

# Inputs sent as data: (people's photos) while their task runs (shared/inputs.py). They
# live under inputs/ in the results bucket unless results are public: a bucket readable
# by anyone is listable by anyone too, so then they get this private bucket (INPUTS_BUCKET).
resource "google_storage_bucket" "inputs" {
  #checkov:skip=CKV_GCP_62:Objects live at most a day; audit logs cover access.
  #checkov:skip=CKV_GCP_78:Inputs are deleted when their task ends; versioning would keep them.
  count                       = var.public_results ? 1 : 0
  project                     = var.project_id
  name                        = "${var.prefix}-inputs-${var.project_id}"
  location                    = coalesce(var.results_bucket.location, var.region)
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = true
  labels                      = local.labels

  versioning {
    enabled = false
  }

  # Inputs are deleted when their task ends; a day is the backstop for any left behind
  # (this bucket holds nothing else).
  lifecycle_rule {
    action {
      type = "Delete"
    }
    condition {
      age = 1
    }
  }

  depends_on = [google_project_service.apis]
}

locals {
  # Where the input store keeps data: inputs (the object names start with inputs/ in both).
  inputs_bucket = var.public_results ? one(google_storage_bucket.inputs[*].name) : google_storage_bucket.results.name
}

resource "google_storage_bucket" "sources" {
  #checkov:skip=CKV_GCP_62:Holds only build inputs (function zips); audit logs cover access.
  project                     = var.project_id
  name                        = "${var.prefix}-sources-${var.project_id}"
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = true
  labels                      = local.labels

  # Zips are named by their md5, so old ones stay for rollbacks (they are small).
  versioning {
    enabled = true
  }

  depends_on = [google_project_service.apis]
}

resource "google_storage_bucket" "models" {
  #checkov:skip=CKV_GCP_62:Read-only model weights; audit logs cover access.
  #checkov:skip=CKV_GCP_78:Models are re-uploadable artifacts from their upstream releases; versioning would double the storage of multi-GB files.
  count                       = var.models_bucket == null ? 1 : 0
  project                     = var.project_id
  name                        = "${var.prefix}-models-${var.project_id}"
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = !var.deletion_protection
  labels                      = local.labels

  versioning {
    enabled = false
  }

  depends_on = [google_project_service.apis]
}
