"""Model, LoRAAddon, Deployment, Dataset, FineTuningJob and Gateway as Pulumi resources; their typed Args (args.py) are
generated from the kinds' specs.

    base = Model("tiny-llama", ModelArgs(account_id="acme", source="models/tiny-llama"))
    prod = Deployment("prod", DeploymentArgs(account_id="acme", base_model=base))
    LoRAAddon("pirate", LoRAAddonArgs(account_id="acme", base_model=base, source="models/pirate", deployments=[prod]))
    data = Dataset("chats", DatasetArgs(account_id="acme", source="chats.jsonl"))
    job = FineTuningJob("tune", FineTuningJobArgs(account_id="acme", base_model=base, dataset=data, output_model="v1"))
    LoRAAddon("tuned", LoRAAddonArgs(account_id="acme", base_model=base, source=job, deployments=[prod]))
    front = Gateway("front", GatewayArgs(account_id="platform"))    # one endpoint for every deployment of the store

Passing a resource where a name is expected (base_model=base, deployments=[prod]) also makes the
dependency explicit and carries the base model's digest, so new base weights replace what runs on them.
IDs default to the resource name. The type tokens are pulumi-python:dynamic/ember:Model and friends.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import pulumi
from pulumi.dynamic import Resource
from pulumi.output import UNKNOWN

# Every Args class, so that a program's `from ember.provider.resources import *` finds them beside the resources.
from ember.provider.args import *  # noqa: F403
from ember.provider.domain import catalog_lifecycle
from ember.provider.domain.kinds import BY_NAME
from ember.provider.domain.names import (api_key_name, dataset_name, deployment_name, fine_tuning_job_name,
                                         gateway_name, model_name, parse_deployment_name, parse_gateway_name,
                                         parse_model_name)
from ember.provider.domain.rules import Declaration, name_clash
from ember.provider.domain.spec import DEFAULT_MAX_LORA_RANK, normalise_source

MODEL, LORA_ADDON, DEPLOYMENT, DATASET, FINE_TUNING_JOB, GATEWAY, API_KEY = (BY_NAME[name] for name in (
    "Model", "LoRAAddon", "Deployment", "Dataset", "FineTuningJob", "Gateway", "ApiKey"))


class ProgramError(pulumi.RunError, ValueError):
    """A resource this program cannot declare, said as the offline runner says a check failure: `<Kind> <name>:
    <field>: <message>`. A pulumi.RunError, so the Pulumi CLI prints its message alone, not the program's
    traceback; the offline runner does the same."""

    def __init__(self, kind: str, resource_name: str, field: str, message: str):
        super().__init__(f"{kind} {resource_name}: {field}: {message}")
        self.field, self.message = field, message


def default_id(resource_name: str) -> str:
    """A valid ID from a Pulumi resource name: lower case, [a-z0-9-], at most 63 characters."""
    slug = re.sub(r"[^a-z0-9-]+", "-", resource_name.lower()).strip("-")[:63].strip("-")
    return slug or "resource"


def resource_owner(resource_name: str) -> str:
    """The resource as its stack knows it (organization, project, stack, name): the same across its replacements,
    another stack's differs (a "dev" stack of another organization on the same store too)."""
    return f"{pulumi.get_organization()}/{pulumi.get_project()}/{pulumi.get_stack()}/{resource_name}"


def props_of(args: Any) -> dict[str, Any]:
    """A dataclass of inputs as a property dict (no deep copy: inputs may be Outputs)."""
    props = {}
    for f in fields(args):
        value = getattr(args, f.name)
        if value is not None:
            props[f.name] = _prop(value)
    return props


def _prop(value: Any) -> Any:
    """An input as a property: nested Args (alone, or the values of a mapping) become dicts."""
    if is_dataclass(value):
        return props_of(value)
    if isinstance(value, dict):
        return {k: _prop(v) for k, v in value.items()}
    return value


def _plain(*values: Any) -> bool:
    return all(isinstance(v, (str, int, float, bool)) or v is None for v in values)


def _name(make, *parts: Any) -> "pulumi.Input[str]":
    """A resource's full name from its inputs: a plain string when they are plain, else an Output.

    Names come from inputs, never from outputs: in a preview of an update the engine hands back a dynamic
    resource's inputs as its outputs, so an output name would be unknown and every dependent would show a
    replacement. A name the inputs cannot make (an ID of 64 characters) is never known: the resource's check
    refuses the ID, naming the field, as it refuses every bad input, instead of the program dying half-way."""
    return _made(make, parts) if _plain(*parts) else pulumi.Output.all(*parts).apply(lambda p: _made(make, p))


