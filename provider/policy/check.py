"""Runs a CrossGuard policy pack over a preview, the way the Pulumi engine does it.

The engine starts the pack's `__main__.py`, reads the port it prints, and sends each resource as it is
registered (Analyze), then the whole stack (AnalyzeStack), with unknown values still unknown. This
module does the same over the registrations a mocked program makes (`RecordingMonitor`), so
`ember preview --policy-pack` gates a stack without the Pulumi CLI, and tests see the pack exactly as
the engine would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2
from pulumi.runtime.mocks import MockMonitor
from pulumi.runtime.proto import analyzer_pb2, analyzer_pb2_grpc

PACK_START_TIMEOUT_S = 60


@dataclass
class Registration:
    """A resource as the engine knows it during preview: wire-form inputs (unknowns as the engine's sentinels)."""

    type: str
    name: str
    urn: str
    properties: struct_pb2.Struct
    parent: str = ""
    property_dependencies: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Violation:
    policy: str
    level: str  # "mandatory" | "advisory" | …
    message: str
    urn: str

    @property
    def mandatory(self) -> bool:
        return self.level == "mandatory"

    def __str__(self) -> str:
        where = f" ({self.urn.rsplit('::', 1)[-1]})" if self.urn else ""
        return f"[{self.level}] {self.policy}{where}: {self.message}"


class RecordingMonitor(MockMonitor):
    """A mock resource monitor that also keeps every registration, for a policy pack to analyze."""

    def __init__(self, mocks):
        super().__init__(mocks)
        self.registrations: list[Registration] = []

    def RegisterResource(self, request):
        response = super().RegisterResource(request)
        if request.type != "pulumi:pulumi:Stack":
            deps = {k: list(v.urns) for k, v in request.propertyDependencies.items()}
            properties = struct_pb2.Struct()
            properties.CopyFrom(request.object)
            self.registrations.append(Registration(request.type, request.name, response.urn, properties,
                                                   request.parent, deps))
        return response


class PolicyPackError(RuntimeError):
    pass


def _policy_config(config: dict[str, Any]) -> analyzer_pb2.ConfigureAnalyzerRequest:
    """A `--policy-pack-config` document: {policy: "mandatory" | {"enforcementLevel": …, <property>: …}}."""
    levels = {"advisory": 0, "mandatory": 1, "disabled": 2, "remediate": 3}
    request = analyzer_pb2.ConfigureAnalyzerRequest()
    for policy, value in config.items():
        value = {"enforcementLevel": value} if isinstance(value, str) else dict(value)
        level = value.pop("enforcementLevel", "mandatory")
        if level not in levels:
            raise PolicyPackError(f"policy config: {policy}.enforcementLevel {level!r} is not one of {', '.join(levels)}")
        entry = request.policyConfig[policy]
        entry.enforcementLevel = levels[level]
        entry.properties.update(value)
    return request


def run_pack(pack_dir: Path, registrations: list[Registration], config: dict[str, Any] | None = None,
             store_url: str | None = None) -> list[Violation]:
    """Every violation the pack at `pack_dir` reports on these resources and on the stack they make; `store_url`, the
    stack's store, is the pack's EMBER_STORE_URL (it runs in its own folder, and cannot find one beside the program)."""
    pack_dir = Path(pack_dir).resolve()
    if not (pack_dir / "PulumiPolicy.yaml").exists():
        raise PolicyPackError(f"policy pack: {pack_dir} has no PulumiPolicy.yaml")
    env = os.environ | ({"EMBER_STORE_URL": store_url} if store_url else {})
    process = subprocess.Popen([sys.executable, "-u", "__main__.py"], cwd=pack_dir, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    try:
        port = process.stdout.readline().strip()
        if not port.isdigit():
            raise PolicyPackError(f"policy pack {pack_dir} did not start: {process.stderr.read()[-2000:] if process.poll() is not None else port}")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=PACK_START_TIMEOUT_S)
            stub = analyzer_pb2_grpc.AnalyzerStub(channel)
            if config:
                stub.Configure(_policy_config(config))
            diagnostics = []  # (diagnostic, the resource it is about when the pack leaves its urn out)
            for r in registrations:
                answer = stub.Analyze(analyzer_pb2.AnalyzeRequest(type=r.type, properties=r.properties, urn=r.urn,
                                                                  name=r.name))
                diagnostics += [(d, r.urn) for d in answer.diagnostics]
            resources = [analyzer_pb2.AnalyzerResource(
                type=r.type, properties=r.properties, urn=r.urn, name=r.name, parent=r.parent,
                dependencies=sorted({u for urns in r.property_dependencies.values() for u in urns}),
                propertyDependencies={k: analyzer_pb2.AnalyzerPropertyDependencies(urns=v)
                                      for k, v in r.property_dependencies.items()})
                for r in registrations]
            diagnostics += [(d, "") for d in stub.AnalyzeStack(analyzer_pb2.AnalyzeStackRequest(resources=resources)).diagnostics]
    finally:
        process.kill()
        process.wait()
    names = {0: "advisory", 1: "mandatory", 2: "disabled", 3: "remediate"}
    return [Violation(d.policyName, names.get(d.enforcementLevel, str(d.enforcementLevel)),
                      d.message.removeprefix(d.description).strip(), d.urn or urn)
            for d, urn in diagnostics]


def load_config(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise PolicyPackError(f"--policy-pack-config: {path}: {exc}") from None
