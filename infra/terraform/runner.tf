# The GPU runners, one per runner pool (var.runner_pools) in the pool's region: a Cloud
# Run GPU service fed by the pool's Cloud Tasks queues (runner_mode = cloud_run), or GPU
# VMs running the same container in pull mode (runner_mode = vm).

# The single runner of earlier versions is the primary pool's: kept, not re-created.
moved {
  from = google_cloud_run_v2_service.runner[0]
  to   = google_cloud_run_v2_service.runner["primary"]
}

resource "google_cloud_run_v2_service" "runner" {
  for_each            = local.push_mode ? local.runner_pools : {}
  project             = var.project_id
  location            = each.value.region
  name                = each.value.runner_name
  description         = "ComfySwap GPU runner (ComfyUI + FaceFusion)."
  ingress             = var.runner.ingress == "all" ? "INGRESS_TRAFFIC_ALL" : "INGRESS_TRAFFIC_INTERNAL_ONLY"
  deletion_protection = var.deletion_protection
  labels              = local.labels

  template {
    service_account                  = google_service_account.runner[each.key].email
    execution_environment            = "EXECUTION_ENVIRONMENT_GEN2"
    timeout                          = "${var.runner.timeout_s}s"
    max_instance_request_concurrency = var.engine_slots
    gpu_zonal_redundancy_disabled    = !var.runner.gpu_zonal_redundancy
    labels                           = local.labels

    scaling {
      min_instance_count = each.value.min_instances
      max_instance_count = each.value.max_instances
    }

    node_selector {
      accelerator = each.value.gpu_type
    }

    containers {
      image = var.runner_image

      ports {
        container_port = local.runner_port
      }

      resources {
        limits = {
          cpu              = var.runner.cpu
          memory           = var.runner.memory
          "nvidia.com/gpu" = "1"
        }
        # CPU stays allocated between requests (instance-based billing): the runner
        # heartbeats leases and uploads results after answering.
        cpu_idle          = false
        startup_cpu_boost = true
      }

      dynamic "env" {
        for_each = merge(local.runner_env, local.pool_runner_env[each.key])
        content {
          name  = env.key
          value = env.value
        }
      }

      dynamic "env" {
        for_each = local.runner_secret_env
        content {
          name = env.key
          value_source {
            secret_key_ref {
              secret  = google_secret_manager_secret.secret[env.value].secret_id
              version = "latest"
            }
          }
        }
      }

      volume_mounts {
        name       = "models"
        mount_path = "/models"
      }

      # ComfyUI and FaceFusion start inside the container; allow them 5 minutes.
      startup_probe {
        initial_delay_seconds = 0
        period_seconds        = 10
        timeout_seconds       = 5
        failure_threshold     = 30
        http_get {
          path = "/api/health"
          port = local.runner_port
        }
      }
    }

    volumes {
      name = "models"
      gcs {
        bucket    = local.models_bucket
        read_only = true
      }
    }
  }

  lifecycle {
    precondition {
      condition     = contains(["nvidia-l4", "nvidia-rtx-pro-6000"], each.value.gpu_type)
      error_message = "Cloud Run offers nvidia-l4 and nvidia-rtx-pro-6000 GPUs; nvidia-tesla-t4 is for runner_mode = \"vm\" only."
    }
    precondition {
      condition     = !contains(local.storage_providers, "r2") || (contains(local.secrets_with_version, "r2-access-key") && contains(local.secrets_with_version, "r2-secret-key"))
      error_message = "storage uses r2: give the secrets r2-access-key and r2-secret-key a version (secret_values, or add them yourself and list them in secrets_out_of_band)."
    }
    precondition {
      condition     = !contains(local.storage_providers, "cf_images") || contains(local.secrets_with_version, "cf-images-api-token")
      error_message = "storage uses cf_images: give the secret cf-images-api-token a version (secret_values, or secrets_out_of_band)."
    }
  }

  depends_on = [
    google_project_service.apis,
    google_secret_manager_secret_iam_member.runner,
    google_secret_manager_secret_version.secret,
    google_storage_bucket_iam_member.runner_models,
  ]
}

# --- vm mode -------------------------------------------------------------------------

