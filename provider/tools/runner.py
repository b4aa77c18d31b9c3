"""The offline runner: a Pulumi program run without the Pulumi CLI (`automation.py` runs it with the CLI).

It is for trying Ember and for CI on machines without the Pulumi CLI. It is not a
replacement for the Pulumi engine: it runs the program under the SDK's mock monitor, and for every
resource the program declares it calls the real providers — check, then diff against the previous run,
then create, update, replace or nothing — and keeps the state in a JSON file. It follows the engine where
the two could differ: a preview hands back the inputs as a dynamic resource's outputs, `up` does not
refresh unless asked, two resources with one URN are refused, resources are deleted dependents first,
`protect`, `retain_on_delete`, `ignore_changes`, `delete_before_replace`, `depends_on` and `Resource.get`
mean what they mean to the engine, and `import_` fails as it does under the engine. Each resource's state is
saved the moment it changes, so an interrupted run converges when run again. tests/engine/test_pulumi_engine.py
runs programs through both and requires the same steps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import runpy
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import yaml
from pulumi.runtime import rpc
from pulumi.runtime.config import set_all_config
from pulumi.runtime.mocks import Mocks, set_mocks
from pulumi.runtime.settings import ROOT, SETTINGS
from pulumi.runtime.stack import run_in_stack
from pulumi.runtime.sync_await import _sync_await

from ember.provider.domain.kinds import BY_NAME
from ember.provider.domain.names import EMBER_TYPE_PREFIX
from ember.provider.policy.check import RecordingMonitor, Registration
from ember.provider.providers import diff_rules
from ember.provider.providers.base import PROVIDER_KEY, EmberProvider, ProviderConfig, has_unknown


class RunError(RuntimeError):
    pass


@dataclass
class Step:
    op: str  # create | update | replace | delete | same | read | refresh
    type: str
    name: str
    detail: str = ""

SECRET = "[secret]"  # how a secret output is shown, as `pulumi up` shows it
PENDING_DELETE = "#pending-delete"  # the state key's mark of a replaced resource not deleted yet


@dataclass
class StackState:
    """The offline runner's state of one stack. It has no secrets provider: a kind's secret outputs (an ApiKey's key)
    are kept out of the state file, in a file beside it that only its owner may read (mode 600, as the implicit keys
    are), and stack outputs holding one are shown as the engine shows them."""

    path: Path
    resources: dict[str, dict] = field(default_factory=dict)  # "<type>::<name>" → {type, name, id, inputs, outputs}
    order: list[str] = field(default_factory=list)  # creation order
    outputs: dict[str, Any] = field(default_factory=dict)

    @property
    def secrets_path(self) -> Path:
        # not *.json: what reads a stack's state by its files (stacks/*.json) never finds the secrets among them
        return self.path.with_name(f"{self.path.stem}.secrets")

    @classmethod
    def load(cls, path: Path) -> "StackState":
        if not path.exists():
            return cls(path)
        raw = json.loads(path.read_text())
        state = cls(path, raw["resources"], raw["order"], raw.get("outputs", {}))
        if state.secrets_path.exists():
            for key, values in json.loads(state.secrets_path.read_text()).items():
                if key in state.resources:
                    state.resources[key]["outputs"] |= values
        return state

    def secret_values(self) -> set[str]:
        return {v for _, values in self._secrets().items() for v in values.values() if isinstance(v, str)}

    def _secrets(self) -> dict[str, dict[str, Any]]:
        found = {}
        for key, resource in self.resources.items():
            kind = BY_NAME.get(resource["type"])
            values = {k: resource["outputs"][k] for k in (kind.secret_outputs if kind else ())
                      if resource["outputs"].get(k) is not None}
            if values:
                found[key] = values
        return found

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        secrets = self._secrets()
        hidden = self.secret_values()
        resources = {key: r | {"outputs": masked(r["outputs"] | dict.fromkeys(secrets.get(key, {}), SECRET), hidden)}
                     for key, r in self.resources.items()}
        outputs = masked(self.outputs, hidden)
        if secrets:
            staged = self.secrets_path.with_name(f"{self.secrets_path.name}.tmp")
            fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(secrets, f)
            staged.replace(self.secrets_path)
        else:
            self.secrets_path.unlink(missing_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"resources": resources, "order": self.order, "outputs": outputs},
                                  indent=2, sort_keys=True, default=str))
        tmp.replace(self.path)


def masked(value: Any, secrets: set[str]) -> Any:
    """`value` with every string that holds a secret (an export of a key, or of a string made with one) shown as
    SECRET, at any depth, as the engine keeps an output computed from a secret secret."""
    if isinstance(value, str):
        return SECRET if any(secret in value for secret in secrets) else value
    if isinstance(value, dict):
        return {k: masked(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v, secrets) for v in value]
    return value


def _kind(type_token: str) -> str:
    """An Ember resource's kind (Model, Deployment, …); another package's type token as it is."""
    return type_token.removeprefix(EMBER_TYPE_PREFIX)


def _clean(props: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in props.items() if k != PROVIDER_KEY}


def _key(urn: str) -> str:
    """The state key ("<type>::<name>") of a URN."""
    *_, type_token, name = urn.split("::")
    return f"{type_token.split('$')[-1]}::{name}"


@dataclass(frozen=True)
class Options:
    """The resource options the engine honours, as a registration carries them."""

    dependencies: tuple[str, ...] = ()  # state keys: property dependencies and depends_on alike
    protect: bool = False
    retain_on_delete: bool = False
    delete_before_replace: bool = False
    ignore_changes: tuple[str, ...] = ()
    import_id: str = ""

    @classmethod
    def of(cls, request) -> "Options":
        return cls(tuple(dict.fromkeys(_key(u) for u in request.dependencies)), bool(request.protect),
                   bool(request.retainOnDelete), bool(request.deleteBeforeReplace), tuple(request.ignoreChanges),
                   request.importId)


class _Mocks(Mocks):
    def __init__(self, runner: "OfflineRunner", preview: bool):
        self.runner, self.preview = runner, preview
        self.seen: set[str] = set()
        self.options: dict[tuple[str, str], Options] = {}  # (type, name) → options of the registration under way
        self.reads: set[tuple[str, str]] = set()  # ReadResource registrations (Resource.get)

    def call(self, args):
        return {}, None

    def new_resource(self, args) -> tuple[str | None, dict]:
        kind = _kind(args.typ)
        if kind not in BY_NAME:
            if self.preview and self.runner.foreign_in_preview:
                return f"{args.name}-preview", dict(args.inputs)  # recorded as declared, for the cost estimate
            raise RunError(f"{args.typ}: the offline runner knows only Ember's resources")
        if (args.typ, args.name) in self.reads:
            return self.runner.read_external(kind, args.name, args.resource_id, _clean(dict(args.inputs)))
        options = self.options.get((args.typ, args.name), Options())
        return self.runner.apply(kind, args.typ, args.name, _clean(dict(args.inputs)), self.preview, self.seen, options)


class _Monitor(RecordingMonitor):
    def __init__(self, mocks: _Mocks):
        super().__init__(mocks)
        self.mocks = mocks
        self.stack_outputs: dict[str, Any] = {}

    def RegisterResource(self, request):
        self.mocks.options[(request.type, request.name)] = Options.of(request)
        return super().RegisterResource(request)

    def ReadResource(self, request):
        self.mocks.reads.add((request.type, request.name))
        return super().ReadResource(request)

    def RegisterResourceOutputs(self, request):
        if "pulumi:pulumi:Stack" in request.urn:
            self.stack_outputs = rpc.deserialize_properties(request.outputs)
        return super().RegisterResourceOutputs(request)


class OfflineRunner:
    def __init__(self, program_dir: Path, stack: str = "dev", config: ProviderConfig | None = None,
                 log: Callable[[str], None] = print):
        self.program_dir = Path(program_dir).resolve()
        project = yaml.safe_load((self.program_dir / "Pulumi.yaml").read_text())
        self.project = project["name"]
        self.stack = stack
        self.config = config or ProviderConfig.load(self.stack_config(), default_root=self.program_dir)
        self.state = StackState.load(self.config.state_dir / "stacks" / f"{self.project}-{stack}.json")
        self.log = log
        self.steps: list[Step] = []
        self.registrations: list[Registration] = []  # the last run's resources, as a policy pack sees them
        # A preview may record other packages' resources (pulumi-kubernetes objects) as declared instead of
        # refusing them: `ember cost` prices what a program declares, whatever else it holds.
        self.foreign_in_preview = False
        self._lock = threading.Lock()

    def _provider(self, kind: str) -> EmberProvider:
        provider = BY_NAME[kind].provider_class()
        provider._config = self.config
        return provider

    def _record(self, step: Step) -> None:
        self.steps.append(step)
        self.log(f"  {step.op:<8} {step.type}  {step.name}{('  ' + step.detail) if step.detail else ''}")

    # -- one resource ----------------------------------------------------------------------------------

    def apply(self, kind: str, type_token: str, name: str, news: dict, preview: bool, seen: set[str],
              options: Options = Options()) -> tuple[str, dict]:
        key = f"{type_token}::{name}"
        if key in seen:
            raise RunError(f"{kind} {name}: duplicate resource URN: this program declares two {kind} resources "
                           f"named {name!r}")
        seen.add(key)
        provider = self._provider(kind)
        previous = self.state.resources.get(key)
        if options.import_id and previous is None:
            # As under the engine, which imports a resource by asking its provider to Read it without the
            # serialized provider that the Python SDK's dynamic-provider server needs (it fails on '__provider').
            raise RunError(f"{kind} {name}: import_ of {options.import_id} is not possible for Ember's resources: the "
                           f"Pulumi engine imports a Python dynamic resource without its provider; read the entry "
                           f"with {kind}.get() instead, or remove it from the store and let this stack create it")
        if previous is not None:  # as the engine does: ignored properties keep their old input values
            for prop in options.ignore_changes:
                if prop in previous["inputs"]:
                    news[prop] = previous["inputs"][prop]
                else:
                    news.pop(prop, None)
        checked = provider.check(previous["inputs"] if previous else {}, news | {PROVIDER_KEY: ""})
        if checked.failures:
            problems = "; ".join(f"{f.property}: {f.reason}" for f in checked.failures)
            raise RunError(f"{kind} {name}: {problems}")
        inputs = _clean(checked.inputs)
        if previous is None:
            return self._create(provider, kind, key, name, inputs, preview, options, "create")
        diff = provider.diff(previous["id"], previous["outputs"], inputs)
        changed, _ = diff_rules.compare(provider.spec_cls, previous["outputs"], inputs, has_unknown)
        if diff.replaces:
            return self._replace(provider, kind, key, name, previous, inputs, preview, options, diff)
        if diff.changes:
            detail = f"({', '.join(changed) or 'drift'})"
            if preview:  # the engine does not ask a dynamic provider: the new inputs stand for the outputs
                self._record(Step("update", kind, name, detail))
                return previous["id"], inputs
            outputs = _clean(provider.update(previous["id"], previous["outputs"], inputs).outs or {})
            self._remember(key, kind, name, previous["id"], inputs, outputs, options)
            self._record(Step("update", kind, name, detail))
            return previous["id"], outputs
        self._remember(key, kind, name, previous["id"], previous["inputs"], previous["outputs"], options)
        self._record(Step("same", kind, name))
        return previous["id"], previous["outputs"]

    def _replace(self, provider, kind, key, name, previous, inputs, preview, options, diff) -> tuple[str, dict]:
        if options.protect:
            raise RunError(f"{kind} {name} is protected: replacing it ({', '.join(diff.replaces)}) would delete it; "
                           f"set protect=False first")
        old = previous["outputs"]
        detail = "(" + ", ".join(f"{k}: {_shown(old.get(k))} → {_shown(inputs.get(k))}" for k in diff.replaces) + ")"
        if note := provider.interruption(diff.replaces):
            detail += f" — {note}"
        if preview:
            self._record(Step("replace", kind, name, detail))
            return previous["id"], inputs
        if diff.delete_before_replace or options.delete_before_replace:
            self._delete(key, previous)
            return self._create(provider, kind, key, name, inputs, preview, options, "replace", detail)
        # Kept in the state as a pending delete until it is gone, as the engine keeps one: a run cut short between the
        # create and the delete (a store that did not answer) deletes it at the next up, which does not declare it.
        pending = f"{key}{PENDING_DELETE}"
        self._remember(pending, kind, name, previous["id"], previous["inputs"], previous["outputs"],
                       dataclasses.replace(options, dependencies=()))
        try:
            created = self._create(provider, kind, key, name, inputs, preview, options, "replace", detail)
        except BaseException:  # nothing was replaced: the old one stays the stack's, as it was
            self._forget(pending)
            raise
        if not previous.get("options", {}).get("retain_on_delete"):
            provider.delete(previous["id"], previous["outputs"])
        self._forget(pending)
        return created

    def _create(self, provider, kind, key, name, inputs, preview, options, op, detail="") -> tuple[str, dict]:
        if preview:  # the engine does not ask a dynamic provider: the inputs stand for the outputs
            self._record(Step(op, kind, name, detail))
            return "", dict(inputs)
        result = provider.create(inputs)
        outputs = _clean(result.outs or {})
        self._remember(key, kind, name, result.id, inputs, outputs, options)
        self._record(Step(op, kind, name, detail))
        return result.id, outputs

    def read_external(self, kind: str, name: str, id_: str, props: dict) -> tuple[str, dict]:
        """`Resource.get`: read an existing resource; it is not the stack's to change or delete."""
        result = self._provider(kind).read(id_, props | {PROVIDER_KEY: ""})
        if not result.id:
            raise RunError(f"{kind} {name}: {id_} does not exist (Resource.get reads existing resources only)")
        self._record(Step("read", kind, name))
        return result.id, _clean(result.outs or {})

    def _remember(self, key, kind, name, id_, inputs, outputs, options: Options = Options()) -> None:
        with self._lock:
            self.state.resources[key] = {"type": kind, "name": name, "id": id_, "inputs": inputs, "outputs": outputs,
                                         "options": {"dependencies": list(options.dependencies), "protect": options.protect,
                                                     "retain_on_delete": options.retain_on_delete}}
            if key not in self.state.order:
                self.state.order.append(key)
            self.state.save()

    def _delete(self, key: str, resource: dict) -> None:
        if not resource.get("options", {}).get("retain_on_delete"):
            self._provider(resource["type"]).delete(resource["id"], resource["outputs"])
        self._forget(key)

    def _deletion_order(self, keys: list[str]) -> list[str]:
        """Dependents before what they depend on, as the engine deletes; newest first among equals."""
        remaining, order = list(keys), []
        while remaining:
            free = [k for k in remaining
                    if not any(k in self.state.resources[o].get("options", {}).get("dependencies", [])
                               for o in remaining if o != k)]
            nxt = free[-1] if free else remaining[-1]
            order.append(nxt)
            remaining.remove(nxt)
        return order

    def _delete_all(self, keys: list[str], preview: bool = False) -> None:
        protected = [self.state.resources[k]["name"] for k in keys
                     if self.state.resources[k].get("options", {}).get("protect")]
        if protected:
            raise RunError(f"refusing to delete protected resources {', '.join(protected)}: set protect=False and run "
                           f"`up` first (nothing was deleted)")
        for key in self._deletion_order(keys):
            resource = self.state.resources[key]
            if not preview:
                self._delete(key, resource)
            retained = resource.get("options", {}).get("retain_on_delete")
            self._record(Step("delete", resource["type"], resource["name"],
                              "(retained: dropped from the stack, left running)" if retained else ""))

    def _forget(self, key: str) -> None:
        with self._lock:
            self.state.resources.pop(key, None)
            if key in self.state.order:
                self.state.order.remove(key)
            self.state.save()

    # -- whole runs ----------------------------------------------------------------------------------------

    def _run_program(self, preview: bool) -> tuple[dict, set[str]]:
        mocks = _Mocks(self, preview)
        monitor = _Monitor(mocks)
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(_report_unless_unretrieved)
        asyncio.set_event_loop(loop)  # the SDK runs the program on the current loop
        ROOT.set(None)
        set_all_config(self.stack_config(), secret_keys=[])
        set_mocks(mocks, project=self.project, stack=self.stack, preview=preview, monitor=monitor,
                  logger=self._program_log())
        # The SDK waits for every Output in SETTINGS.outputs before a program ends, and set_mocks keeps the
        # set: one left by an earlier program in this process (one that raised half-way) would never resolve.
        SETTINGS.outputs = set()
        ROOT.set(None)  # set_mocks finishes a stack of its own; run_in_stack makes the one that collects exports
        cwd = os.getcwd()
        os.chdir(self.program_dir)
        sys.path.insert(0, str(self.program_dir))
        try:
            _sync_await(run_in_stack(lambda: runpy.run_path(str(self.program_dir / "__main__.py"), run_name="__main__")))
        except pulumi.RunError as exc:  # the program's own one-line error: the engine shows it without a traceback
            raise RunError(str(exc)) from None
        finally:
            os.chdir(cwd)
            sys.path.remove(str(self.program_dir))
            _close(asyncio.get_event_loop())
        self.registrations = monitor.registrations
        return monitor.stack_outputs, mocks.seen

    def _program_log(self) -> logging.Logger:
        """Where the program's pulumi.log goes (the mocks' engine hands it to a logger): its warnings and errors
        beside the steps, as the Pulumi CLI shows them (a serverless model's deprecation, resources.py)."""
        log = self.log

        class Lines(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                log(f"{record.levelname.lower()}: {record.getMessage()}")

        logger = logging.Logger("ember.program")  # not the root logger's child: nothing else prints these twice
        logger.setLevel(logging.WARNING)
        logger.addHandler(Lines())
        return logger

    def stack_config(self) -> dict[str, str]:
        """The program's config as Pulumi reads it: Pulumi.yaml defaults, then Pulumi.<stack>.yaml values."""

        def entries(data: dict | None, where: str) -> dict[str, str]:
            out = {}
            for key, value in (data or {}).items():
                if isinstance(value, dict) and "secure" in value:
                    raise RunError(f"{where}: {key} is a Pulumi secret; secrets need the Pulumi CLI to decrypt")
                if isinstance(value, dict):
                    value = value.get("default", value.get("value"))
                if value is not None:
                    out[key if ":" in key else f"{self.project}:{key}"] = value if isinstance(value, str) else json.dumps(value)
            return out

        config = entries(yaml.safe_load((self.program_dir / "Pulumi.yaml").read_text()).get("config"), "Pulumi.yaml")
        stack_file = self.program_dir / f"Pulumi.{self.stack}.yaml"
        if stack_file.exists():
            config |= entries((yaml.safe_load(stack_file.read_text()) or {}).get("config"), stack_file.name)
        return config

    def up(self, preview: bool = False, refresh: bool = False) -> dict:
        if refresh and not preview and self.state.order:
            self.refresh()  # `pulumi up --refresh`: replicas that died since are restarted, not assumed
        self.steps = []
        self.log(f"{'Previewing' if preview else 'Updating'} {self.project}/{self.stack} (offline runner)")
        outputs, seen = self._run_program(preview)
        self._delete_all([k for k in self.state.order if k not in seen], preview)
        if not preview:
            self.state.outputs = {k: v for k, v in outputs.items() if not has_unknown(v)}
            self.state.save()
        return masked(outputs, self.state.secret_values())  # as the engine shows them; the secrets file has them

    def refresh(self) -> list[Step]:
        self.steps = []
        self.log(f"Refreshing {self.project}/{self.stack} (offline runner)")
        for key in list(self.state.order):
            resource = self.state.resources[key]
            result = self._provider(resource["type"]).read(resource["id"], resource["outputs"])
            if not result.id:
                self._forget(key)
                self._record(Step("deleted", resource["type"], resource["name"], "(gone outside Ember)"))
                continue
            outputs = _clean(result.outs or {})
            drift = [k for k in outputs if outputs.get(k) != resource["outputs"].get(k)]
            self._remember(key, resource["type"], resource["name"], result.id, resource["inputs"], outputs)
            self._record(Step("refresh", resource["type"], resource["name"], f"drift: {', '.join(drift)}" if drift else ""))
        return self.steps

    def destroy(self) -> None:
        self.steps = []
        self.log(f"Destroying {self.project}/{self.stack} (offline runner)")
        self._delete_all(list(self.state.order))
        self.state.outputs = {}
        self.state.save()


def _report_unless_unretrieved(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    # A program that failed leaves the Outputs of its other resources holding that failure, which the run
    # has already raised; each would print "Future exception was never retrieved" when it is collected.
    if not context.get("message", "").endswith("exception was never retrieved"):
        loop.default_exception_handler(context)


def _close(loop: asyncio.AbstractEventLoop) -> None:
    """End a program's loop: a program that raised leaves the SDK's RPC tasks pending, which would each print
    "Task was destroyed but it is pending!" when the loop is collected."""
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()


def _shown(value: Any) -> str:
    return "(unknown)" if has_unknown(value) else json.dumps(value, default=str)
