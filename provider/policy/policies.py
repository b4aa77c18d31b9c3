"""Ember's policies: the domain rules as mandatory policies, and guardrails a platform team configures.

Domain rules (the kinds' specs and domain/rules.py are their single source): names well formed and every other
spec rule, for every kind; custom base models never serverless; an addon only on deployments of its own base model;
model IDs unique. Guardrails (set with
`--policy-pack-config`): allowed accelerator types, GPUs per deployment, per stack and per account (across every
stack of the store), replicas, request-log retention, the bases that take serverless addons.

During preview some inputs are unknown: a Deployment's base_model is its Model's name, known only once
the Model exists. A resource-level rule that needs an unknown value is skipped; the stack-level rules
resolve such a value through the resource it comes from (the Model a base_model depends on).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pulumi
from pulumi_policy import (EnforcementLevel, PolicyConfigSchema, PolicyResource, ReportViolation, ResourceValidationArgs,
                           ResourceValidationPolicy, StackValidationArgs, StackValidationPolicy)
from pulumi_policy.proxy import _DictProxy, _is_unknown, _ListProxy

from ember.provider.backends.store import Store
from ember.provider.domain import catalog, catalog_lifecycle, file_kinds
from ember.provider.domain.kinds import BY_NAME, KINDS
from ember.provider.domain.names import (ID_PATTERN, check_id, deployment_name, model_name, owner_stack,
                                         parse_deployment_name, parse_model_name)
from ember.provider.domain.rules import Declaration, DeploymentFacts, addon_misfits, name_clashes
from ember.provider.domain.spec import DEFAULT_MAX_LORA_RANK, AcceleratorType, parse_known
from ember.provider.providers.base import ProviderConfig
from ember.provider.tools.cost import Resource, estimate

MODEL, DEPLOYMENT, ADDON, JOB = (BY_NAME[k].type_token for k in ("Model", "Deployment", "LoRAAddon", "FineTuningJob"))
SPECS = {kind.type_token: kind.spec for kind in KINDS}
KIND = {kind.type_token: kind.name for kind in KINDS}

# Spec errors on these fields are `ember-names`; on these (type, field) pairs, a stack-level rule that
# also sees through unknowns reports them; every other spec error is `ember-spec`.
NAME_FIELDS = {"account_id", "model_id", "deployment_id", "dataset_id", "job_id", "base_model", "deployments",
               "catalog_id", "dataset", "evaluation_dataset", "output_model"}
STACK_LEVEL = {(DEPLOYMENT, "deployment_type"), (ADDON, "serverless")}


class _Unknown:
    def __repr__(self) -> str:
        return "<unknown during preview>"


UNKNOWN = _Unknown()


def plain(value: Any) -> Any:
    """Props as the analyzer hands them (proxies that raise on unknowns) as plain data, unknowns as UNKNOWN."""
    if isinstance(value, _DictProxy):
        value = value["__target"]
    if isinstance(value, _ListProxy):
        value = value["__target"]
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [plain(v) for v in value]
    return UNKNOWN if _is_unknown(value) else value


def has_unknown(value: Any) -> bool:
    if isinstance(value, dict):
        return any(has_unknown(v) for v in value.values())
    if isinstance(value, list):
        return any(has_unknown(v) for v in value)
    return value is UNKNOWN


def inputs(resource_type: str, props: Any) -> dict[str, Any]:
    """A resource's spec inputs (outputs, derived values and the serialized provider left out)."""
    fields = SPECS[resource_type].model_fields
    return {k: v for k, v in plain(props).items() if k in fields and v is not None}


def known(value: Any) -> bool:
    return value is not None and not has_unknown(value)


def _top(field: str) -> str:
    return field.split(".")[0].split("[")[0]


def spec_errors(resource_type: str, props: Any) -> list[tuple[str, str]]:
    data = inputs(resource_type, props)
    _, errors = parse_known(SPECS[resource_type], data, {k for k, v in data.items() if has_unknown(v)})
    return errors


def _ember_only(validate: Callable[[str, dict, dict, ReportViolation], None]):
    """A resource validation for Ember's types only, given (type, inputs, config, report)."""

    def run(args: ResourceValidationArgs, report: ReportViolation) -> None:
        if args.resource_type in SPECS:
            validate(args.resource_type, inputs(args.resource_type, args.props), dict(args.get_config()), report)

    return run


