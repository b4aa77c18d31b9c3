"""The addons a deployment serves: added, removed and reconciled while requests run, kept in host memory
as an LRU of `LoRAAdapter`s, and put in device slots for the steps that use them.

As in vLLM's lora/, the parts are apart: adapter files (`adapters.py`), this served set with its host
LRU, the device slots (`slots.py`) and the batched application (`batched.py`).

Each load of a name is a version of its own, keyed `name#number`: new weights under a served name load
beside the old ones, new requests get them, and requests that started on the old version finish on it
(the old version leaves when its last request does). Requests, the scheduler, the device slots and the
prefix cache all see version keys; the public views (`served`, `slots`, `reconcile`) are by name.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from ember.provider.domain.replica_spec import DEFAULT_MAX_LORA_RANK, DEFAULT_MAX_LORAS
from ember.provider.domain.tensor_parallel import Shard
from ember.runtime.fetch import local_copy
from ember.runtime.lora.adapters import AdapterError, LoRAAdapter, load_adapter
from ember.runtime.lora.slots import DeviceSlots
from ember.runtime.model.config import ModelConfig


@dataclass
class Version:
    """One load of an addon: what it was read from, and how many requests run on it."""

    name: str
    source: Path
    in_flight: int = 0


class LoRAManager:
    def __init__(self, config: ModelConfig, *, max_loras: int = DEFAULT_MAX_LORAS, max_rank: int = DEFAULT_MAX_LORA_RANK,
                 max_cpu_loras: int | None = None, device: torch.device = torch.device("cpu"),
                 dtype: torch.dtype = torch.float32, shard: Shard | None = None):
        self.config, self.max_rank = config, max_rank  # adapters are read and checked whole, against the whole model
        self.max_cpu_loras = max_cpu_loras or max(4 * max_loras, 32)
        self.device_slots = DeviceSlots(config, max_loras, max_rank, device, dtype, shard)
        self.versions: dict[str, Version] = {}  # key → every version still loaded, current or retiring
        self.current: dict[str, str] = {}  # name → key of the version new requests get
        self.host: OrderedDict[str, LoRAAdapter] = OrderedDict()  # key → weights
        self.loads = 0  # adapters read from disk (host cache misses)
        # one count for all names: a name removed and added again never reuses a key a running request holds
        self._numbers = itertools.count()

    def add(self, name: str, source: str | Path) -> LoRAAdapter:
        """Serve an adapter from now on. It is validated and loaded fully first, so a bad one changes nothing
        (an older version keeps serving); then it is current, and the version it replaces retires."""
        key = f"{name}#{next(self._numbers)}"
        adapter = load_adapter(key, local_copy(str(source)), self.config, self.max_rank)
        self.versions[key] = Version(name, Path(source))
        old = self.current.get(name)
        self.current[name] = key
        self._cache(adapter)
        if old is not None:
            self._drop_if_retired(old)
        return adapter

    def remove(self, name: str) -> None:
        """Stop serving an adapter: new requests are refused at once; running ones finish first."""
        key = self.current.pop(name, None)
        if key is not None:
            self._drop_if_retired(key)

    def reconcile(self, desired: dict[str, str | Path]) -> dict[str, str]:
        """Make the served set equal `desired` (name → source). Returns the adapters that failed, with why."""
        failed = {}
        for name in [n for n in self.current if n not in desired]:
            self.remove(name)
        for name, source in desired.items():
            if name in self.current and self.versions[self.current[name]].source == Path(source):
                continue
            try:
                self.add(name, source)
            except AdapterError as exc:
                failed[name] = str(exc)
        return failed

    @property
    def served(self) -> list[str]:
        return sorted(self.current)

    def loaded(self, name: str) -> bool:
        """Whether any version of `name` is still here: served, or finishing its requests after a remove."""
        return any(v.name == name for v in self.versions.values())

    @property
    def slots(self) -> list[str | None]:
        """The addon name in each device slot (a retiring version's slot shows its name too)."""
        return [None if key is None else self.versions[key].name for key in self.device_slots.names]

    def acquire(self, name: str) -> str:
        """A request starts using an adapter: returns the key of its current version, the one the request
        keeps to the end. Refuses one that is not (or no longer) served."""
        key = self.current.get(name)
        if key is None:
            raise ValueError(f"model: {name!r} is not an addon loaded on this deployment")
        self.versions[key].in_flight += 1
        return key

    def release(self, key: str) -> None:
        self.versions[key].in_flight -= 1
        self._drop_if_retired(key)

    def activate(self, keys: set[str]) -> dict[str, int]:
        """The device slot of every adapter version this step uses. A bare name (a devtool's teacher-forced
        pass) means its current version."""
        chosen = {key: self.current.get(key, key) for key in keys}
        slots = self.device_slots.activate(set(chosen.values()), self._host_adapter)
        return {key: slots[version] for key, version in chosen.items()}

    def _drop_if_retired(self, key: str) -> None:
        """A version that is no longer current goes once no request runs on it (now, or at its last release)."""
        version = self.versions[key]
        if version.in_flight or self.current.get(version.name) == key:
            return
        del self.versions[key]
        self.host.pop(key, None)
        self.device_slots.evict(key)

    def _cache(self, adapter: LoRAAdapter) -> None:
        self.host[adapter.name] = adapter
        self.host.move_to_end(adapter.name)
        # A retired version that still runs requests stays: its files may be gone from the store (the provider deletes
        # an old version's object once every replica serves the new one), so it could not be read again.
        current = set(self.current.values())
        evictable = [k for k in self.host if k != adapter.name and (k in current or not self.versions[k].in_flight)]
        for key in evictable[:max(0, len(self.host) - self.max_cpu_loras)]:
            del self.host[key]

    def _host_adapter(self, key: str) -> LoRAAdapter:
        adapter = self.host.get(key)
        if adapter is None:  # evicted from host memory: read it again
            adapter = load_adapter(key, local_copy(str(self.versions[key].source)), self.config, self.max_rank)
            self.loads += 1
            self._cache(adapter)
        self.host.move_to_end(key)
        return adapter