def _made(make, parts) -> "pulumi.Input[str]":
    try:
        return make(*parts)
    except ValueError:
        return pulumi.Output.from_input(UNKNOWN)


class _Declared:
    """What one program declares, for the rules that span resources: a dynamic provider's check sees one
    resource at a time, so each resource carries the facts it needs about the ones it references."""

    def __init__(self) -> None:
        self.models: dict[str, tuple[Declaration, dict[str, Any]]] = {}  # model name → (who, its facts)
        self.gateway: str | None = None  # the resource name of the program's gateway


_DECLARED: "weakref.WeakKeyDictionary[Any, _Declared]" = weakref.WeakKeyDictionary()
_FALLBACK = _Declared()


def _declared() -> _Declared:
    # One per program run, whose resource monitor is its own (the offline runner and tests run many in a process).
    monitor = pulumi.runtime.settings.SETTINGS.monitor
    try:
        return _DECLARED.setdefault(monitor, _Declared())
    except TypeError:  # no monitor (not weakly referable): a program outside any run
        return _FALLBACK


def _declare_model(kind: str, resource_name: str, name: Any, facts: dict[str, Any], field: str = "model_id") -> None:
    """A model this program declares (a fine-tuning job's output included): refused at once if it takes a name an
    earlier one took (domain/rules.py), so the program stops naming both before anything is planned."""
    if not isinstance(name, str):
        return  # an ID only known later: the store refuses a taken one at create
    declared = _declared().models
    declaration = Declaration(name, f"{kind} {resource_name}", trained=field == "output_model")
    if name in declared:
        raise ProgramError(kind, resource_name, field, name_clash(declared[name][0], declaration))
    declared[name] = (declaration, facts)


def _local(source: Any) -> str | None:
    """A source the provider can read at check time (a local directory), else None."""
    if not isinstance(source, str) or "://" in source and not source.startswith("file://"):
        return None
    return source.removeprefix("file://")


def _weights_identity(model: "Model") -> "pulumi.Input[str]":
    """What decides that the base weights changed, known in preview: the content digest check computes from a
    local source, else the normalised remote URL or the catalog ID (a new one replaces the Model itself)."""
    if model._source is not None and _local(model._source) is not None:
        return model.source_digest
    if isinstance(model._source, str):
        try:
            return f"source:{normalise_source(model._source)}"
        except ValueError:
            return model.digest  # the Model's check refuses the source, naming it
    if isinstance(model._catalog_id, str):
        return f"catalog:{model._catalog_id}"
    return model.digest


def _base(props: dict[str, Any], base_model: Any, refs: dict[str, Any], depends_on: list) -> None:
    if isinstance(base_model, Model):
        props["base_model"] = base_model.model_name
        props["base_model_digest"] = _weights_identity(base_model)
        refs["base_model"] = {"declared": True, "source": _local(base_model._source)}
        depends_on.append(base_model)
        return
    props["base_model"] = base_model
    if isinstance(base_model, str):
        found = _declared().models.get(base_model)
        refs["base_model"] = found[1] if found else {"declared": False, "source": None}


def _serverless_lifecycle(base_model: Any, refs: dict[str, Any]) -> tuple[str, catalog_lifecycle.Lifecycle] | None:
    """A serverless use's base model and its dates in the catalog file, put in `refs` for the policy pack (which sees
    no `ember:` config); None without dates, with a name not known yet, or a file the resource's check refuses."""
    if not isinstance(base_model, str):
        return None
    try:
        model_id = parse_model_name(base_model).resource_id
        path = catalog_lifecycle.locate(pulumi.Config("ember").get("catalogFile"), Path.cwd())  # the program's folder
        lifecycle = catalog_lifecycle.load(path).lifecycle(model_id)
    except ValueError:  # a bad name or catalog file: the resource's check names the field and the value
        return None
    if lifecycle is None:
        return None
    refs["base_model_lifecycle"] = {"model": model_id} | lifecycle.model_dump(mode="json")
    return model_id, lifecycle


def _warn_if_deprecated(resource: Resource, what: str, found: tuple[str, catalog_lifecycle.Lifecycle] | None) -> None:
    """The preview's warning in a model's notice period. The program says it: a Python dynamic provider cannot send
    the engine a warning (its pulumi.log is a print: pulumi/pulumi#20409). From the shutdown date check refuses."""
    if found is None:
        return
    model_id, lifecycle = found
    on = catalog_lifecycle.today()
    if lifecycle.phase(on) == "deprecated":
        pulumi.log.warn(f"{what}: {lifecycle.notice(model_id, on)}; move it to another catalog model, or to a "
                        f"dedicated deployment, before then", resource=resource)


