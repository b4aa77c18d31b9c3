"""One step on the device: put the step's addons in LoRA slots, flatten the scheduled chunks into a batch,
run the forward pass (on every tensor-parallel rank) and sample the rows that end a sequence's known tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ember.runtime.engine import batch as step_batch
from ember.runtime.engine.compiled_step import CompiledDecode
from ember.runtime.engine.kv_cache import KVCache
from ember.runtime.engine.sequence import Sequence
from ember.runtime.lora.batched import BatchedLoRA
from ember.runtime.lora.manager import LoRAManager
from ember.runtime.lora.slots import DeviceSlots
from ember.runtime.model.grammar import Grammars, constrain
from ember.runtime.model.decoder import Decoder
from ember.runtime.model.sampling import TokenLogprob, process_logits, sample

if TYPE_CHECKING:
    from ember.runtime.parallel.workers import Peers


class Forward:
    """A step's forward pass on this rank's share of the model, the same on every tensor-parallel rank: the LoRA
    hook's metadata from the slots, then the compiled decode step where it takes the batch, else the eager pass."""

    def __init__(self, model: Decoder, cache: KVCache, slots: DeviceSlots | None, compiled: CompiledDecode | None):
        self.model, self.cache, self.compiled = model, cache, compiled
        self.lora_hook = BatchedLoRA(slots) if slots is not None else None
        model.lora = self.lora_hook

    def __call__(self, batch: step_batch.StepBatch) -> torch.Tensor:
        lora_step = self.lora_hook.step_metadata(batch) if self.lora_hook else None
        if self.compiled is not None and self.compiled.takes(batch):
            return self.compiled(batch, lora_step)
        return self.model.forward(batch, self.cache, lora_step)


class ModelRunner:
    def __init__(self, forward: Forward, lora: LoRAManager | None, grammars: Grammars, peers: Peers | None = None):
        """`peers`: the other tensor-parallel ranks, sent each step before this rank runs it."""
        self.forward, self.lora, self.grammars, self.peers = forward, lora, grammars, peers
        self.device = forward.model.weights.device

    def logits(self, chunks: list[step_batch.ScheduledChunk], every_row: bool = False):
        """The step's batch and the logits of its sampled rows (`every_row`: of all its rows, a devtool's
        teacher-forced pass), computed on every rank."""
        on = self.device if self.peers is None else torch.device("cpu")  # a batch to be sent is built on the CPU
        batch = step_batch.build(chunks, self.forward.cache.block_size, on)
        if every_row:
            batch.sample_rows = torch.arange(batch.input_ids.shape[0], device=on)
        if self.peers is not None:  # each rank moves it to its own device
            self.peers.step(self.lora.device_slots.take_changes() if self.lora else [], batch)
            batch = batch.to(self.device)
        return batch, self.forward(batch)

    def run(self, scheduled: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int, TokenLogprob | None]]:
        """Compute the scheduled tokens; (sequence, sampled token, its logprobs) for each sequence that samples."""
        slots = self.lora.activate({s.adapter for s, _ in scheduled} - {None}) if self.lora else {}
        chunks = [step_batch.ScheduledChunk(seq.tokens, seq.num_computed, n, seq.block_table, slots.get(seq.adapter, -1))
                  for seq, n in scheduled]
        batch, logits = self.logits(chunks)
        for seq, n in scheduled:
            seq.num_computed += n
        sampled = [scheduled[i][0] for i in batch.sampled_chunks]
        if not sampled:
            return []
        params = [s.params for s in sampled]
        logits = process_logits(logits, params, [(s.prompt_ids, s.output_ids) for s in sampled],
                                [s.logit_tensors for s in sampled])
        logits = constrain(logits, [(i, self.grammars.allowed(s.matcher)) for i, s in enumerate(sampled) if s.matcher])
        tokens, logprobs = sample(logits, params, [s.generator for s in sampled])
        for seq, token in zip(sampled, tokens):
            if seq.matcher is not None:
                seq.matcher.consume_token(token)
        return list(zip(sampled, tokens, logprobs))
