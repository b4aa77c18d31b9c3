"""The engine: requests in, token and text deltas out, one continuous-batching step at a time.

request → scheduler → model step → sampler → detokenizer/stop check → RequestOutput. The engine is
single-threaded and synchronous; the HTTP server drives it from one loop thread. It never logs or
keeps prompt or output text beyond the life of a request.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ember.provider.domain.model_files import ModelFilesError
from ember.provider.domain.replica_spec import DEFAULT_MAX_LORA_RANK
from ember.provider.domain.tensor_parallel import Shard
from ember.runtime.engine.compiled_step import CompiledDecode, use_cache_folder
from ember.runtime.engine.kv_cache import KVCache
from ember.runtime.engine.model_runner import Forward, ModelRunner
from ember.runtime.engine.output import OutputProcessor
from ember.runtime.engine.scheduler import Scheduler
from ember.runtime.engine.sequence import Sequence
from ember.runtime.lora.manager import LoRAManager
from ember.runtime.model.config import ModelConfig
from ember.runtime.model.grammar import CompiledGrammar, Grammars
from ember.runtime.model.decoder import Decoder
from ember.runtime.model.loader import ModelWeights, load_model
from ember.runtime.model.quantized import QUANTIZED, quantize_projections
from ember.runtime.model.sampling import LogitTensors, SamplingParams, TokenLogprob
from ember.runtime.model.tokenizer import TextTokenizer

if TYPE_CHECKING:
    from ember.runtime.parallel.workers import Peers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    device: str = "auto"  # "auto" picks CUDA when present
    precision: str | None = None  # fp32 | bf16 | fp16 | int8 | int4 | fp8; default fp32 on CPU, bf16 on CUDA
    max_model_len: int | None = None  # prompt + output tokens; default the model's, at most 8192
    block_size: int = 16
    kv_cache_tokens: int | None = None  # default: 1 GiB of cache on CPU, half the free memory on CUDA
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    # 0, the base model only, for an engine built in code (a test, a benchmark); a replica takes its spec's, which
    # defaults to a deployment's DEFAULT_MAX_LORAS.
    max_loras: int = 0
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK
    max_cpu_loras: int | None = None  # adapters kept in host memory (default: 4 x max_loras, at least 32)
    prefix_caching: bool = True  # requests reuse the K/V of prompt prefixes already computed
    compile: bool = False  # decode steps through torch.compile (compiled_step.py); eager when False
    compile_cache: Path | None = None  # where compiled kernels are kept between starts (default: torch's)
    # Ranks (one per device) the model is split across: tensor parallelism (runtime/parallel/); a replica's is its
    # deployment's accelerator_count.
    tensor_parallel_size: int = 1

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def max_positions(self, model: ModelConfig) -> int:
        """The context the engine serves: max_model_len, at most the model's."""
        return min(self.max_model_len or model.max_position_embeddings, model.max_position_embeddings)


def load_weights(directory: Path, config: EngineConfig, device: torch.device, shard: Shard | None = None) -> ModelWeights:
    """The model's weights (a tensor-parallel rank's `shard` of them) in the configured precision."""
    dtype_name = config.precision or ("fp32" if device.type == "cpu" else "bf16")
    if dtype_name not in (*DTYPES, *QUANTIZED):
        raise ModelFilesError(f"precision {dtype_name!r} is not one of {', '.join([*DTYPES, *QUANTIZED])}")
    # Quantized precisions: projection weights in int8, int4 or fp8, everything else (activations,
    # KV cache, embeddings, LoRA addons) in bf16.
    weights = load_model(directory, DTYPES.get(dtype_name, torch.bfloat16), device, shard)
    if dtype_name in QUANTIZED:
        quantize_projections(weights, dtype_name)
    return weights


def make_cache(model: Decoder, config: EngineConfig, num_blocks: int) -> KVCache:
    """The KV cache of this rank's KV heads (every rank has the same blocks)."""
    c = model.local
    # Blocks behind a sliding window go back to the pool when every layer has that window (Gemma's global
    # layers need every block)
    return KVCache(c.num_hidden_layers, num_blocks, config.block_size, c.num_key_value_heads, c.head_dim,
                   model.weights.dtype, model.weights.device, config.prefix_caching, c.shared_window)


def compile_decode(model: Decoder, cache: KVCache, config: EngineConfig) -> tuple[CompiledDecode | None, float]:
    """The compiled decode step, warmed up, and the seconds that took (None, 0 when not compiling)."""
    if not config.compile or model.config.experts is not None:
        # A Mixture of Experts' step runs each routed expert on its tokens: sizes a compiled graph cannot know
        return None, 0.0
    if config.compile_cache is not None:
        use_cache_folder(config.compile_cache)
    began = time.monotonic()
    compiled = CompiledDecode(model, cache)
    compiled.warm_up()
    return compiled, time.monotonic() - began