def _with_dependencies(opts: pulumi.ResourceOptions | None, depends_on: list) -> pulumi.ResourceOptions | None:
    # Names are passed as plain strings (computed from inputs), so the dependency is stated explicitly.
    return pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(depends_on=depends_on)) if depends_on else opts


def _get(cls, resource_name: str, id: "pulumi.Input[str]", opts: pulumi.ResourceOptions | None, provider,
         parse_name, id_field: str, outputs: list[str]):
    """Adopt an existing store entry by its full name (`accounts/<a>/<collection>/<id>`)."""
    try:
        name = parse_name(id)
    except ValueError as exc:
        raise ProgramError(cls.__name__, resource_name, "id", str(exc)) from None
    props = {"account_id": name.account_id, id_field: name.resource_id} | dict.fromkeys(outputs)
    resource = cls.__new__(cls)
    Resource.__init__(resource, provider, resource_name, props, pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(id=id)))
    return resource, str(name)


class Model(Resource, module="ember", name=MODEL.name):
    name: pulumi.Output[str]  # accounts/<account>/models/<model_id>
    state: pulumi.Output[str]
    message: pulumi.Output[str | None]
    digest: pulumi.Output[str]
    source_digest: pulumi.Output[str | None]  # derived at check from a local source
    architecture: pulumi.Output[str]
    parameter_count: pulumi.Output[int]

    _OUTPUTS = list(MODEL.outputs.model_fields)  # the annotations above are pinned to them by a test

    def __init__(self, resource_name: str, args: ModelArgs, opts: pulumi.ResourceOptions | None = None):
        props = props_of(args)
        if args.model_id is None and args.catalog_id is None:
            props["model_id"] = default_id(resource_name)
        self._source, self._catalog_id = args.source, args.catalog_id
        self.model_name = _name(model_name, args.account_id, props.get("model_id", args.catalog_id))
        _declare_model("Model", resource_name, self.model_name, {"declared": True, "source": _local(args.source)})
        super().__init__(MODEL.provider_class(), resource_name, props | dict.fromkeys(self._OUTPUTS), opts)

    @staticmethod
    def get(resource_name: str, id: str, opts: pulumi.ResourceOptions | None = None) -> "Model":
        """An existing model (`accounts/<a>/models/<id>`), read from the store; Deployments may then name it."""
        model, name = _get(Model, resource_name, id, opts, MODEL.provider_class(), parse_model_name, "model_id",
                           Model._OUTPUTS)
        model._source = model._catalog_id = None
        model.model_name = name
        _declare_model("Model", resource_name, name, {"declared": True, "source": None})
        return model


class Deployment(Resource, module="ember", name=DEPLOYMENT.name):
    name: pulumi.Output[str]  # accounts/<account>/deployments/<deployment_id>
    state: pulumi.Output[str]
    message: pulumi.Output[str | None]
    endpoints: pulumi.Output[list[str]]
    ready_replicas: pulumi.Output[int]
    serving_digest: pulumi.Output[str | None]  # the base weights the replicas serve
    generation: pulumi.Output[str | None]  # which create made what runs under its name

    _OUTPUTS = list(DEPLOYMENT.outputs.model_fields)

    def __init__(self, resource_name: str, args: DeploymentArgs, opts: pulumi.ResourceOptions | None = None):
        # whose it is: a replacement's create (made before the old one is deleted) takes over its own name only
        props, refs, depends_on = props_of(args), {"owner": resource_owner(resource_name)}, []
        _base(props, args.base_model, refs, depends_on)
        if args.deployment_id is None:
            props["deployment_id"] = default_id(resource_name)
        self.deployment_name = _name(deployment_name, args.account_id, props["deployment_id"])
        # what an addon on this deployment needs to know at its own check
        self._facts = {"base_model": props["base_model"], "max_lora_rank": args.max_lora_rank or DEFAULT_MAX_LORA_RANK,
                       "cluster": args.cluster or "local"}
        serverless = getattr(args.deployment_type, "value", args.deployment_type) == "serverless"
        lifecycle = _serverless_lifecycle(props["base_model"], refs) if serverless else None
        super().__init__(DEPLOYMENT.provider_class(), resource_name,
                         props | {"references": refs} | dict.fromkeys(self._OUTPUTS), _with_dependencies(opts, depends_on))
        _warn_if_deprecated(self, f"Deployment {resource_name}", lifecycle)

    @staticmethod
    def get(resource_name: str, id: str, opts: pulumi.ResourceOptions | None = None) -> "Deployment":
        """An existing deployment (`accounts/<a>/deployments/<id>`), read from the store."""
        deployment, name = _get(Deployment, resource_name, id, opts, DEPLOYMENT.provider_class(), parse_deployment_name,
                                "deployment_id", Deployment._OUTPUTS)
        deployment.deployment_name, deployment._facts = name, None
        return deployment


