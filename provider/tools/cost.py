"""Cost before `up`: a stack's resources priced per month from the same price table bills are made with.

A dedicated deployment costs its accelerators' hourly price x accelerator_count x replicas x 730 hours, at
`min_replicas` and at `max_replicas`; serverless deployments and serverless addons cost per token (their base
model's tier), so they are listed with that price; a fine-tuning job costs its training tokens (epochs x the
dataset's tokens: the job's own count once it has run, else 4 characters a token) at the fine-tuning tier of
its base model's size. A serverless deployment or addon on a model the catalog file deprecates gets a note with
its shutdown date. Values the engine does not know yet (preview) leave a resource out, as the policies do.
An estimate of a month of replicas at a fixed count equals the bill `ember usage` makes for those
accelerator-seconds (a test pins it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ember.provider.domain import catalog, catalog_lifecycle
from ember.provider.domain.kinds.deployment import DeploymentSpec
from ember.provider.domain.kinds.fine_tuning_job import FineTuningJobSpec
from ember.provider.domain.names import EMBER_TYPE_PREFIX, parse_model_name
from ember.provider.domain.spec import AcceleratorType
from ember.provider.providers.base import has_unknown
from ember.provider.tools.billing import DEFAULT_PRICES, PriceTable

HOURS_PER_MONTH = 730
CHARACTERS_PER_TOKEN = 4  # a dataset's tokens before its job has counted them


@dataclass(frozen=True)
class Resource:
    """A declared resource as the estimate reads it: its type (Deployment, LoRAAddon, …), name and inputs."""

    kind: str
    name: str
    props: dict[str, Any]


@dataclass
class CostEstimate:
    currency: str = "USD"
    deployments: list[dict] = field(default_factory=list)
    serverless: list[dict] = field(default_factory=list)
    fine_tuning: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # serverless uses of deprecated or shut-down models

    @property
    def total_monthly_usd_min(self) -> float:
        return round(sum(d["monthly_usd_min"] for d in self.deployments), 2)

    @property
    def total_monthly_usd_max(self) -> float:
        return round(sum(d["monthly_usd_max"] for d in self.deployments), 2)

    def as_dict(self) -> dict:
        return asdict(self) | {"total_monthly_usd_min": self.total_monthly_usd_min,
                               "total_monthly_usd_max": self.total_monthly_usd_max}


def _known(value: Any) -> bool:
    return value is not None and not has_unknown(value)


def _default(spec, name: str) -> Any:
    return spec.model_fields[name].default


def _number(props: dict, spec, name: str) -> float | None:
    value = props.get(name, _default(spec, name))
    return float(value) if _known(value) else None


def _parameters(base_model: Any, sizes: dict[str, int]) -> int | None:
    if not _known(base_model):
        return None
    entry = catalog.lookup(parse_model_name(base_model).resource_id)
    return entry.parameter_count if entry else sizes.get(base_model)


def deployment_cost(props: dict, prices: PriceTable) -> dict | None:
    """A dedicated deployment's monthly cost at min and max replicas; None when a value is not known yet."""
    accelerator = props.get("accelerator_type", _default(DeploymentSpec, "accelerator_type").value)
    count, low, high = (_number(props, DeploymentSpec, n) for n in ("accelerator_count", "min_replicas", "max_replicas"))
    if not _known(accelerator) or None in (count, low, high):
        return None
    hourly = prices.usd_per_accelerator_hour[AcceleratorType(accelerator)] * count
    return {"accelerator_type": accelerator, "accelerator_count": int(count),
            "monthly_usd_min": round(hourly * low * HOURS_PER_MONTH, 2),
            "monthly_usd_max": round(hourly * high * HOURS_PER_MONTH, 2)}


