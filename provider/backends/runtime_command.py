"""The runtime's command line for one deployment's replicas, built once for every cluster backend: the
local cluster starts processes with it, Kubernetes puts it in the pod template."""

from __future__ import annotations

from ember.provider.domain.kinds.deployment import DeploymentSpec
from ember.provider.domain.spec import DeploymentType
from ember.provider.domain.store_layout import StoreLayout


def serve_arguments(spec: DeploymentSpec, model_dir: str, base_model: str, store: StoreLayout,
                    request_log: str) -> list[str]:
    """`python -m ember.runtime` arguments (without the listening address): the model, whom it serves, and
    the store (where the admin API finds addons by name), and where in it its keys, usage and desired addon
    set live."""
    arguments = ["serve", "--model-dir", model_dir, "--deployment", spec.name, "--base-model", base_model,
                 "--keys", store.keys, "--usage", store.usage,
                 "--store", store.root, "--desired-addons", store.desired_addons(spec.account_id, spec.deployment_id),
                 "--max-loras", str(spec.max_loras), "--max-lora-rank", str(spec.max_lora_rank),
                 "--dtype", spec.precision.value, "--accelerator-type", spec.accelerator_type.value,
                 "--accelerator-count", str(spec.accelerator_count)]
    if spec.deployment_type is DeploymentType.SERVERLESS:
        arguments.append("--serverless")
    if spec.request_logging.enabled:
        arguments += ["--request-log", request_log, "--retention-days", str(spec.request_logging.retention_days)]
    return arguments
