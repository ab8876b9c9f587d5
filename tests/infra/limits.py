"""Platform limits the Terraform configuration must stay within, held as data with the
documentation each comes from (checked by tests/infra/test_deploy_checks.py)."""

from __future__ import annotations

# Cloud Tasks, RateLimits.max_dispatches_per_second: "The maximum allowed value is 500."
# https://cloud.google.com/tasks/docs/reference/rest/v2/projects.locations.queues#ratelimits
QUEUE_MAX_DISPATCHES_PER_SECOND = 500
# Same page, max_concurrent_dispatches: "The maximum allowed value is 5,000."
QUEUE_MAX_CONCURRENT_DISPATCHES = 5000

# Cloud Tasks, Task.dispatch_deadline for HTTP targets: "The default and maximum is
# 30 minutes; the minimum is 15 seconds."
# https://cloud.google.com/tasks/docs/reference/rest/v2/projects.locations.queues.tasks#Task
DISPATCH_DEADLINE_MAX_S = 1800
DISPATCH_DEADLINE_MIN_S = 15
# What a push delivery spends outside the engine (TASK_TIMEOUT_S bounds the engine only):
# input downloads (FETCH_TIMEOUT_S each) and the result upload. The delivery must outlast
# engine + this, or Cloud Tasks gives up on a delivery that is still running.
PUSH_TRANSFER_ALLOWANCE_S = 300

# Cloud Run request timeout: at most 60 minutes.
# https://cloud.google.com/run/docs/configuring/request-timeout
CLOUD_RUN_MAX_TIMEOUT_S = 3600

# Cloud Run GPU (services): "For L4 GPUs, you must use a minimum of 4 CPU and 16 GiB of
# memory"; "For NVIDIA RTX PRO 6000 Blackwell GPU, you must use a minimum of 20 CPU and
# 80 GiB of memory"; "You must use instance-based billing to use the GPU feature".
# https://cloud.google.com/run/docs/configuring/services/gpu
CLOUD_RUN_GPU_MINIMUMS = {
    "nvidia-l4": {"cpu": 4, "memory_gib": 16},
    "nvidia-rtx-pro-6000": {"cpu": 20, "memory_gib": 80},
}

# Cloud Run GPU zonal redundancy is on unless turned off, and each setting draws on its
# own quota ("Total Nvidia L4 GPU allocation, with/without zonal redundancy, per project
# per region"); the deploy guide asks for the "without" quota, so the service must say
# so explicitly. https://cloud.google.com/run/docs/configuring/services/gpu-zonal-redundancy
GPU_QUOTA_REQUESTED = "without zonal redundancy"

# Cloud Functions (2nd gen) concurrency: "you must set the CPU to 1 or more" to handle
# more than one request per instance.
# https://cloud.google.com/functions/docs/configuring/concurrency
FUNCTION_CONCURRENCY_MIN_CPU = 1

# Log-based metrics: the Monitoring API answers "Cannot find metric(s) ... If a metric was
# created recently, it could take up to 10 minutes to become available" to an alert
# policy created right after its metric (hashicorp/terraform-provider-google#11102).
LOG_METRIC_PROPAGATION_S = 600

# Zones offering each GPU on Compute Engine, for the regions this deployment names a
# default zone for. https://cloud.google.com/compute/docs/gpus/gpu-regions-zones
GPU_ZONES = {
    "nvidia-l4": {
        "asia-south1": {"a", "b", "c"},
        "asia-southeast1": {"a", "b", "c"},
        "europe-west1": {"b", "c"},
        "europe-west4": {"a", "b", "c"},
        "us-central1": {"a", "b", "c"},
        "us-east1": {"b", "c", "d"},
        "us-east4": {"a", "c"},
        "us-west1": {"a", "b", "c"},
    },
    "nvidia-tesla-t4": {
        "asia-south1": {"a", "b"},
        "asia-southeast1": {"a", "b", "c"},
        "europe-west1": {"b", "c", "d"},
        "europe-west4": {"b", "c"},
        "us-central1": {"a", "b", "c", "f"},
        "us-east1": {"c", "d"},
        "us-east4": {"a", "b", "c"},
        "us-west1": {"a", "b"},
    },
}

# The first Terraform release that accepts each language feature (CHANGELOG of
# hashicorp/terraform): a configuration using one must not let older releases in.
TERRAFORM_FEATURES = {
    "precondition/postcondition": "1.2.0",
    "optional() with a default": "1.3.0",
    "startswith()/endswith()": "1.3.0",
    "terraform_data": "1.4.0",
    "check block": "1.5.0",
    "import block": "1.5.0",
    "removed block": "1.7.0",
    "validation referring to another variable": "1.9.0",
}