@dataclass
class RequestOutput:
    """What one step produced for one request: new tokens and text, and whether it is done."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache


@dataclass
class Completion:
    """A whole finished request (from `Engine.generate`)."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0


class ContextLengthExceeded(ValueError):
    """A request that does not fit the model's context: `param` names the field that overflows it (prompt or
    max_tokens), `detail` says by how much. The server answers it as OpenAI's context_length_exceeded."""

    def __init__(self, param: str, detail: str):
        super().__init__(f"{param}: {detail}")
        self.param, self.detail = param, detail


class UnknownTokenId(ValueError):
    """A token id a request names (in its prompt, logit_bias or stop_token_ids) that the model's vocabulary lacks:
    `param` names the field. The server answers it as a 400 before anything runs or streams."""

    def __init__(self, param: str, token_id: int, vocab_size: int):
        super().__init__(f"{param}: token id {token_id} is outside this model's vocabulary of {vocab_size}")
        self.param = param


class Engine:
    def __init__(self, model: Decoder, tokenizer: TextTokenizer, config: EngineConfig = EngineConfig(),
                 peers: Peers | None = None):
        """`peers`: the replica's other tensor-parallel ranks, which run every step with this one (rank 0)."""
        self.model, self.tokenizer, self.config, self.peers = model, tokenizer, config, peers
        c = model.config
        self.device = model.weights.device
        self.max_model_len = config.max_positions(c)
        tokens = config.kv_cache_tokens or self._default_cache_tokens()
        num_blocks = tokens // config.block_size
        # what one request holds at most: all its context, or under a window shared by every layer, the window
        # behind a step's chunk and the chunk (and the blocks either straddles)
        window = c.shared_window
        one_request = self.max_model_len if window is None else min(
            self.max_model_len, window + config.max_num_batched_tokens + 2 * config.block_size)
        if num_blocks * config.block_size < one_request:
            raise ValueError(f"kv_cache_tokens: {tokens} cannot hold one request of max_model_len "
                             f"{self.max_model_len}" + (f" ({one_request} under its {window}-token window)"
                                                        if window else ""))
        self.cache = make_cache(model, config, num_blocks)
        if peers is not None:
            peers.begin(num_blocks)  # they build theirs, and compile their step beside this one's
        self.scheduler = Scheduler(self.cache.allocator, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.max_loras)
        self.lora: LoRAManager | None = None
        if config.max_loras:
            self.lora = LoRAManager(c, max_loras=config.max_loras, max_rank=config.max_lora_rank,
                                    max_cpu_loras=config.max_cpu_loras, device=self.device, dtype=model.weights.dtype,
                                    shard=model.weights.shard)
        stop_token_ids = set(c.eos_token_ids) | {t for t in [tokenizer.token_id(tokenizer.eos_token)] if t is not None}
        self.stop_token_ids = stop_token_ids
        self.grammars = Grammars(tokenizer, c.vocab_size, stop_token_ids)
        # compiling the decode steps (from the cache after the first start): part of a cold start
        compiled, self.warm_up_s = compile_decode(model, self.cache, config)
        if peers is not None:
            peers.wait_ready()
        forward = Forward(model, self.cache, self.lora.device_slots if self.lora else None, compiled)
        self.runner = ModelRunner(forward, self.lora, self.grammars, peers)
        self.output = OutputProcessor(tokenizer, stop_token_ids, self.max_model_len)
        self.requests: dict[str, Sequence] = {}
        self._ids = itertools.count()

    @classmethod
    def from_dir(cls, directory: str | Path, config: EngineConfig = EngineConfig()) -> "Engine":
        directory = Path(directory)
        device = config.resolved_device()
        peers = None
        if config.tensor_parallel_size > 1:
            from ember.runtime.parallel.workers import Peers

            peers = Peers(directory, config, config.tensor_parallel_size)
        try:
            weights = load_weights(directory, config, peers.group.device if peers else device,
                                   peers.group.shard if peers else None)
            model = Decoder(weights, max_positions=config.max_positions(weights.config),
                          group=peers.group if peers else None)
            return cls(model, TextTokenizer.from_dir(directory), config, peers)
        except BaseException:
            if peers is not None:
                peers.close()
            raise

    def close(self) -> None:
        """Stop the other tensor-parallel ranks, if any (a replica's process ends with them anyway)."""
        if self.peers is not None:
            self.peers.close()

    def _default_cache_tokens(self) -> int:
        c = self.model.local  # this rank's KV heads: the memory is per device
        per_token = KVCache.bytes_per_token(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, self.model.weights.dtype)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free // 2
        else:
            budget = 1 << 30
        return max(budget // per_token, self.max_model_len)

    # -- requests ------------------------------------------------------------------------------------

    def room(self, prompt_tokens: int, max_tokens: int | None = None) -> int:
        """The output tokens a request of `prompt_tokens` gets: `max_tokens` if given, else all the context leaves;
        ContextLengthExceeded when that does not fit. The one context check: add_request makes it for every
        request, and the server makes it beforehand to answer a 400 before anything streams."""
        context = self.max_model_len
        if prompt_tokens >= context:
            raise ContextLengthExceeded("prompt", f"the prompt is {prompt_tokens} tokens; this model's context is "
                                                  f"{context}")
        if max_tokens is None:
            return context - prompt_tokens
        if prompt_tokens + max_tokens > context:
            raise ContextLengthExceeded("max_tokens", f"the prompt's {prompt_tokens} tokens plus max_tokens "
                                                      f"{max_tokens} exceed this model's context of {context} tokens")
        return max_tokens

    def check_token_ids(self, param: str, token_ids) -> None:
        """Raise UnknownTokenId for the first of `token_ids` outside the model's vocabulary."""
        vocab = self.model.config.vocab_size
        bad = next((int(t) for t in token_ids if not 0 <= int(t) < vocab), None)
        if bad is not None:
            raise UnknownTokenId(param, bad, vocab)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    adapter: str | None = None, cache_salt: str = "") -> str:
        """Queue a request; raises ValueError (naming the field, never the text) if it cannot be served.
        Requests share cached prefixes only with requests of the same `cache_salt` (the server's: the account)."""
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request_id: {request_id!r} is already in flight")
        if not prompt_ids:
            raise ValueError("prompt: is empty")
        self.check_token_ids("prompt", prompt_ids)
        if adapter is not None and self.lora is None:
            raise ValueError(f"model: {adapter!r} is an addon, and this deployment serves no addons")
        self.room(len(prompt_ids), params.max_tokens)
        if params.grammar is not None and not isinstance(params.grammar, CompiledGrammar):
            # compiling here would hold up every other request's step: Engine.grammars.compile it beforehand
            raise ValueError("grammar: must be compiled (Engine.grammars.compile) before the request is added")
        matcher = params.grammar.matcher() if params.grammar else None
        # From here on the request holds the addon's current version, not its name: weights loaded under the
        # name while it runs serve only later requests. Refuses an adapter that is not (or no longer) served.
        version = self.lora.acquire(adapter) if adapter is not None else None
        seq = Sequence(request_id, list(prompt_ids), params, version, matcher=matcher,
                       logit_tensors=LogitTensors.of(params, self.stop_token_ids, self.device),
                       cache_namespace=self._cache_namespace(version, cache_salt))
        self.requests[request_id] = seq
        self.output.add(seq)
        self.scheduler.add(seq)
        return request_id

    def _cache_namespace(self, version: str | None, salt: str) -> bytes:
        """Cached K/V are shared only between requests of one salt (one account: a cached prefix answers
        sooner, which would tell one tenant what another sent) and the same weights: the base model's, or one
        addon version's (`version` is the manager's key of it, new at each load). An addon changes K/V even
        when it leaves k_proj and v_proj alone: any LoRA module of a layer changes the hidden states every
        later layer's K and V are computed from."""
        return f"{salt}\n{version or ''}".encode()

    def abort(self, request_id: str) -> bool:
        """Drop a request (its client went away); frees its cache at once. False if it was not in flight."""
        seq = self.requests.pop(request_id, None)
        self.output.remove(request_id)
        if seq is None:
            return False
        self._finish(seq, "abort")
        return True

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        if seq.adapter is not None:
            self.lora.release(seq.adapter)

    @property
    def served_addons(self) -> list[str]:
        return self.lora.served if self.lora else []

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # -- the step ------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        sampled = self.runner.run(scheduled)
        self.scheduler.computed(scheduled)
        return [self._append(seq, token, logprob) for seq, token, logprob in sampled]

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> RequestOutput:
        seq.tokens.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        delta, reason = self.output.process(seq, token)
        if reason:
            self._finish(seq, reason)
            del self.requests[seq.request_id]
        return RequestOutput(
            request_id=seq.request_id,
            token_ids=[token],
            text=delta,
            logprobs=[logprob] if logprob is not None else [],
            finished=reason is not None,
            finish_reason=reason,
            prompt_tokens=seq.num_prompt,
            completion_tokens=len(seq.output_ids),
            cached_tokens=seq.num_cached,
        )

    # -- convenience -----------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 adapters: list[str | None] | None = None) -> list[Completion]:
        """Run requests to completion together (continuous batching) and return them in order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        adapters = adapters or [None] * len(prompts)
        ids = [self.add_request(p, sp, adapter=a) for p, sp, a in zip(prompts, params_list, adapters)]
        results = {i: Completion(prompt_tokens=len(p)) for i, p in zip(ids, prompts)}
        while self.has_unfinished:
            for out in self.step():
                result = results.get(out.request_id)
                if result is None:
                    continue
                result.token_ids += out.token_ids
                result.text += out.text
                result.logprobs += out.logprobs
                if out.finished:
                    result.finish_reason = out.finish_reason
        return [results[i] for i in ids]