locals {
  # A zone of the region that offers the GPU (Compute Engine "GPU regions and zones",
  # https://cloud.google.com/compute/docs/gpus/gpu-regions-zones). Not REGION-a: that
  # zone does not exist in every region (europe-west1 has b, c and d) and not every zone
  # has every GPU. Regions missing here need runner_vm.zone.
  runner_vm_default_zones = {
    "nvidia-l4" = {
      "asia-south1"     = "asia-south1-a"
      "asia-southeast1" = "asia-southeast1-b"
      "europe-west1"    = "europe-west1-b"
      "europe-west4"    = "europe-west4-a"
      "us-central1"     = "us-central1-a"
      "us-east1"        = "us-east1-c"
      "us-east4"        = "us-east4-a"
      "us-west1"        = "us-west1-a"
    }
    "nvidia-tesla-t4" = {
      "asia-south1"     = "asia-south1-a"
      "asia-southeast1" = "asia-southeast1-b"
      "europe-west1"    = "europe-west1-b"
      "europe-west4"    = "europe-west4-b"
      "us-central1"     = "us-central1-a"
      "us-east1"        = "us-east1-c"
      "us-east4"        = "us-east4-a"
      "us-west1"        = "us-west1-a"
    }
  }
  # Each pool's zone: its own, else (primary) runner_vm.zone, else the table's.
  runner_vm_zones = {
    for name, pool in local.runner_pools : name => pool.zone != null ? pool.zone : try(local.runner_vm_default_zones[pool.gpu_type][pool.region], null)
  }
  # VMs by name: the primary pool's keep the single-region names RUNNER-N (their state
  # addresses), other pools' are RUNNER-POOL-N.
  runner_vms = var.runner_mode == "vm" ? merge([
    for name, pool in local.runner_pools : {
      for index in range(pool.max_instances) : "${pool.runner_name}-${index}" => { index = index, pool = name }
    }
  ]...) : {}
}

resource "google_compute_instance" "runner" {
  #checkov:skip=CKV_GCP_38:Boot disk holds only the public runner image and cached models; customer-supplied keys would need key handling on every boot.
  #checkov:skip=CKV_GCP_40:The pull-mode runner needs egress to the gateway and registries; no ingress is opened. Set runner_vm.external_ip = false behind Cloud NAT.
  for_each     = local.runner_vms
  project      = var.project_id
  zone         = local.runner_vm_zones[each.value.pool]
  name         = each.key
  machine_type = var.runner_vm.machine_type
  labels       = local.labels
  tags         = ["${var.prefix}-runner"]

  boot_disk {
    initialize_params {
      image = var.runner_vm.image
      size  = var.runner_vm.boot_disk_size_gb
      type  = "pd-balanced"
    }
  }

  guest_accelerator {
    type  = local.runner_pools[each.value.pool].gpu_type
    count = 1
  }

  # GPU VMs cannot live-migrate.
  scheduling {
    on_host_maintenance = "TERMINATE"
    automatic_restart   = true
  }

  network_interface {
    network = var.runner_vm.network
    # A subnetwork is regional: runner_vm.subnetwork is the primary pool's; the other
    # pools' VMs take the network's subnet in their own region.
    subnetwork = each.value.pool == "primary" ? var.runner_vm.subnetwork : null
    dynamic "access_config" {
      for_each = var.runner_vm.external_ip ? [1] : []
      content {}
    }
  }

  service_account {
    email  = google_service_account.runner[each.value.pool].email
    scopes = ["cloud-platform"]
  }

  shielded_instance_config {
    enable_secure_boot          = true
    enable_vtpm                 = true
    enable_integrity_monitoring = true
  }

  metadata = {
    block-project-ssh-keys    = "true"
    enable-oslogin            = "true"
    google-logging-enabled    = "true"
    google-monitoring-enabled = "true"
    serial-port-enable        = "false"
    startup-script = templatefile("${path.module}/templates/runner_vm_startup.sh.tftpl", {
      env           = merge(local.vm_runner_env, local.pool_runner_env[each.value.pool], { RUNNER_ID = each.key })
      image         = var.runner_image
      models_bucket = local.models_bucket
      port          = local.runner_port
      project_id    = var.project_id
      registry_host = split("/", var.runner_image)[0]
      secrets       = { for env_name, id in local.runner_secret_env : env_name => google_secret_manager_secret.secret[id].secret_id }
    })
  }

  lifecycle {
    precondition {
      condition     = local.runner_pools[each.value.pool].gpu_type != "nvidia-rtx-pro-6000"
      error_message = "runner_mode = \"vm\" supports gpu_type nvidia-l4 (g2 machine types) or nvidia-tesla-t4 (n1)."
    }
    precondition {
      condition     = local.runner_vm_zones[each.value.pool] != null
      error_message = "No default zone with this GPU is known for the pool's region: set the pool's zone (runner_vm.zone for primary; see https://cloud.google.com/compute/docs/gpus/gpu-regions-zones)."
    }
    precondition {
      condition     = startswith(coalesce(local.runner_vm_zones[each.value.pool], "-"), "${local.runner_pools[each.value.pool].region}-")
      error_message = "A runner VM's zone must be in its pool's region (runner_pools region and zone)."
    }
  }

  # The pulling runner's key works against the gateway only once its managed service is
  # enabled (the keys themselves cannot wait for that: gateway.tf).
  depends_on = [
    google_project_service.apis,
    google_project_service.gateway,
    google_secret_manager_secret_iam_member.runner,
    google_secret_manager_secret_version.runner_api_key,
    google_secret_manager_secret_version.secret,
    google_storage_bucket_iam_member.runner_models,
  ]
}
