# Provider ranges: Cloud Run v2 GPU fields (node_selector, gpu_zonal_redundancy_disabled)
# are GA from google 6.30; API Gateway resources are still google-beta only.
# Terraform >= 1.9: variable validations here refer to other variables (task_limits and
# queue, runner and gpu_type), which older releases reject (tests/infra checks the bound).
terraform {
  required_version = ">= 1.9.0, < 2.0.0"
  required_providers {
    archive = {
      source  = "hashicorp/archive"
      version = ">= 2.4.0, < 3.0.0"
    }
    google = {
      source  = "hashicorp/google"
      version = ">= 6.30.0, < 8.0.0"
    }
    google-beta = {
      source  = "hashicorp/google-beta"
      version = ">= 6.30.0, < 8.0.0"
    }
    # time_sleep: alert policies wait for their log-based metrics (monitoring.tf).
    time = {
      source  = "hashicorp/time"
      version = ">= 0.9.0, < 1.0.0"
    }
  }
}

provider "google" {
  project = var.project_id
  region  = var.region
}

provider "google-beta" {
  project = var.project_id
  region  = var.region
}