def estimate(resources: list[Resource], prices: PriceTable = DEFAULT_PRICES, dataset_tokens: dict[str, int] = (),
             model_sizes: dict[str, int] = (), lifecycles: catalog_lifecycle.CatalogFile = catalog_lifecycle.NO_FILE
             ) -> CostEstimate:
    """The monthly estimate of a stack's resources. `dataset_tokens`: dataset name → tokens (counted by a job,
    or estimated from characters); `model_sizes`: model name → parameters, for models outside the catalog;
    `lifecycles`: the catalog file, whose dates note the serverless uses of deprecated models."""
    result = CostEstimate(currency=prices.currency)
    dataset_tokens, model_sizes = dict(dataset_tokens), dict(model_sizes)
    for r in resources:
        props = r.props
        if r.kind == "Deployment" and props.get("deployment_type") == "serverless":
            size = _parameters(props.get("base_model"), model_sizes)
            if size is not None:
                result.serverless.append({"name": r.name, "usd_per_million_tokens": prices.per_million_tokens(size)})
            result.notes += _lifecycle_note(r, lifecycles)
        elif r.kind == "Deployment":
            cost = deployment_cost(props, prices)
            if cost is not None:
                result.deployments.append({"name": r.name} | cost)
        elif r.kind == "LoRAAddon" and props.get("serverless") is True:
            size = _parameters(props.get("base_model"), model_sizes)
            if size is not None:
                result.serverless.append({"name": r.name, "usd_per_million_tokens": prices.per_million_tokens(size)})
            result.notes += _lifecycle_note(r, lifecycles)
        elif r.kind == "FineTuningJob":
            tokens, epochs = dataset_tokens.get(props.get("dataset")), _number(props, FineTuningJobSpec, "epochs")
            size = _parameters(props.get("base_model"), model_sizes) or 0
            if tokens is not None and epochs is not None:
                training = int(tokens * epochs)
                price = prices.per_million_tokens(size, "fine_tuning_tiers")
                result.fine_tuning.append({"name": r.name, "training_tokens": training,
                                           "usd": round(training / 1e6 * price, 4)})
    return result


def _lifecycle_note(r: Resource, lifecycles: catalog_lifecycle.CatalogFile) -> list[str]:
    base = r.props.get("base_model")
    if not lifecycles.models or not _known(base):
        return []
    try:
        model_id = parse_model_name(base).resource_id
    except ValueError:  # the resource's check names it
        return []
    lifecycle = lifecycles.lifecycle(model_id)
    notice = lifecycle.notice(model_id, catalog_lifecycle.today()) if lifecycle else None
    return [f"{'serverless' if r.kind == 'Deployment' else 'serverless addon'} {r.name}: {notice}"] if notice else []


def tokens_from_characters(characters: int) -> int:
    return math.ceil(characters / CHARACTERS_PER_TOKEN)


def diff(before: CostEstimate, after: CostEstimate) -> list[tuple[str, str]]:
    """(resource, change) for every deployment whose monthly cost changes, and the total; "+$1,234/month" style,
    at max replicas (min too where it differs)."""
    old = {d["name"]: d for d in before.deployments}
    new = {d["name"]: d for d in after.deployments}
    lines = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a == b:
            continue
        change = _money((b or {}).get("monthly_usd_max", 0) - (a or {}).get("monthly_usd_max", 0))
        was = f"{a['accelerator_count']} x {a['accelerator_type']}" if a else "nothing"
        now = f"{b['accelerator_count']} x {b['accelerator_type']}" if b else "nothing"
        lines.append((name, f"{change}/month at max replicas ({was} → {now})"))
    total = after.total_monthly_usd_max - before.total_monthly_usd_max
    lines.append(("total", f"{_money(total)}/month at max replicas (${after.total_monthly_usd_max:,.2f}/month, "
                           f"${after.total_monthly_usd_min:,.2f} at min replicas)"))
    return lines


def _money(amount: float) -> str:
    return f"{'+' if amount >= 0 else '-'}${abs(amount):,.0f}"


def _resources(entries) -> list[Resource]:
    return [Resource(kind.removeprefix(EMBER_TYPE_PREFIX), name, props) for kind, name, props in entries
            if kind.startswith(EMBER_TYPE_PREFIX)]


