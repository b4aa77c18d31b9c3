"""Which replica answers a request: the one with the fewest requests outstanding from this gateway, unless another is
better placed and not overloaded for it.

- **Prefix affinity.** A replica caches the K/V of the prompt prefixes it computed, per account and weights, in blocks
  of 16 tokens. Requests of one account and model that begin alike (a system prompt) go to the replica that rendezvous
  hashing picks for that beginning, so they find it cached; a replica that joins or leaves moves only its own share.
- **Addon slots.** A replica that holds the request's addon in a device slot runs it without first loading it.

Either preference gives way when its replica has AFFINITY_SLACK more requests outstanding than the least loaded one.
A replica that refused a connection is passed over for DOWN_S (its registration may still be fresh) while another is
left.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from typing import Any

from ember.runtime.gateway.bodies import content_text
from ember.runtime.gateway.directory import Replica

AFFINITY_SLACK = 4  # outstanding requests above the least loaded replica's at which a preference gives way
DOWN_S = 5.0
# About one KV block (16 tokens) of text: a prompt shorter than a block leaves nothing cached to share.
AFFINITY_PREFIX_CHARACTERS = 64
AFFINITY_PREFIX_TOKENS = 16


def affinity_key(account: str, model: str, body: dict[str, Any], chat: bool) -> bytes | None:
    """A hash of the account, the model and the beginning of the prompt (about its first KV block), or None when the
    prompt is shorter than that. Only the hash is kept: the text itself goes nowhere."""
    if chat:
        text = ""
        messages = body.get("messages")
        for message in messages if isinstance(messages, list) else ():
            if len(text) >= AFFINITY_PREFIX_CHARACTERS or not isinstance(message, dict):
                break
            text += f"{message.get('role')}\n{content_text(message.get('content'))}\n"
        head = text[:AFFINITY_PREFIX_CHARACTERS].encode() if len(text) >= AFFINITY_PREFIX_CHARACTERS else None
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch: its first prompt (each goes to the same replica)
        if isinstance(prompt, str):
            head = prompt[:AFFINITY_PREFIX_CHARACTERS].encode() if len(prompt) >= AFFINITY_PREFIX_CHARACTERS else None
        elif isinstance(prompt, list) and len(prompt) >= AFFINITY_PREFIX_TOKENS:
            head = repr(prompt[:AFFINITY_PREFIX_TOKENS]).encode()
        else:
            head = None
    if head is None:
        return None
    return hashlib.sha256(f"{account}\0{model}\0".encode() + head).digest()


def _score(key: bytes, url: str) -> int:
    return int.from_bytes(hashlib.blake2b(key + url.encode(), digest_size=8).digest(), "big")


class Balancer:
    def __init__(self) -> None:
        self._outstanding: dict[str, int] = {}  # by replica URL; a replica with none is not in it
        self._down_until: dict[str, float] = {}

    def outstanding(self, replica: Replica) -> int:
        return self._outstanding.get(replica.url, 0)

    def pick(self, replicas: Iterable[Replica], addon: str | None = None, affinity: bytes | None = None,
             tried: frozenset[str] = frozenset()) -> Replica | None:
        now = time.monotonic()
        untried = [r for r in replicas if r.url not in tried]
        # one that refused lately is tried only when no other is left (it may be back: better than a 503)
        live = [r for r in untried if self._down_until.get(r.url, 0.0) <= now] or untried
        if not live:
            return None
        least = min(map(self.outstanding, live))

        def roomy(replica: Replica) -> bool:
            return self.outstanding(replica) < least + AFFINITY_SLACK

        if affinity is not None:
            favoured = max(live, key=lambda r: _score(affinity, r.url))
            if roomy(favoured):
                return favoured
        if addon is not None:
            holders = [r for r in live if addon in r.slots and roomy(r)]
            if holders:
                return min(holders, key=self.outstanding)
        return min(live, key=self.outstanding)

    def take(self, replica: Replica) -> None:
        """A request was sent to `replica`: outstanding until `release`."""
        self._outstanding[replica.url] = self.outstanding(replica) + 1

    def release(self, replica: Replica) -> None:
        left = self._outstanding.pop(replica.url) - 1
        if left:
            self._outstanding[replica.url] = left

    def down(self, replica: Replica) -> None:
        """It refused a connection: leave it out for a while."""
        self._down_until[replica.url] = time.monotonic() + DOWN_S

    def forget(self, known: set[str]) -> None:
        """Drop what is kept of replicas no longer registered."""
        for url in [u for u in self._down_until if u not in known]:
            del self._down_until[url]
