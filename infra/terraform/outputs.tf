# Outputs, alphabetical. None carries a secret (API key strings and secret values stay
# in Secret Manager and the API Keys service).

output "api_key_names" {
  description = "Resource names of the client API keys; read a key with `gcloud services api-keys get-key-string NAME`."
  value       = { for name, key in google_apikeys_key.client : name => key.id }
}

output "api_url" {
  description = "Public base URL of the API (the API Gateway); clients call API_URL/api/..."
  value       = local.gateway_url
}

output "dashboard" {
  description = "Cloud Monitoring dashboard id."
  value       = google_monitoring_dashboard.comfyswap.id
}

output "function_urls" {
  description = "Direct URLs of the three functions (IAM-protected; clients use api_url)."
  value       = { for name, function in google_cloudfunctions2_function.api : name => function.service_config[0].uri }
}

output "image_repository" {
  description = "Docker repository to push the runner image to (REPOSITORY/runner:TAG)."
  value       = "${google_artifact_registry_repository.images.location}-docker.pkg.dev/${var.project_id}/${google_artifact_registry_repository.images.repository_id}"
}

output "models_bucket" {
  description = "Bucket mounted read-only at /models in the runner."
  value       = local.models_bucket
}

output "queue" {
  description = "Cloud Tasks queue of push dispatch (full resource id): the home pool's (primary's) shard 0."
  value       = google_cloud_tasks_queue.runner[local.pool_queue_keys[local.home_pool][0]].id
}

output "queues" {
  description = "Every Cloud Tasks queue of push dispatch (full resource ids), pool by pool in name order, each pool's in the dispatcher's order."
  value       = flatten([for name in sort(keys(local.runner_pools)) : [for key in local.pool_queue_keys[name] : google_cloud_tasks_queue.runner[key].id]])
}

output "results_bucket" {
  description = "Bucket holding task results."
  value       = google_storage_bucket.results.name
}

output "runner_pools" {
  description = "Each runner pool: its region, runner URL (null in vm mode), service account and queues."
  value = {
    for name, pool in local.runner_pools : name => {
      queues          = [for key in local.pool_queue_keys[name] : google_cloud_tasks_queue.runner[key].id]
      region          = pool.region
      runner_url      = local.push_mode ? google_cloud_run_v2_service.runner[name].uri : null
      service_account = google_service_account.runner[name].email
    }
  }
}

output "runner_service_account" {
  description = "Email of the home pool's (primary's) runner service account; runner_pools lists every pool's."
  value       = google_service_account.runner[local.home_pool].email
}

output "runner_url" {
  description = "URL of the home pool's (primary's) Cloud Run runner, the one the gateway routes to (IAM-protected; null in vm mode)."
  value       = local.push_mode ? google_cloud_run_v2_service.runner[local.home_pool].uri : null
}

output "runner_vms" {
  description = "Names of the runner VMs (vm mode)."
  value       = keys(google_compute_instance.runner)
}

output "secret_ids" {
  description = "Secret Manager secret ids by purpose; add versions with `gcloud secrets versions add ID --data-file=-`."
  value       = { for id, secret in google_secret_manager_secret.secret : id => secret.secret_id }
}
