"""Many LoRA addons on one base model, in the same batch, loaded and unloaded while requests run.

Three parts, as in vLLM's lora/: adapters in host memory (an LRU of `LoRAAdapter`s), `max_loras` slots
on the device, and the batched application of the slots to a mixed batch without merging weights or
splitting the batch:

* Decode rows (one token per request, each request its own adapter) use the shrink/expand scheme:
  x @ [A of every active slot] gives every slot's rank-r projection at once; a per-row slot mask keeps
  each row's own slot; @ [B of every active slot] expands it. Two small GEMMs per module read each
  active adapter's weights exactly once, whatever the mix of adapters in the batch.
* Prefill chunks belong to one request each, so each applies its own slot's A and B directly.

Slots are padded to `max_rank`; the LoRA scaling (alpha/r, or alpha/sqrt(r) for rsLoRA) is folded into B.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from pathlib import Path

import torch

from .adapters import AdapterError, LoRAAdapter, load_adapter, module_shapes
from .batch import StepBatch
from .config import ModelConfig

# The model's fused projections and the LoRA modules inside each: (module, first column, width).
def fused_parts(config: ModelConfig) -> dict[str, list[tuple[str, int, int]]]:
    q, kv, i = config.q_size, config.kv_size, config.intermediate_size
    return {
        "qkv": [("q_proj", 0, q), ("k_proj", q, kv), ("v_proj", q + kv, kv)],
        "o": [("o_proj", 0, config.hidden_size)],
        "gate_up": [("gate_proj", 0, i), ("up_proj", i, i)],
        "down": [("down_proj", 0, config.hidden_size)],
    }


class LoRAManager:
    def __init__(self, config: ModelConfig, *, max_loras: int = 8, max_rank: int = 64, max_cpu_loras: int | None = None,
                 device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32):
        self.config, self.device, self.dtype = config, device, dtype
        self.max_loras, self.max_rank = max_loras, max_rank
        self.max_cpu_loras = max_cpu_loras or max(4 * max_loras, 32)
        self.parts = fused_parts(config)
        # Per layer and module: A stacked as [slots * rank, in], B transposed as [slots * rank, out]. A module's
        # stacks are allocated when the first adapter targeting it arrives (q/v-only adapters need no MLP stacks).
        self.a: list[dict[str, torch.Tensor]] = [{} for _ in range(config.num_hidden_layers)]
        self.bt: list[dict[str, torch.Tensor]] = [{} for _ in range(config.num_hidden_layers)]
        self.slots: list[str | None] = [None] * max_loras
        self.slot_modules: list[tuple[str, ...]] = [()] * max_loras
        self.slot_use: list[int] = [0] * max_loras  # last step that used each slot, for LRU eviction
        self.targeted: Counter[str] = Counter()  # module → slots whose adapter targets it
        self.sources: dict[str, Path] = {}  # the adapters this deployment serves
        self.host: OrderedDict[str, LoRAAdapter] = OrderedDict()
        self.in_flight: Counter[str] = Counter()
        self.unloading: set[str] = set()
        self.loads = 0  # adapters read from disk (host cache misses)
        self._step = 0
        self._prepared: tuple | None = None
        self._slot_of_row = torch.arange(max_loras, device=device).repeat_interleave(max_rank)

    # -- the served set --------------------------------------------------------------------------------

    def add(self, name: str, source: str | Path) -> LoRAAdapter:
        """Serve an adapter from now on; validates it fully first, so a bad one changes nothing."""
        adapter = load_adapter(name, source, self.config, self.max_rank)
        self.sources[name] = Path(source)
        self.unloading.discard(name)
        self._cache(adapter)
        return adapter

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

    def check_servable(self, name: str) -> None:
        if name not in self.sources or name in self.unloading:
            raise ValueError(f"model: {name!r} is not an addon loaded on this deployment")

    def acquire(self, name: str) -> None:
        self.check_servable(name)
        self.in_flight[name] += 1

    def release(self, name: str) -> None:
        self.in_flight[name] -= 1
        if not self.in_flight[name]:
            del self.in_flight[name]
            if name in self.unloading:
                self._drop(name)

    def _drop(self, name: str) -> None:
        self.sources.pop(name, None)
        self.host.pop(name, None)
        self.unloading.discard(name)
        if name in self.slots:
            self._clear_slot(self.slots.index(name))

    def _cache(self, adapter: LoRAAdapter) -> None:
        self.host[adapter.name] = adapter
        self.host.move_to_end(adapter.name)
        while len(self.host) > self.max_cpu_loras:
            self.host.popitem(last=False)

    def _host_adapter(self, name: str) -> LoRAAdapter:
        adapter = self.host.get(name)
        if adapter is None:  # evicted from host memory: read it again
            adapter = load_adapter(name, self.sources[name], self.config, self.max_rank)
            self.loads += 1
            self._cache(adapter)
        self.host.move_to_end(name)
        return adapter

    # -- device slots ----------------------------------------------------------------------------------

    def activate(self, names: set[str]) -> dict[str, int]:
        """Put every adapter of this step in a device slot (evicting the least recently used others)."""
        if len(names) > self.max_loras:
            raise ValueError(f"a step may use at most max_loras={self.max_loras} adapters, got {len(names)}")
        self._step += 1
        slots = {}
        for name in names:
            if name in self.slots:
                slots[name] = self.slots.index(name)
        for name in names - slots.keys():
            free = [i for i, s in enumerate(self.slots) if s is None]
            candidates = free or [i for i, s in enumerate(self.slots) if s not in names]
            slot = min(candidates, key=lambda i: (self.slots[i] is not None, self.slot_use[i]))
            self._fill_slot(slot, self._host_adapter(name))
            slots[name] = slot
        for slot in slots.values():
            self.slot_use[slot] = self._step
        return slots

    def _fill_slot(self, slot: int, adapter: LoRAAdapter) -> None:
        if self.slots[slot] is not None:
            self._clear_slot(slot)
        rows = slice(slot * self.max_rank, slot * self.max_rank + adapter.rank)
        shapes = module_shapes(self.config)
        for module, (a, b) in adapter.weights.items():
            for layer in range(self.config.num_hidden_layers):
                if module not in self.a[layer]:
                    fan_in, fan_out = shapes[module]
                    size = self.max_loras * self.max_rank
                    self.a[layer][module] = torch.zeros(size, fan_in, device=self.device, dtype=self.dtype)
                    self.bt[layer][module] = torch.zeros(size, fan_out, device=self.device, dtype=self.dtype)
                self.a[layer][module][rows] = a[layer].to(self.device, self.dtype)
                self.bt[layer][module][rows] = (b[layer] * adapter.scaling).t().to(self.device, self.dtype)
            self.targeted[module] += 1
        self.slots[slot], self.slot_modules[slot] = adapter.name, tuple(adapter.weights)

    def _clear_slot(self, slot: int) -> None:
        rows = slice(slot * self.max_rank, (slot + 1) * self.max_rank)
        for module in self.slot_modules[slot]:
            for layer in range(self.config.num_hidden_layers):
                self.a[layer][module][rows] = 0
                self.bt[layer][module][rows] = 0
            self.targeted[module] -= 1
        self.slots[slot], self.slot_modules[slot] = None, ()

    # -- batched application ---------------------------------------------------------------------------

    def prepare(self, batch: StepBatch) -> None:
        """Per-step state shared by every layer: which decode rows use which slot, and prefill segments."""
        rows = batch.adapter_rows
        if rows is None:
            self._prepared = None
            return
        nd = batch.num_decode
        decode = None
        if nd and bool((rows[:nd] >= 0).any()):
            width = (int(rows[:nd].max()) + 1) * self.max_rank
            mask = (rows[:nd, None] == self._slot_of_row[None, :width]).to(self.dtype)
            decode = (width, mask)
        segments = []
        for chunk in batch.prefills:
            slot = int(rows[chunk.start])
            if slot >= 0:
                r = slice(slot * self.max_rank, (slot + 1) * self.max_rank)
                segments.append((slice(chunk.start, chunk.start + chunk.length), r))
        self._prepared = (nd, decode, segments)

    def apply(self, layer: int, fused: str, x: torch.Tensor, out: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """The model's hook: add every row's LoRA delta to the fused projection's output, in place."""
        if self._prepared is None:
            return out
        nd, decode, segments = self._prepared
        for module, first, width in self.parts[fused]:
            if not self.targeted[module]:
                continue
            a, bt = self.a[layer][module], self.bt[layer][module]
            cols = slice(first, first + width)
            if decode is not None:
                used, mask = decode
                shrunk = (x[:nd] @ a[:used].t()) * mask
                out[:nd, cols] += shrunk @ bt[:used]
            for rows, ranks in segments:
                out[rows, cols] += (x[rows] @ a[ranks].t()) @ bt[ranks]
        return out
