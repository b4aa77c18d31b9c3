"""Per-account rate limits: requests and tokens a minute, as token buckets that hold a minute's worth and refill
evenly, so an account may burst up to its limit and then goes at its rate. Enforced before a request reaches a replica;
one account's buckets are its own, so a noisy account spends only its own.

A request is counted when it is admitted: one request, and an estimate of its tokens (its prompt's characters / 4, plus
max_tokens for every choice); once its usage is known the estimate is settled to what it used. The headers are
OpenAI's: `x-ratelimit-limit-*`, `x-ratelimit-remaining-*`, `x-ratelimit-reset-*` (the time until the bucket is full
again), for requests and for tokens, and `Retry-After` on a 429.

A gateway with several replicas (pods) holds each account to an even share of its limits in each (`share`), and reports
the whole limit, and what remains of it as its share's remainder scaled up.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from ember.provider.domain.kinds.gateway import RateLimits
from ember.runtime.gateway.bodies import content_text
from ember.runtime.serving.errors import APIError

CHARACTERS_PER_TOKEN = 4  # the estimate's: a prompt's tokens before any tokenizer has seen it
# A chat request that leaves max_tokens out may run to the end of the context; it is counted at this until its usage
# settles it.
UNSTATED_MAX_TOKENS = 256
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions, which the replica applies too


def estimate_tokens(body: dict, chat: bool) -> int:
    """What a request will use, from its body, before anything reads its text with a tokenizer."""
    if chat:
        messages = body.get("messages")
        characters = sum(len(content_text(m.get("content"))) for m in messages if isinstance(m, dict)) \
            if isinstance(messages, list) else 0
        prompts, limit = 1, body.get("max_completion_tokens") or body.get("max_tokens") or UNSTATED_MAX_TOKENS
    else:
        prompt = body.get("prompt")
        batch = prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else [prompt]
        characters = sum(len(p) * CHARACTERS_PER_TOKEN if isinstance(p, list) else len(content_text(p)) for p in batch)
        prompts, limit = len(batch), body.get("max_tokens") or COMPLETIONS_MAX_TOKENS
    choices = body.get("n") if isinstance(body.get("n"), int) and body.get("n") > 0 else 1
    limit = limit if isinstance(limit, int) and limit > 0 else UNSTATED_MAX_TOKENS
    return math.ceil(characters / CHARACTERS_PER_TOKEN) + limit * choices * prompts


def _duration(seconds: float) -> str:
    """As OpenAI writes a reset: 20ms, 1.5s, 6m0s."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    rest = f"{rest:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{rest}s" if minutes else f"{rest}s"


@dataclass
class _Bucket:
    level: float
    updated: float

    def refill(self, capacity: float, now: float) -> None:
        self.level = min(capacity, self.level + (now - self.updated) * capacity / 60)
        self.updated = now


@dataclass(frozen=True)
class Admission:
    account: str
    tokens: int  # what it was counted at
    headers: dict[str, str]


class RateLimiter:
    def __init__(self, share: int = 1):
        self.share = share
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def admit(self, account: str, limits: RateLimits, tokens: int) -> Admission:
        """Count one request of `tokens` against `account`'s limits, or raise a 429 saying which limit and when."""
        now = time.monotonic()
        capacity = {"requests": limits.requests_per_minute / self.share,
                    "tokens": limits.tokens_per_minute / self.share}
        wanted = {"requests": 1, "tokens": tokens}
        buckets = {kind: self._bucket(account, kind, capacity[kind], now) for kind in wanted}
        if tokens > capacity["tokens"]:
            raise APIError(429, f"this request counts as {tokens} tokens, more than the {limits.tokens_per_minute} a "
                                f"minute account {account!r} may use: it can never be admitted; ask for fewer "
                                f"max_tokens or send a shorter prompt", type="rate_limit_error",
                           code="rate_limit_exceeded", headers=self._headers(buckets, capacity, limits))
        short = [kind for kind in wanted if buckets[kind].level < wanted[kind]]
        if short:
            wait = max((wanted[k] - buckets[k].level) * 60 / capacity[k] for k in short)
            limit = {"requests": limits.requests_per_minute, "tokens": limits.tokens_per_minute}
            raise APIError(429, f"account {account!r} is over its limit of {limit[short[0]]} {short[0]} a minute; "
                                f"retry in {_duration(wait)}", type="rate_limit_error", code="rate_limit_exceeded",
                           headers=self._headers(buckets, capacity, limits) | {"Retry-After": str(math.ceil(wait))})
        for kind, bucket in buckets.items():
            bucket.level -= wanted[kind]
        return Admission(account, tokens, self._headers(buckets, capacity, limits))

    def settle(self, admission: Admission, used: int) -> None:
        """The request used `used` tokens, not the estimate: give back the difference (or take it; a bucket may go
        below empty, and the account waits it out)."""
        bucket = self._buckets.get((admission.account, "tokens"))
        if bucket is not None:
            bucket.level += admission.tokens - used

    def _bucket(self, account: str, kind: str, capacity: float, now: float) -> _Bucket:
        bucket = self._buckets.setdefault((account, kind), _Bucket(capacity, now))
        bucket.refill(capacity, now)
        return bucket

    def _headers(self, buckets: dict[str, _Bucket], capacity: dict[str, float], limits: RateLimits) -> dict[str, str]:
        headers = {}
        for kind, limit in (("requests", limits.requests_per_minute), ("tokens", limits.tokens_per_minute)):
            level = max(buckets[kind].level, 0.0)
            headers[f"x-ratelimit-limit-{kind}"] = str(limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(min(limit, math.floor(level * self.share)))
            headers[f"x-ratelimit-reset-{kind}"] = _duration((capacity[kind] - level) * 60 / capacity[kind])
        return headers
