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
    stack_group: str  # its list in a stack file (StackSpec)
    schema_key: str  # its JSON Schemas' file names in schema/
    provider: str  # "module:Class" of its dynamic provider, imported on first use (the domain never imports pulumi)
    replace: frozenset[str]  # the inputs whose change replaces the resource; every other change updates it in place

    @property
    def type_token(self) -> str:
        return EMBER_TYPE_PREFIX + self.name

    @cached_property
    def provider_class(self) -> type:
        module, _, cls = self.provider.partition(":")
        return getattr(importlib.import_module(module), cls)
