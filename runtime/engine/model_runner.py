"""One step on the device: put the step's addons in LoRA slots, flatten the scheduled chunks into a batch,
run the forward pass and sample the rows that end a sequence's known tokens."""

from __future__ import annotations

from ember.runtime.engine import batch as step_batch
from ember.runtime.engine.compiled_step import CompiledDecode
from ember.runtime.engine.kv_cache import KVCache
from ember.runtime.engine.sequence import Sequence
from ember.runtime.lora.batched import BatchedLoRA
from ember.runtime.lora.manager import LoRAManager
from ember.runtime.model.grammar import Grammars, constrain
from ember.runtime.model.llama import Llama
from ember.runtime.model.sampling import TokenLogprob, process_logits, sample


class ModelRunner:
    def __init__(self, model: Llama, cache: KVCache, lora: LoRAManager | None, grammars: Grammars,
                 compiled: CompiledDecode | None = None):
        self.model, self.cache, self.lora = model, cache, lora
        self.grammars, self.compiled = grammars, compiled
        self.lora_hook = BatchedLoRA(lora.device_slots) if lora else None
        model.lora = self.lora_hook

    def run(self, scheduled: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int, TokenLogprob | None]]:
        """Compute the scheduled tokens; (sequence, sampled token, its logprobs) for each sequence that samples."""
        slots = self.lora.activate({s.adapter for s, _ in scheduled} - {None}) if self.lora else {}
        chunks = [step_batch.ScheduledChunk(seq.tokens, seq.num_computed, n, seq.block_table, slots.get(seq.adapter, -1))
                  for seq, n in scheduled]
        batch = step_batch.build(chunks, self.cache.block_size, self.model.weights.device)
        lora_step = self.lora_hook.step_metadata(batch) if self.lora_hook else None
        if self.compiled is not None and self.compiled.takes(batch):
            logits = self.compiled(batch, lora_step)
        else:
            logits = self.model.forward(batch, self.cache, lora_step)
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
