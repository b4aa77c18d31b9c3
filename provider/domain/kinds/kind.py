"""What Ember knows of one resource kind, declared once in the kind's module: every registry (JSON Schemas,
providers, diff rules, the policy pack, the program's Args, the public API) is derived from these."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cached_property

from ember.provider.domain.names import EMBER_TYPE_PREFIX


@dataclass(frozen=True)
class Kind:
    name: str  # the resource class users declare (`ember.provider.<name>`), and its type token's last part
    spec: type  # the inputs, with every rule on one resource
    outputs: type  # what the provider reports after create, update and read
    schema_key: str  # its JSON Schemas' file names in schema/
    provider: str  # "module:Class" of its dynamic provider, imported on first use (the domain never imports pulumi)
    replace: frozenset[str]  # the inputs whose change replaces the resource; every other change updates it in place
    # Inputs that are no field of the spec: content digests check derives from a local source, or that the program
    # passes from the resources this one references (a base model's), which decide replacements as inputs do.
    derived: tuple[str, ...] = ()
    # Outputs the engine keeps encrypted in the stack's state (the program's resource asks for it), and the offline
    # runner keeps out of its state file.
    secret_outputs: tuple[str, ...] = ()

    @property
    def type_token(self) -> str:
        return EMBER_TYPE_PREFIX + self.name

    @cached_property
    def provider_class(self) -> type:
        # Named, not imported: the domain never imports pulumi, and the provider half asks for it when it runs.
        module, _, cls = self.provider.partition(":")
        return getattr(importlib.import_module(module), cls)