def _spec_policy(name: str, description: str, wanted: Callable[[str, str], bool]) -> ResourceValidationPolicy:
    def run(args: ResourceValidationArgs, report: ReportViolation) -> None:
        if args.resource_type not in SPECS:
            return
        for field, message in spec_errors(args.resource_type, args.props):
            if wanted(args.resource_type, field):
                report(f"{KIND[args.resource_type]} {args.name}: {field or '(resource)'}: {message}")

    return ResourceValidationPolicy(name=name, description=description, validate=run)


# ---------------------------------------------------------------------------------------------------------
# Resolving names through the stack (for values unknown during preview)


def _model_name(model: PolicyResource) -> str | None:
    data = inputs(MODEL, model.props)
    account, model_id = data.get("account_id"), data.get("catalog_id") or data.get("model_id")
    return model_name(account, model_id) if known(account) and known(model_id) else None


def _deployment_name(deployment: PolicyResource) -> str | None:
    data = inputs(DEPLOYMENT, deployment.props)
    account, deployment_id = data.get("account_id"), data.get("deployment_id")
    return deployment_name(account, deployment_id) if known(account) and known(deployment_id) else None


def _base_of(resource: PolicyResource) -> str | None:
    """The base model name of a Deployment or LoRAAddon: its value, or the name of the Model it comes from."""
    value = inputs(resource.resource_type, resource.props).get("base_model")
    if known(value):
        return value
    for source in resource.property_dependencies.get("base_model", []):
        if source.resource_type == MODEL:
            return _model_name(source)
    return None


def _of_type(args: StackValidationArgs, resource_type: str) -> Iterator[PolicyResource]:
    return (r for r in args.resources if r.resource_type == resource_type)


def _catalog_entry(base: str) -> catalog.CatalogModel | None:
    return catalog.lookup(parse_model_name(base).resource_id)


# ---------------------------------------------------------------------------------------------------------
# Mandatory: the domain rules


def _serverless_bases(args: StackValidationArgs, report: ReportViolation) -> None:
    for deployment in _of_type(args, DEPLOYMENT):
        if inputs(DEPLOYMENT, deployment.props).get("deployment_type") != "serverless":
            continue
        base = _base_of(deployment)
        if base is None:
            continue  # known at update time, when the provider's check refuses it
        entry = _catalog_entry(base)
        if entry is None:
            report(f"Deployment {deployment.name}: deployment_type 'serverless' refuses custom base model {base!r}: "
                   f"only catalog models are served serverless; make it 'dedicated'", deployment.urn)
        elif not entry.serverless:
            offered = sorted(m.model_id for m in catalog.CATALOG.values() if m.serverless)
            report(f"Deployment {deployment.name}: 'serverless' is not offered for {entry.model_id!r}; "
                   f"it is for: {', '.join(offered)}", deployment.urn)


def _addons_on_their_base(args: StackValidationArgs, report: ReportViolation) -> None:
    deployments = {name: d for d in _of_type(args, DEPLOYMENT) if (name := _deployment_name(d))}
    for addon in _of_type(args, ADDON):
        targets = [deployments.get(n) for n in inputs(ADDON, addon.props).get("deployments", []) if known(n)]
        targets += [d for d in addon.property_dependencies.get("deployments", []) if d.resource_type == DEPLOYMENT]
        base, rank = _base_of(addon), _adapter_rank(inputs(ADDON, addon.props).get("source"))
        for deployment in {t.urn: t for t in targets if t is not None}.values():
            for field, message in addon_misfits(base, rank, _deployment_facts(deployment)):
                report(f"LoRAAddon {addon.name}: {field}: {message}", addon.urn)


def _deployment_facts(deployment: PolicyResource) -> DeploymentFacts:
    max_rank = _number(inputs(DEPLOYMENT, deployment.props).get("max_lora_rank"), DEFAULT_MAX_LORA_RANK)
    return DeploymentFacts(_deployment_name(deployment) or deployment.name, _base_of(deployment),
                           None if max_rank is None else int(max_rank))


