# API Gateway: one public host for clients. It checks API keys (x-api-key: Google API
# keys restricted to this gateway) and routes each path to its function or to the
# runner with its own ID token (jwt_audience). The backends check the same key again
# (API_KEYS digests: owner, roles). Why API Gateway: docs/deploy.md.

resource "google_api_gateway_api" "api" {
  provider     = google-beta
  project      = var.project_id
  api_id       = "${var.prefix}-api"
  display_name = "ComfySwap API (${var.prefix})"
  labels       = local.labels
  depends_on   = [google_project_service.apis]
}

resource "google_api_gateway_api_config" "api" {
  provider             = google-beta
  project              = var.project_id
  api                  = google_api_gateway_api.api.api_id
  api_config_id_prefix = "${var.prefix}-"
  display_name         = "ComfySwap routes"
  labels               = local.labels

  openapi_documents {
    document {
      path = "openapi2.yaml"
      contents = base64encode(templatefile("${path.module}/templates/openapi2.yaml.tftpl", {
        api_key_required   = var.gateway.api_key_required
        create_task_url    = local.function_backends["create_task"]
        deadline_s         = format("%.1f", var.gateway.deadline_s)
        fetch_task_url     = local.function_backends["fetch_task"]
        get_task_url       = local.function_backends["get_task"]
        process_deadline_s = format("%.1f", var.gateway.process_deadline_s)
        runner_ops_url     = local.runner_ops_backend
        runner_url         = local.runner_backend
        title              = "${var.prefix}-api"
      }))
    }
  }

  gateway_config {
    backend_config {
      google_service_account = google_service_account.gateway.email
    }
  }

  # A config cannot change in place; the gateway moves to the new one, then the old goes.
  lifecycle {
    create_before_destroy = true
  }
}

resource "google_api_gateway_gateway" "api" {
  provider     = google-beta
  project      = var.project_id
  region       = local.gateway_region
  gateway_id   = "${var.prefix}-gateway"
  display_name = "ComfySwap gateway (${var.prefix})"
  api_config   = google_api_gateway_api_config.api.id
  labels       = local.labels
}

# API keys only work against a gateway once its managed service is enabled.
resource "google_project_service" "gateway" {
  project            = var.project_id
  service            = google_api_gateway_api.api.managed_service
  disable_on_destroy = false
  depends_on         = [google_api_gateway_gateway.api]
}

# Keys Terraform itself hands out: in vm mode, the pulling runner's (role runner). The
# lease reaper needs none: Cloud Scheduler calls its function with an OIDC token.
#
# The keys depend on the API (its managed service name), not on the gateway or on
# enabling the managed service: the backends' API_KEYS env holds the keys' digests and
# the gateway's config holds the backends' URLs, so a key that waited for the gateway
# would close a cycle (key -> gateway -> config -> function -> API_KEYS -> key) that
# `terraform validate` refuses. A key only has to be usable once the gateway serves,
# and google_project_service.gateway is enabled in the same apply.
resource "google_apikeys_key" "runner" {
  for_each     = var.runner_mode == "vm" ? toset(["runner"]) : toset([])
  project      = var.project_id
  name         = "${var.prefix}-runner"
  display_name = "ComfySwap pull-mode runner"

  restrictions {
    api_targets {
      service = google_api_gateway_api.api.managed_service
    }
  }

  depends_on = [google_project_service.apis]
}

resource "google_apikeys_key" "client" {
  for_each     = var.api_keys
  project      = var.project_id
  name         = "${var.prefix}-${each.key}"
  display_name = coalesce(each.value.display_name, "ComfySwap client ${each.key}")

  restrictions {
    api_targets {
      service = google_api_gateway_api.api.managed_service
    }
  }

  depends_on = [google_project_service.apis]
}
