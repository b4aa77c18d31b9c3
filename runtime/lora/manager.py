"""Many LoRA addons on one base model, in the same batch, loaded and unloaded while requests run.

Three parts, as in vLLM's lora/: adapters in host memory (an LRU of `LoRAAdapter`s), `max_loras` slots
on the device, and the batched application of the slots to a mixed batch without merging weights or
splitting the batch:

* Decode rows (one token per request, each request its own adapter) use the shrink/expand scheme:
  x @ [A of every active slot] gives every slot's rank-r projection at once; a per-row slot mask keeps
  each row's own slot; @ [B of every active slot] expands it. Two small GEMMs per projection read each
  active adapter's weights exactly once, whatever the mix of adapters in the batch.
* Prefill chunks belong to one request each, so each applies its own slot's A and B directly.

The stacks follow the model's fused projections (qkv, o, gate_up, down): the A of q, k and v sit side by
side and B is block-diagonal, so one shrink and one expand serve all three, which halves the small
operations a step runs. Slots are padded to `max_rank`; the LoRA scaling (alpha/r, or alpha/sqrt(r) for
rsLoRA) is folded into B.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from pathlib import Path

import torch

from ember.runtime.lora.adapters import AdapterError, LoRAAdapter, load_adapter, module_shapes
from ember.runtime.engine.batch import StepBatch
from ember.runtime.model.config import ModelConfig
from ember.runtime.fetch import local_copy

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
        # Per layer and fused projection with P parts: A as [slots * P * rank, in] and B transposed as
        # [slots * P * rank, out], slot-major so the active slots are a prefix. Allocated when the first
        # adapter targeting the projection arrives (q/v-only adapters need no MLP stacks).
        self.a: list[dict[str, torch.Tensor]] = [{} for _ in range(config.num_hidden_layers)]
        self.bt: list[dict[str, torch.Tensor]] = [{} for _ in range(config.num_hidden_layers)]
        self.slots: list[str | None] = [None] * max_loras
        self.slot_fused: list[tuple[str, ...]] = [()] * max_loras  # fused projections each slot touches
        self.slot_use: list[int] = [0] * max_loras  # last step that used each slot, for LRU eviction
        self.targeted: Counter[str] = Counter()  # fused projection → slots whose adapter targets it
        self.sources: dict[str, Path] = {}  # the adapters this deployment serves
        self.host: OrderedDict[str, LoRAAdapter] = OrderedDict()
        self.in_flight: Counter[str] = Counter()
        self.unloading: set[str] = set()
        self.loads = 0  # adapters read from disk (host cache misses)
        self._step = 0
        self._prepared: tuple | None = None

    # -- the served set --------------------------------------------------------------------------------

    def add(self, name: str, source: str | Path) -> LoRAAdapter:
        """Serve an adapter from now on; validates it fully first, so a bad one changes nothing."""
        adapter = load_adapter(name, local_copy(str(source)), self.config, self.max_rank)
        self.sources[name] = Path(source)
        self.unloading.discard(name)
        if name in self.slots:  # new weights under an old name: the slot is refilled when next used
            self._clear_slot(self.slots.index(name))
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
            adapter = load_adapter(name, local_copy(str(self.sources[name])), self.config, self.max_rank)
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
        slots = {name: self.slots.index(name) for name in names if name in self.slots}
        for name in names - slots.keys():
            free = [i for i, s in enumerate(self.slots) if s is None]
            candidates = free or [i for i, s in enumerate(self.slots) if s not in names]
            slot = min(candidates, key=lambda i: (self.slots[i] is not None, self.slot_use[i]))
            self._fill_slot(slot, self._host_adapter(name))
            slots[name] = slot
        for slot in slots.values():
            self.slot_use[slot] = self._step
        return slots

    def _rows(self, fused: str, slot: int) -> slice:
        width = len(self.parts[fused]) * self.max_rank
        return slice(slot * width, (slot + 1) * width)

    def _fill_slot(self, slot: int, adapter: LoRAAdapter) -> None:
        if self.slots[slot] is not None:
            self._clear_slot(slot)
        shapes = module_shapes(self.config)
        touched = []
        for fused, parts in self.parts.items():
            if not any(module in adapter.weights for module, _, _ in parts):
                continue
            touched.append(fused)
            self.targeted[fused] += 1
            height = self.max_loras * len(parts) * self.max_rank
            fan_in = shapes[parts[0][0]][0]
            fan_out = sum(width for _, _, width in parts)
            for layer in range(self.config.num_hidden_layers):
                if fused not in self.a[layer]:
                    self.a[layer][fused] = torch.zeros(height, fan_in, device=self.device, dtype=self.dtype)
                    self.bt[layer][fused] = torch.zeros(height, fan_out, device=self.device, dtype=self.dtype)
                base = self._rows(fused, slot).start
                for p, (module, first, width) in enumerate(parts):
                    if module not in adapter.weights:
                        continue
                    a, b = adapter.weights[module]
                    rows = slice(base + p * self.max_rank, base + p * self.max_rank + adapter.rank)
                    self.a[layer][fused][rows] = a[layer].to(self.device, self.dtype)
                    self.bt[layer][fused][rows, first : first + width] = (b[layer] * adapter.scaling).t().to(self.device, self.dtype)
        self.slots[slot], self.slot_fused[slot] = adapter.name, tuple(touched)

    def _clear_slot(self, slot: int) -> None:
        for fused in self.slot_fused[slot]:
            rows = self._rows(fused, slot)
            for layer in range(self.config.num_hidden_layers):
                self.a[layer][fused][rows] = 0
                self.bt[layer][fused][rows] = 0
            self.targeted[fused] -= 1
        self.slots[slot], self.slot_fused[slot] = None, ()

    # -- batched application ---------------------------------------------------------------------------

    def prepare(self, batch: StepBatch) -> None:
        """Per-step state shared by every layer: each decode row's slot mask, and the prefill segments."""
        rows = batch.adapter_rows
        if rows is None:
            self._prepared = None
            return
        nd = batch.num_decode
        masks = {}
        if nd and bool((rows[:nd] >= 0).any()):
            used = int(rows[:nd].max()) + 1
            for parts in {len(p) for p in self.parts.values()}:
                slot_of_row = torch.arange(used, device=self.device).repeat_interleave(parts * self.max_rank)
                masks[parts] = (rows[:nd, None] == slot_of_row[None, :]).to(self.dtype)
        segments = [(slice(c.start, c.start + c.length), int(rows[c.start])) for c in batch.prefills if int(rows[c.start]) >= 0]
        self._prepared = (nd, masks, segments)

    def apply(self, layer: int, fused: str, x: torch.Tensor, out: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """The model's hook: add every row's LoRA delta to the fused projection's output, in place."""
        if self._prepared is None or not self.targeted[fused]:
            return out
        nd, masks, segments = self._prepared
        a, bt = self.a[layer][fused], self.bt[layer][fused]
        if masks:
            mask = masks[len(self.parts[fused])]
            used = mask.shape[1]
            out[:nd] += ((x[:nd] @ a[:used].t()) * mask) @ bt[:used]
        for rows, slot in segments:
            ranks = self._rows(fused, slot)
            out[rows] += (x[rows] @ a[ranks].t()) @ bt[ranks]
        return out