def _adapter_rank(source: Any) -> int | None:
    """A local adapter's rank from its adapter_config.json (the pack runs beside the program), else None."""
    if not known(source) or not isinstance(source, str) or "://" in source:
        return None
    config = Path(source) / "adapter_config.json"
    if file_kinds.problem(config) is not None:  # a FIFO would block the pack forever; check names it
        return None
    try:
        return int(json.loads(config.read_text())["r"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # the provider's check names what is wrong with the files


def _unique_model_ids(args: StackValidationArgs, report: ReportViolation) -> None:
    declared: list[tuple[Declaration, PolicyResource]] = []
    for resource in (r for r in args.resources if r.resource_type in (MODEL, ADDON, JOB)):
        data = inputs(resource.resource_type, resource.props)
        trained = resource.resource_type == JOB  # the addon a job trains is a model of the stack too
        account = data.get("account_id")
        model_id = data.get("output_model") if trained else data.get("catalog_id") or data.get("model_id")
        if not (known(account) and known(model_id)):
            continue
        try:
            name = model_name(account, model_id)
        except ValueError:
            continue  # ember-names reports the ID
        declared.append((Declaration(name, f"{KIND[resource.resource_type]} {resource.name}", trained), resource))
    urns = {id(declaration): resource.urn for declaration, resource in declared}
    for declaration, message in name_clashes(d for d, _ in declared):
        field = "output_model" if declaration.trained else "model_id"
        report(f"{declaration.by}: {field}: {message}", urns[id(declaration)])


# ---------------------------------------------------------------------------------------------------------
# Guardrails


def _number(value: Any, default: float) -> float | None:
    if value is None:
        return default
    return float(value) if known(value) else None


def _gpus(data: dict) -> float | None:
    """Accelerators a deployment may hold at its largest (count per replica x max replicas); None if unknown."""
    accelerator = data.get("accelerator_type", "CPU")
    count, replicas = _number(data.get("accelerator_count"), 1), _number(data.get("max_replicas"), 1)
    if not known(accelerator) or count is None or replicas is None:
        return None
    return 0.0 if accelerator == AcceleratorType.CPU.value else count * replicas


def _allowed_accelerators(resource_type: str, data: dict, config: dict, report: ReportViolation) -> None:
    allowed = config.get("allowed", [a.value for a in AcceleratorType])
    accelerator = data.get("accelerator_type", "CPU")
    if resource_type == DEPLOYMENT and known(accelerator) and accelerator not in allowed:
        report(f"accelerator_type {accelerator!r} is not allowed by this stack's policy; allowed: {', '.join(allowed)}")


def _max_gpus_per_deployment(resource_type: str, data: dict, config: dict, report: ReportViolation) -> None:
    maximum = config.get("maximum", 16)
    gpus = _gpus(data) if resource_type == DEPLOYMENT else None
    if gpus is not None and gpus > maximum:
        report(f"accelerator_count {data.get('accelerator_count', 1):g} x max_replicas {data.get('max_replicas', 1):g} = "
               f"{gpus:g} accelerators, above this policy's maximum of {maximum:g} per deployment")


def _max_replicas(resource_type: str, data: dict, config: dict, report: ReportViolation) -> None:
    maximum = config.get("maximum", 16)
    replicas = _number(data.get("max_replicas"), 1) if resource_type == DEPLOYMENT else None
    if replicas is not None and replicas > maximum:
        report(f"max_replicas {replicas:g} is above this policy's maximum of {maximum:g}")


def _request_log_retention(resource_type: str, data: dict, config: dict, report: ReportViolation) -> None:
    maximum = config.get("maxRetentionDays", 30)
    logging = data.get("request_logging") if resource_type == DEPLOYMENT else None
    if not isinstance(logging, dict) or logging.get("enabled") is not True:
        return
    days = logging.get("retention_days")
    if known(days) and days > maximum:
        report(f"request_logging.retention_days {days:g} is above this policy's maximum of {maximum:g} days: "
               f"logged prompts and outputs must not be kept longer")


def _max_gpus_per_stack(args: StackValidationArgs, report: ReportViolation) -> None:
    maximum = args.get_config().get("maximum", 64)
    counts = [_gpus(inputs(DEPLOYMENT, d.props)) for d in _of_type(args, DEPLOYMENT)]
    total = sum(c for c in counts if c is not None)  # unknown counts are judged when they are known
    if total > maximum:
        report(f"the stack's deployments may hold {total:g} accelerators at max_replicas, above this policy's "
               f"maximum of {maximum:g} per stack")


# ---------------------------------------------------------------------------------------------------------
# Per-account GPU quota, across every stack of the store

# ProviderConfig.load puts the default store beside the program (its working directory); a policy pack runs in its
# own folder (the engine starts it there, with no word of the program's), so a store that would lie beside the
# program is one the pack cannot find: resolved under this root, it is refused rather than read from the wrong place.
_PROGRAM_UNSEEN = Path("/the-program-folder-the-policy-pack-cannot-see")


class _StackConfig:
    """The stack's config as the engine hands it to the pack (PULUMI_CONFIG), for ProviderConfig.load."""

    @staticmethod
    def get(key: str) -> str | None:
        return pulumi.runtime.get_config(key)


def _quotas(config: Mapping[str, Any]) -> tuple[float | None, dict[str, float], list[str]]:
    """(the default quota, or None for no limit; each account's quota; what is wrong with the config, naming the field
    and value): the engine checks the config schema, `ember preview` does not, so the policy checks it too."""
    problems: list[str] = []

    def accelerators(field: str, value: Any) -> float | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or \
                not float(value).is_integer():
            problems.append(f"{field}: {value!r} is not a number of accelerators (a whole number, 0 or more)")
            return None
        return float(value)

    default = config.get("default")
    default = None if default is None else accelerators("default", default)
    accounts = config.get("accounts") or {}
    if not isinstance(accounts, Mapping):
        problems.append(f"accounts: {accounts!r} is not an object of account IDs and their accelerators")
        accounts = {}
    quotas = {}
    for account, value in accounts.items():
        try:
            check_id(account, "account ID")
        except ValueError as exc:
            problems.append(f"accounts.{account}: {exc}")
            continue
        if (quota := accelerators(f"accounts.{account}", value)) is not None:
            quotas[account] = quota
    url = config.get("storeUrl")
    if url is not None and (not isinstance(url, str) or not url.strip()):
        problems.append(f"storeUrl: {url!r} is not a store URL (file:///path, s3://bucket/prefix …)")
    return default, quotas, problems


def _quota_store_url(config: Mapping[str, Any]) -> tuple[str, str | None]:
    """(the store every stack's deployments are recorded in, why it cannot be used or None): the policy's storeUrl,
    else what the provider resolves (the stack's ember:storeUrl, EMBER_STORE_URL, ember:stateDir, EMBER_STATE_DIR)."""
    if config.get("storeUrl"):
        return config["storeUrl"], None
    url = ProviderConfig.load(_StackConfig(), default_root=_PROGRAM_UNSEEN).store_url
    if url.startswith(f"file://{_PROGRAM_UNSEEN}"):
        return url, ("no store to read: the store beside the program (.ember/store, or a relative ember:stateDir) "
                     "cannot be found from the policy pack, which runs in its own folder; set storeUrl in this "
                     "policy's config, or the stack's ember:storeUrl, or EMBER_STORE_URL")
    return url, None


def _this_stack(deployments: list[PolicyResource]) -> set[str]:
    """This stack as the owners of its records name it: from the owner each declared Deployment carries (the same
    under the engine and `ember preview`), and from the engine's stack settings where it gave them."""
    stacks = set()
    for deployment in deployments:
        references = plain(deployment.props).get("references")
        if isinstance(references, dict) and (stack := owner_stack(references.get("owner"))):
            stacks.add(stack)
    if "PULUMI_PROJECT" in os.environ and "PULUMI_STACK" in os.environ:  # the engine's, not pulumi's placeholders
        stacks.add(f"{pulumi.get_organization()}/{pulumi.get_project()}/{pulumi.get_stack()}")
    return stacks


def _account_gpu_quota(args: StackValidationArgs, report: ReportViolation) -> None:
    config = args.get_config() or {}
    default, quotas, problems = _quotas(config)
    for problem in problems:
        report(f"policy config: {problem}")
    if problems:
        return  # a quota the platform team got wrong is no quota to judge by

    deployments = list(_of_type(args, DEPLOYMENT))
    declared: dict[str, list[tuple[str, float, bool]]] = defaultdict(list)  # account: (name, GPUs, this stack's)
    for deployment in deployments:
        data = inputs(DEPLOYMENT, deployment.props)
        account, gpus = data.get("account_id"), _gpus(data)
        if known(account) and gpus is not None:  # unknown ones are judged when they are known
            declared[account].append((_deployment_name(deployment) or deployment.name, gpus, True))
    # Accounts this stack adds accelerators to: a stack is not held to account for another team's deployments.
    judged = {account: quota for account, parts in declared.items()
              if (quota := quotas.get(account, default)) is not None and sum(g for _, g, _ in parts) > 0}
    if not judged:
        return  # nothing to judge: the store is not read

    url, problem = _quota_store_url(config)
    if problem:
        report(problem)
        return
    try:
        records = list(Store(url, tempfile.gettempdir()).deployment_records())  # once per run; reading takes no lock
    except Exception as exc:  # noqa: BLE001 - whatever stops the read (a protocol, credentials, a bad record)
        # Fail closed, as a mandatory policy must: a quota that cannot see the other stacks would let one team
        # take the cluster. The message names the URL and why; the platform team can set the policy advisory.
        report(f"the store {url} cannot be read ({type(exc).__name__}: {exc}); every stack's deployments count "
               f"towards an account's quota, so none is allowed past this policy until it can be read")
        return

    # A record this stack made (or one it now declares under the same name, its GPUs known yet or not) is what the
    # stack declares now.
    names = {name for deployment in deployments if (name := _deployment_name(deployment))}
    stacks = _this_stack(deployments)
    for record in records:
        if record.name in names or owner_stack(record.owner) in stacks:
            continue
        account = parse_deployment_name(record.name).account_id  # a serverless deployment's is its declarer's
        if account in judged and (gpus := _gpus(record.inputs)):
            declared[account].append((record.name, gpus, False))

    for account, quota in sorted(judged.items()):
        parts = sorted(declared[account], key=lambda part: (-part[1], part[0]))
        total, ours = sum(g for _, g, _ in parts), sum(g for _, g, own in parts if own)
        if total <= quota:
            continue
        largest = ", ".join(f"{name} {gpus:g}" + (" (this stack)" if own else "") for name, gpus, own in parts[:5])
        report(f"account {account}: its deployments may hold {total:g} accelerators at max_replicas across every "
               f"stack of the store ({ours:g} in this stack, {total - ours:g} in others), above its quota of "
               f"{quota:g}{'' if account in quotas else ' (the default)'}; the largest: {largest}")


ADDON_BASES = sorted(m.model_id for m in catalog.CATALOG.values() if m.serverless_addons)


def _serverless_addons(args: StackValidationArgs, report: ReportViolation) -> None:
    bases = args.get_config().get("bases", ADDON_BASES)
    for addon in _of_type(args, ADDON):
        if inputs(ADDON, addon.props).get("serverless") is not True:
            continue
        base = _base_of(addon)
        if base is not None and parse_model_name(base).resource_id not in bases:
            report(f"LoRAAddon {addon.name}: serverless: base model {base!r} does not take serverless addons "
                   f"under this policy; these do: {', '.join(bases)}", addon.urn)


def _deprecated_serverless_models(args: ResourceValidationArgs, report: ReportViolation) -> None:
    # The dates come with the resource (resources.py puts the catalog file's in its references): the pack runs in its
    # own folder, without the stack's `ember:catalogFile`, and sees what the program and the provider saw.
    if args.resource_type not in (DEPLOYMENT, ADDON):
        return
    props = plain(args.props)
    serverless = props.get("deployment_type") == "serverless" if args.resource_type == DEPLOYMENT else \
        props.get("serverless") is True
    facts = (props.get("references") or {}).get("base_model_lifecycle") if serverless else None
    if not isinstance(facts, dict) or has_unknown(facts):
        return
    try:
        lifecycle = catalog_lifecycle.Lifecycle.model_validate({k: v for k, v in facts.items() if k != "model"})
    except ValueError:
        return  # the resource's check names what is wrong with the catalog file
    notice = lifecycle.notice(str(facts.get("model")), catalog_lifecycle.today())
    if notice:
        report(f"{KIND[args.resource_type]} {args.name}: {notice}; move it to another catalog model, or to a "
               f"dedicated deployment")


def _monthly_budget(args: StackValidationArgs, report: ReportViolation) -> None:
    config = args.get_config()
    maximum, judged_at = config.get("maximum", 50000), config.get("judgeAt", "max_replicas")
    deployments = [Resource("Deployment", d.name, inputs(DEPLOYMENT, d.props)) for d in _of_type(args, DEPLOYMENT)]
    result = estimate(deployments)  # unknown values leave a deployment out until they are known
    column = "monthly_usd_max" if judged_at == "max_replicas" else "monthly_usd_min"
    total = sum(d[column] for d in result.deployments)
    if total > maximum:
        costliest = max(result.deployments, key=lambda d: d[column])
        report(f"the stack's deployments are estimated at ${total:,.2f}/month at {judged_at}, above this policy's "
               f"budget of ${maximum:,.2f}/month; the most expensive is {costliest['name']} "
               f"(${costliest[column]:,.2f}/month, {costliest['accelerator_count']} x {costliest['accelerator_type']})")


def _integer(description: str, default: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": 0, "default": default, "description": description}


def _resource_policy(name, description, validate, schema=None) -> ResourceValidationPolicy:
    return ResourceValidationPolicy(name=name, description=description, validate=_ember_only(validate),
                                    config_schema=schema)


POLICIES = [
    # mandatory: the domain
    _spec_policy("ember-names", "Account, model and deployment IDs and names are well formed",
                 lambda kind, field: _top(field) in NAME_FIELDS),
    _spec_policy("ember-spec", "Every other rule of Ember's resource spec (replicas, autoscaling, precision, LoRA ranks …)",
                 lambda kind, field: _top(field) not in NAME_FIELDS and (kind, _top(field)) not in STACK_LEVEL),
    StackValidationPolicy(name="ember-serverless-catalog-bases-only",
                          description="Serverless deployments serve catalog base models only, never custom ones",
                          validate=_serverless_bases),
    StackValidationPolicy(name="ember-addons-on-their-base-deployments",
                          description="A LoRA addon is attached only to deployments of its own base model, within "
                                      "their max_lora_rank",
                          validate=_addons_on_their_base),
    StackValidationPolicy(name="ember-unique-model-ids",
                          description="No two models or addons of a stack (a fine-tuning job's output included) "
                                      "share an ID (model IDs are globally unique)",
                          validate=_unique_model_ids),
    # guardrails
    _resource_policy("ember-allowed-accelerators", "Deployments use only the accelerator types the platform allows",
                     _allowed_accelerators, PolicyConfigSchema({"allowed": {
                         "type": "array", "items": {"enum": [a.value for a in AcceleratorType]},
                         "default": [a.value for a in AcceleratorType]}})),
    _resource_policy("ember-max-gpus-per-deployment", "A deployment holds at most N accelerators at max_replicas",
                     _max_gpus_per_deployment, PolicyConfigSchema({"maximum": _integer("accelerators", 16)})),
    _resource_policy("ember-max-replicas", "A deployment scales to at most N replicas",
                     _max_replicas, PolicyConfigSchema({"maximum": _integer("replicas", 16)})),
    _resource_policy("ember-request-logging-retention", "Request logging, where opted in, keeps records at most N days",
                     _request_log_retention, PolicyConfigSchema({"maxRetentionDays": _integer("days", 30)})),
    StackValidationPolicy(name="ember-max-gpus-per-stack",
                          description="A stack's deployments hold at most N accelerators at max_replicas",
                          validate=_max_gpus_per_stack,
                          config_schema=PolicyConfigSchema({"maximum": _integer("accelerators", 64)})),
    StackValidationPolicy(name="ember-account-gpu-quota",
                          description="An account's deployments, across every stack of the store, hold at most N "
                                      "accelerators at max_replicas",
                          validate=_account_gpu_quota,
                          config_schema=PolicyConfigSchema({
                              "storeUrl": {"type": "string", "minLength": 1,
                                           "description": "the store every stack records its deployments in"},
                              "default": {"type": "integer", "minimum": 0,
                                          "description": "accelerators per account (omitted: no limit)"},
                              "accounts": {"type": "object", "propertyNames": {"pattern": ID_PATTERN},
                                           "additionalProperties": {"type": "integer", "minimum": 0},
                                           "description": "accelerators of named accounts"}})),
    StackValidationPolicy(name="ember-monthly-budget",
                          description="A stack's dedicated deployments cost at most a monthly budget (USD, Ember's "
                                      "list prices), judged at max_replicas or min_replicas",
                          validate=_monthly_budget,
                          config_schema=PolicyConfigSchema({
                              "maximum": {"type": "number", "minimum": 0, "default": 50000, "description": "USD"},
                              "judgeAt": {"enum": ["max_replicas", "min_replicas"], "default": "max_replicas"}})),
    StackValidationPolicy(name="ember-serverless-addons",
                          description="Serverless addons only on the base models that take them",
                          validate=_serverless_addons,
                          config_schema=PolicyConfigSchema({"bases": {
                              "type": "array", "items": {"type": "string"}, "default": ADDON_BASES}})),
    # Advisory unless configured mandatory: within its notice period a deprecated model still serves, and a stack
    # blocked for it could not ship an unrelated fix; from the shutdown date the provider's check refuses it anyway.
    ResourceValidationPolicy(name="ember-no-deprecated-serverless-models",
                             description="No serverless deployment or serverless addon on a catalog model deprecated "
                                         "or shut down for serverless use (the catalog file's dates)",
                             validate=_deprecated_serverless_models, enforcement_level=EnforcementLevel.ADVISORY),
]
