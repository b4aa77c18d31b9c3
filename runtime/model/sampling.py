"""Sampling parameters and the sampler: logit bias, min_tokens, repetition/frequency/presence penalties, then
greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Each request owns a torch.Generator and draws exactly one uniform number per token, so a seeded
request produces the same tokens whatever else shares its batch. The logits processors run per row, only on
the rows of requests that ask for them, in vLLM's order: logit bias, min_tokens, penalties; logprobs are of
the processed logits, before temperature.

SamplingParams are trusted: the server's request models (serving/protocol.py) validate every value a client
sends before building them, and library callers (the benchmarks, the tests) are the runtime's own code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ember.runtime.model.grammar import CompiledGrammar

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling, as validated at the edge; the engine does not check it again."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # benchmarks: produce exactly max_tokens
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the top k
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token the output already has
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # vLLM/transformers': divides positive (multiplies negative) logits of every
    # token seen in the prompt or the output
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    min_tokens: int = 0  # no EOS, stop token or stop string before this many tokens
    grammar: CompiledGrammar | None = None  # what the output must follow (structured outputs), compiled beforehand

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def processes_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1
                    or self.logit_bias or self.min_tokens)


@dataclass(frozen=True)
class LogitTensors:
    """What a request's logits processors add and mask that does not change as it runs, as tensors on the engine's
    device: built once when the request is added (Sequence.logit_tensors), not again at every step."""

    bias_ids: torch.Tensor | None = None  # logit_bias: its token ids, [n] long
    biases: torch.Tensor | None = None  # and their biases, [n] float32 as the logits are
    # the end tokens min_tokens masks: the request's, and the model's unless ignore_eos
    held_back: torch.Tensor | None = None

    @classmethod
    def of(cls, params: SamplingParams, model_ends: set[int], device: torch.device) -> "LogitTensors | None":
        ends = sorted((set() if params.ignore_eos else set(model_ends)) | set(params.stop_token_ids))
        held_back = torch.tensor(ends, dtype=torch.long, device=device) if params.min_tokens and ends else None
        if not params.logit_bias and held_back is None:
            return None
        ids, biases = zip(*params.logit_bias) if params.logit_bias else ((), ())
        return cls(torch.tensor(ids, dtype=torch.long, device=device) if ids else None,
                   torch.tensor(biases, dtype=torch.float32, device=device) if ids else None, held_back)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = field(default=())  # (token id, logprob), best first


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def process_logits(logits: torch.Tensor, params: list[SamplingParams], histories: list[tuple[list[int], list[int]]],
                   tensors: list[LogitTensors | None]) -> torch.Tensor:
    """Each row's logits with its request's processors applied: `histories` are the (prompt, output) tokens of each
    row's request, `tensors` what it adds and masks (built once per request)."""
    if not any(p.processes_logits for p in params):
        return logits
    logits = logits.clone()  # the forward pass's output is an inference-mode tensor: not changed in place
    for i, p in enumerate(params):
        if not p.processes_logits:
            continue
        row, (prompt, output), fixed = logits[i], histories[i], tensors[i] or LogitTensors()
        if fixed.bias_ids is not None:
            row.index_add_(0, fixed.bias_ids, fixed.biases)
        if len(output) < p.min_tokens and fixed.held_back is not None:
            row[fixed.held_back] = float("-inf")
        if p.repetition_penalty != 1:
            seen = torch.tensor(sorted(set(prompt) | set(output)), device=row.device)
            values = row[seen]
            row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and output:
            counts = torch.bincount(torch.tensor(output, device=row.device), minlength=row.shape[0]).to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
           ) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits: [S, vocab] float32 → one token per row, and its logprobs where asked for."""
    chosen = logits.argmax(dim=-1)
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        rows = torch.tensor(random_rows, device=logits.device)
        subset = [params[i] for i in random_rows]
        scaled = logits[rows] / torch.tensor([p.temperature for p in subset], device=logits.device)[:, None]
        scaled = _top_k(scaled, [p.top_k for p in subset])
        scaled = _top_p(scaled, [p.top_p for p in subset])
        cdf = torch.softmax(scaled, dim=-1).cumsum(dim=-1)
        uniforms = torch.cat([torch.rand(1, generator=generators[i]) for i in random_rows]).to(logits.device)
        picked = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None]).clamp_(max=logits.shape[-1] - 1)
        chosen[rows] = picked[:, 0]
    tokens = chosen.tolist()
    return tokens, _logprobs(logits, tokens, params)


def _top_k(logits: torch.Tensor, ks: list[int]) -> torch.Tensor:
    if not any(ks):
        return logits
    vocab = logits.shape[-1]
    k = torch.tensor([min(k, vocab) if k else vocab for k in ks], device=logits.device)
    sorted_desc = logits.sort(dim=-1, descending=True).values
    threshold = sorted_desc.gather(-1, (k - 1)[:, None])
    return logits.masked_fill(logits < threshold, float("-inf"))


def _top_p(logits: torch.Tensor, ps: list[float]) -> torch.Tensor:
    if all(p >= 1 for p in ps):
        return logits
    top_p = torch.tensor(ps, device=logits.device)[:, None]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the tokens before it already reach top_p; the best token always stays.
    drop = probs.cumsum(dim=-1) - probs >= top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _logprobs(logits: torch.Tensor, tokens: list[int], params: list[SamplingParams]) -> list[TokenLogprob | None]:
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    result: list[TokenLogprob | None] = [None] * len(params)
    if not wanted:
        return result
    logp = torch.log_softmax(logits[wanted], dim=-1)
    k = max(params[i].logprobs for i in wanted)
    top_values, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    for row, i in enumerate(wanted):
        n = params[i].logprobs
        top = tuple(zip(top_ids[row, :n].tolist(), top_values[row, :n].tolist()))
        result[i] = TokenLogprob(tokens[i], float(logp[row, tokens[i]]), top)
    return result