class LoRAAddon(Resource, module="ember", name=LORA_ADDON.name):
    name: pulumi.Output[str]
    state: pulumi.Output[str]
    message: pulumi.Output[str | None]
    digest: pulumi.Output[str]
    rank: pulumi.Output[int]
    target_modules: pulumi.Output[list[str]]
    deployed_on: pulumi.Output[list[str]]

    _OUTPUTS = list(LORA_ADDON.outputs.model_fields)

    def __init__(self, resource_name: str, args: LoRAAddonArgs, opts: pulumi.ResourceOptions | None = None):
        props, refs, depends_on = props_of(args), {}, []
        _base(props, args.base_model, refs, depends_on)
        targets = {}
        props["deployments"] = []
        for d in args.deployments or ():
            if isinstance(d, Deployment):
                props["deployments"].append(d.deployment_name)
                depends_on.append(d)
                if isinstance(d.deployment_name, str) and d._facts and _plain(*d._facts.values()):
                    targets[d.deployment_name] = d._facts
            else:
                props["deployments"].append(d)
        refs["deployments"] = targets
        if isinstance(args.source, FineTuningJob):  # the adapter the job trains, from the store
            props["source"] = args.source.adapter_url
            refs["source"] = args.source._facts
            depends_on.append(args.source)
        if args.model_id is None:
            props["model_id"] = default_id(resource_name)
        self.model_name = _name(model_name, args.account_id, props["model_id"])
        _declare_model("LoRAAddon", resource_name, self.model_name, {"declared": True, "addon": True, "source": None})
        lifecycle = _serverless_lifecycle(props["base_model"], refs) if args.serverless is True else None
        super().__init__(LORA_ADDON.provider_class(), resource_name,
                         props | {"references": refs} | dict.fromkeys(self._OUTPUTS), _with_dependencies(opts, depends_on))
        _warn_if_deprecated(self, f"LoRAAddon {resource_name}", lifecycle)

    @staticmethod
    def get(resource_name: str, id: str, opts: pulumi.ResourceOptions | None = None) -> "LoRAAddon":
        """An existing LoRA addon (`accounts/<a>/models/<id>`), read from the store."""
        addon, name = _get(LoRAAddon, resource_name, id, opts, LORA_ADDON.provider_class(), parse_model_name,
                           "model_id", LoRAAddon._OUTPUTS)
        addon.model_name = name
        return addon


def _dataset(props: dict[str, Any], field: str, dataset: Any, refs: dict[str, Any], depends_on: list) -> None:
    if isinstance(dataset, Dataset):
        props[field] = dataset.dataset_name
        props[f"{field}_digest"] = dataset.source_digest if _local(dataset._source) else dataset.digest
        refs[field] = {"declared": True}
        depends_on.append(dataset)


class Dataset(Resource, module="ember", name=DATASET.name):
    name: pulumi.Output[str]  # accounts/<account>/datasets/<dataset_id>
    state: pulumi.Output[str]
    message: pulumi.Output[str | None]
    digest: pulumi.Output[str]
    example_count: pulumi.Output[int]
    message_count: pulumi.Output[int]
    character_count: pulumi.Output[int]
    source_digest: pulumi.Output[str | None]

    _OUTPUTS = list(DATASET.outputs.model_fields)

    def __init__(self, resource_name: str, args: DatasetArgs, opts: pulumi.ResourceOptions | None = None):
        props = props_of(args)
        if args.dataset_id is None:
            props["dataset_id"] = default_id(resource_name)
        self._source = args.source
        self.dataset_name = _name(dataset_name, args.account_id, props["dataset_id"])
        super().__init__(DATASET.provider_class(), resource_name, props | dict.fromkeys(self._OUTPUTS), opts)


