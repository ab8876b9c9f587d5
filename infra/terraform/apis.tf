# Project services this deployment uses, and the project's own facts.

data "google_project" "project" {
  project_id = var.project_id
}

locals {
  services = toset(concat(
    [
      "apigateway.googleapis.com",
      "apikeys.googleapis.com",
      "artifactregistry.googleapis.com",
      "cloudbuild.googleapis.com",
      "cloudfunctions.googleapis.com",
      "cloudscheduler.googleapis.com",
      "cloudtasks.googleapis.com",
      "firestore.googleapis.com",
      "iam.googleapis.com",
      "iamcredentials.googleapis.com",
      "logging.googleapis.com",
      "monitoring.googleapis.com",
      "run.googleapis.com",
      "secretmanager.googleapis.com",
      "servicecontrol.googleapis.com",
      "servicemanagement.googleapis.com",
      "storage.googleapis.com",
    ],
    var.runner_mode == "vm" ? ["compute.googleapis.com"] : [],
  ))
}

resource "google_project_service" "apis" {
  for_each           = local.services
  project            = var.project_id
  service            = each.key
  disable_on_destroy = false
}
