"""The addons a deployment serves: added, removed and reconciled while requests run, kept in host memory
as an LRU of `LoRAAdapter`s, and put in device slots for the steps that use them.

As in vLLM's lora/, the parts are apart: adapter files (`adapters.py`), this served set with its host
LRU, the device slots (`slots.py`) and the batched application (`batched.py`).
"""

from __future__ import annotations

import itertools
from collections import Counter, OrderedDict
from pathlib import Path

import torch

from ember.provider.domain.replica_spec import DEFAULT_MAX_LORA_RANK, DEFAULT_MAX_LORAS
from ember.runtime.fetch import local_copy
from ember.runtime.lora.adapters import AdapterError, LoRAAdapter, load_adapter
from ember.runtime.lora.slots import DeviceSlots
from ember.runtime.model.config import ModelConfig


class LoRAManager:
    def __init__(self, config: ModelConfig, *, max_loras: int = DEFAULT_MAX_LORAS, max_rank: int = DEFAULT_MAX_LORA_RANK,
                 max_cpu_loras: int | None = None, device: torch.device = torch.device("cpu"),
                 dtype: torch.dtype = torch.float32):
        self.config, self.max_rank = config, max_rank
        self.max_cpu_loras = max_cpu_loras or max(4 * max_loras, 32)
        self.device_slots = DeviceSlots(config, max_loras, max_rank, device, dtype)
        self.sources: dict[str, Path] = {}  # the adapters this deployment serves
        self.host: OrderedDict[str, LoRAAdapter] = OrderedDict()
        self.in_flight: Counter[str] = Counter()
        self.unloading: set[str] = set()
        self.loads = 0  # adapters read from disk (host cache misses)
        self.versions: dict[str, int] = {}  # a new number each time a name gets weights
        self._next_version = itertools.count()

    def add(self, name: str, source: str | Path) -> LoRAAdapter:
        """Serve an adapter from now on; validates it fully first, so a bad one changes nothing."""
        adapter = load_adapter(name, local_copy(str(source)), self.config, self.max_rank)
        self.sources[name] = Path(source)
        self.versions[name] = next(self._next_version)
        self.unloading.discard(name)
        self.device_slots.evict(name)  # new weights under an old name: the slot is refilled when next used
        self._cache(adapter)
        return adapter

    def version(self, name: str) -> int:
        return self.versions[name]

    def remove(self, name: str) -> None:
        """Stop serving an adapter: new requests are refused at once; running ones finish first."""
        if name not in self.sources:
            return
        self.unloading.add(name)
        if not self.in_flight[name]:
            self._drop(name)

    def reconcile(self, desired: dict[str, str | Path]) -> dict[str, str]:
        """Make the served set equal `desired` (name → source). Returns the adapters that failed, with why."""
        failed = {}
        for name in [n for n in self.sources if n not in desired]:
            self.remove(name)
        for name, source in desired.items():
            if name in self.sources and name not in self.unloading and self.sources[name] == Path(source):
                continue
            try:
                self.add(name, source)
            except AdapterError as exc:
                failed[name] = str(exc)
        return failed

    @property
    def served(self) -> list[str]:
        return sorted(n for n in self.sources if n not in self.unloading)

    @property
    def slots(self) -> list[str | None]:
        return self.device_slots.names

    def acquire(self, name: str) -> None:
        """A request starts using an adapter; refuses one that is not (or no longer) served."""
        if name not in self.sources or name in self.unloading:
            raise ValueError(f"model: {name!r} is not an addon loaded on this deployment")
        self.in_flight[name] += 1

    def release(self, name: str) -> None:
        self.in_flight[name] -= 1
        if not self.in_flight[name]:
            del self.in_flight[name]
            if name in self.unloading:
                self._drop(name)

    def activate(self, names: set[str]) -> dict[str, int]:
        """The device slot of every adapter this step uses."""
        return self.device_slots.activate(names, self._host_adapter)

    def _drop(self, name: str) -> None:
        self.sources.pop(name, None)
        self.versions.pop(name, None)
        self.host.pop(name, None)
        self.unloading.discard(name)
        self.device_slots.evict(name)

    def _cache(self, adapter: LoRAAdapter) -> None:
        self.host[adapter.name] = adapter
        self.host.move_to_end(adapter.name)
        while len(self.host) > self.max_cpu_loras:
            self.host.popitem(last=False)

    def _host_adapter(self, name: str) -> LoRAAdapter:
        adapter = self.host.get(name)
        if adapter is None:  # evicted from host memory: read it again
            adapter = load_adapter(name, local_copy(str(self.sources[name])), self.config, self.max_rank)
            self.loads += 1
            self._cache(adapter)
        self.host.move_to_end(name)
        return adapter
