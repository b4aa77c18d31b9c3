"""A replica's configs from its ReplicaSpec (what the deployment says, from the provider or from `serve`'s hand
flags) and this process's own options (where it listens, its limits, its timer, whether it compiles): the one place
where the spec's fields become EngineConfig's and ServerConfig's."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ember.provider.domain.accounts import DeploymentAccess
from ember.provider.domain.names import parse_deployment_name
from ember.provider.domain.replica_spec import ReplicaSpec
from ember.runtime.engine.engine import EngineConfig
from ember.runtime.serving.limits import Limits
from ember.runtime.serving.replica import ServerConfig


@dataclass(frozen=True)
class ProcessOptions:
    """What belongs to this process rather than to the deployment it serves."""

    limits: Limits = field(default_factory=Limits)
    reconcile_interval_s: float = ServerConfig.reconcile_interval_s
    compile: bool = False
    compile_cache: Path | None = None
    advertise_url: str | None = None  # where the gateway reaches this replica (registration.advertised_url)


def engine_config(spec: ReplicaSpec, process: ProcessOptions) -> EngineConfig:
    # An engine knob the spec leaves unset (None) keeps the engine's own default.
    unset_means_default = {"max_num_seqs": spec.max_num_seqs}
    return EngineConfig(device=spec.device, precision=spec.precision.value if spec.precision else None,
                        max_model_len=spec.max_model_len, kv_cache_tokens=spec.kv_cache_tokens,
                        max_loras=spec.max_loras, max_lora_rank=spec.max_lora_rank, prefix_caching=spec.prefix_caching,
                        compile=process.compile, compile_cache=process.compile_cache,
                        tensor_parallel_size=spec.accelerator_count,  # one rank per accelerator
                        **{k: v for k, v in unset_means_default.items() if v is not None})


def server_config(spec: ReplicaSpec, process: ProcessOptions) -> ServerConfig:
    account = parse_deployment_name(spec.deployment).account_id
    log = spec.request_log
    return ServerConfig(
        model_dir=spec.model,
        deployment=DeploymentAccess(spec.deployment, account, spec.base_model, spec.serverless),
        keys_url=spec.keys,
        usage_url=spec.usage,
        engine=engine_config(spec, process),
        max_queue=spec.max_queue,
        limits=process.limits,
        addons=dict(spec.addons),
        desired_addons_url=spec.desired_addons,
        store_url=spec.store,
        reconcile_interval_s=process.reconcile_interval_s,
        request_log_url=log.url if log else None,
        retention_days=log.retention_days if log else None,
        accelerator_type=spec.accelerator_type.value,
        accelerator_count=spec.accelerator_count,
        advertise_url=process.advertise_url,
    )