class FineTuningJob(Resource, module="ember", name=FINE_TUNING_JOB.name):
    name: pulumi.Output[str]  # accounts/<account>/fineTuningJobs/<job_id>
    state: pulumi.Output[str]
    message: pulumi.Output[str | None]
    output_model_name: pulumi.Output[str]  # accounts/<account>/models/<output_model>
    digest: pulumi.Output[str]
    adapter_url: pulumi.Output[str]
    train_loss: pulumi.Output[list[float]]
    step_loss: pulumi.Output[list[float]]
    evaluation_loss: pulumi.Output[list[float]]
    epochs_run: pulumi.Output[int]
    dataset_tokens: pulumi.Output[int]
    trained_tokens: pulumi.Output[int]
    duration_s: pulumi.Output[float]

    _OUTPUTS = list(FINE_TUNING_JOB.outputs.model_fields)

    def __init__(self, resource_name: str, args: FineTuningJobArgs, opts: pulumi.ResourceOptions | None = None):
        props, refs, depends_on = props_of(args), {}, []
        _base(props, args.base_model, refs, depends_on)
        _dataset(props, "dataset", args.dataset, refs, depends_on)
        _dataset(props, "evaluation_dataset", args.evaluation_dataset, refs, depends_on)
        if args.job_id is None:
            props["job_id"] = default_id(resource_name)
        self.job_name = _name(fine_tuning_job_name, args.account_id, props["job_id"])
        # the trained addon is a model of this program too: no Model or LoRAAddon may take its ID
        _declare_model("FineTuningJob", resource_name, _name(model_name, args.account_id, args.output_model),
                       {"declared": True, "addon": True, "source": None}, "output_model")
        # what an addon deployed from this job needs to know at its own check
        rank = args.lora_rank if args.lora_rank is not None else FINE_TUNING_JOB.spec.model_fields["lora_rank"].default
        self._facts = {"rank": rank, "base_model": props["base_model"]}
        super().__init__(FINE_TUNING_JOB.provider_class(), resource_name,
                         props | {"references": refs} | dict.fromkeys(self._OUTPUTS), _with_dependencies(opts, depends_on))


class Gateway(Resource, module="ember", name=GATEWAY.name):
    name: pulumi.Output[str]  # accounts/<account>/gateways/<gateway_id>
    state: pulumi.Output[str]
    message: pulumi.Output[str | None]
    url: pulumi.Output[str]  # the one endpoint: OpenAI's base URL is <url>/v1
    ready_replicas: pulumi.Output[int]

    _OUTPUTS = list(GATEWAY.outputs.model_fields)

    def __init__(self, resource_name: str, args: GatewayArgs, opts: pulumi.ResourceOptions | None = None):
        props = props_of(args)
        if args.gateway_id is None:
            props["gateway_id"] = default_id(resource_name)
        declared = _declared()
        if declared.gateway is not None:  # a store has one gateway, in front of all of its deployments
            raise ProgramError("Gateway", resource_name, "gateway_id", f"this program declares a gateway already, "
                               f"{declared.gateway}: a store has one (another stack names it with Gateway.get)")
        declared.gateway = resource_name
        self.gateway_name = _name(gateway_name, args.account_id, props["gateway_id"])
        super().__init__(GATEWAY.provider_class(), resource_name, props | dict.fromkeys(self._OUTPUTS), opts)

    @staticmethod
    def get(resource_name: str, id: str, opts: pulumi.ResourceOptions | None = None) -> "Gateway":
        """The store's gateway (`accounts/<a>/gateways/<id>`), read from the store: a tenant's stack exports its URL."""
        gateway, name = _get(Gateway, resource_name, id, opts, GATEWAY.provider_class(), parse_gateway_name,
                             "gateway_id", Gateway._OUTPUTS)
        gateway.gateway_name = name
        return gateway


class ApiKey(Resource, module="ember", name=API_KEY.name):
    """A key of one account, returned once as the secret output `key` (encrypted in the stack's state)."""

    name: pulumi.Output[str]  # accounts/<account>/apiKeys/<key_id>
    state: pulumi.Output[str]  # ACTIVE, or EXPIRED past expires_at
    message: pulumi.Output[str | None]
    key: pulumi.Output[str]  # secret
    key_sha256: pulumi.Output[str]
    key_hint: pulumi.Output[str]
    created_at: pulumi.Output[str]

    _OUTPUTS = list(API_KEY.outputs.model_fields)

    def __init__(self, resource_name: str, args: ApiKeyArgs, opts: pulumi.ResourceOptions | None = None):
        props = props_of(args)
        if args.key_id is None:
            props["key_id"] = default_id(resource_name)
        self.key_name = _name(api_key_name, args.account_id, props["key_id"])
        secret = pulumi.ResourceOptions(additional_secret_outputs=list(API_KEY.secret_outputs))
        # whose stack declares it: an account's keys are declared by one stack
        refs = {"owner": resource_owner(resource_name)}
        super().__init__(API_KEY.provider_class(), resource_name,
                         props | {"references": refs} | dict.fromkeys(self._OUTPUTS),
                         pulumi.ResourceOptions.merge(opts, secret))