def _local_facts(program, resources: list[Resource], outputs: dict[str, dict]) -> tuple[dict, dict]:
    """(dataset name → tokens, model name → parameters) from what the program's files and the state say."""
    from pathlib import Path

    from ember.provider.domain.datasets import DatasetError, read_dataset
    from ember.provider.domain.gguf_model import is_gguf, read_gguf
    from ember.provider.domain.model_files import ModelFilesError, inspect_base_model
    from ember.provider.domain.names import dataset_name, model_name

    tokens, sizes = {}, {}
    for r in resources:
        p, counted = r.props, outputs.get(r.name, {})
        source = p.get("source")
        local = _known(source) and isinstance(source, str) and "://" not in source
        if r.kind == "Dataset" and _known(p.get("dataset_id")) and local:
            try:
                tokens[dataset_name(p["account_id"], p["dataset_id"])] = tokens_from_characters(
                    read_dataset(str(Path(program) / source)).character_count)
            except DatasetError:
                continue
        elif r.kind == "Model" and _known(p.get("model_id")):
            name = model_name(p["account_id"], p["model_id"])
            if counted.get("parameter_count"):
                sizes[name] = int(counted["parameter_count"])
            elif local:
                path = Path(program) / source
                try:
                    sizes[name] = (read_gguf(path) if is_gguf(path) else inspect_base_model(path)).parameter_count
                except ModelFilesError:
                    continue
        elif r.kind == "FineTuningJob" and counted.get("dataset_tokens") and _known(p.get("dataset")):
            tokens[p["dataset"]] = int(counted["dataset_tokens"])  # counted by the job itself
    return tokens, sizes


def preview_costs(runner, prices: PriceTable = DEFAULT_PRICES, record_foreign: bool = False,
                  state: list[tuple[str, str, dict, dict]] | None = None) -> tuple[CostEstimate, CostEstimate]:
    """(the stack's current estimate, the planned one): the current state — `state`, the Pulumi backend's
    (type, name, inputs, outputs), or else the offline runner's — then a preview through the offline runner.
    `record_foreign` (`ember cost`) records other packages' resources as declared; `ember preview` refuses them."""
    from google.protobuf.json_format import MessageToDict

    if state is None:
        state = [(r["type"], r["name"], r["inputs"], r.get("outputs") or {}) for r in runner.state.resources.values()]
    current = _resources((kind, name, inputs) for kind, name, inputs, _ in state)
    outputs = {name: outs for _, name, _, outs in state}
    runner.foreign_in_preview = record_foreign
    runner.up(preview=True)
    planned = _resources((reg.type, reg.name, MessageToDict(reg.properties)) for reg in runner.registrations)
    tokens, sizes = _local_facts(runner.program_dir, planned + current, outputs)
    lifecycles = catalog_lifecycle.load(runner.config.catalog_file)  # the preview's checks read it already
    return estimate(current, prices, tokens, sizes, lifecycles), estimate(planned, prices, tokens, sizes, lifecycles)


def table(result: CostEstimate) -> str:
    lines = [f"{'deployment':<32} {'accelerators':<28} {'per month at min':>18} {'at max':>14}"]
    for d in result.deployments:
        lines.append(f"{d['name']:<32} {d['accelerator_count']} x {d['accelerator_type']:<24} "
                     f"{d['monthly_usd_min']:>18,.2f} {d['monthly_usd_max']:>14,.2f}")
    lines.append(f"{'total (' + result.currency + ')':<32} {'':<28} {result.total_monthly_usd_min:>18,.2f} "
                 f"{result.total_monthly_usd_max:>14,.2f}")
    lines += [f"serverless {s['name']}: {s['usd_per_million_tokens']:.2f} {result.currency} per million tokens"
              for s in result.serverless]
    lines += [f"fine-tuning {f['name']}: {f['training_tokens']:,} training tokens, {f['usd']:.4f} {result.currency}"
              for f in result.fine_tuning]
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)
