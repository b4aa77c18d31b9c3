"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Each request owns a torch.Generator and draws exactly one uniform number per token, so a seeded
request produces the same tokens whatever else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # benchmarks: produce exactly max_tokens
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the top k

    def __post_init__(self):
        def bad(name: str, rule: str):
            raise ValueError(f"{name}: {getattr(self, name)!r} is invalid: {rule}")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer of at least 1")
        if not 0 <= self.temperature <= 2:
            bad("temperature", "must be between 0 and 2")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "must be an integer of at least 0 (0 means no limit)")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            bad("logprobs", f"must be between 0 and {MAX_LOGPROBS}")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop: every stop string must be a non-empty string")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


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
