"""The gateway's autoscaler: each deployment's replica count follows the load the gateway measures, within the
deployment's range, and a deployment that may reach zero is started again by the request that finds it there.

Load is the requests the gateway has in flight on a deployment's replicas plus those it holds for it (waiting for a
replica to start). The count it wants is load / `target_concurrent_requests`, rounded up, within
[max(min_replicas, 1), max_replicas]. It moves up once every tick of `scale_up_window_s` wanted more, down once every
tick of `scale_down_window_s` wanted fewer, and to zero (min_replicas 0) after `scale_to_zero_window_s` without a
request. A request for a deployment at zero starts a replica at once (no window), and is held until one is ready.

Every change is a replica started (the gateway routes to it once it registers) or drained (it finishes what it runs,
and the gateway stops sending to it as it says it is draining): never a dropped request. The decisions are a pure
function of what was measured (`Plan.decide`), the changes are made on a worker thread. Each change applied, or
refused by its cluster, goes to the audit log (`audit`: deployment.scaled, "from -> to replicas").
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from ember.runtime.gateway.directory import Deployment
from ember.runtime.gateway.scalers import Scaler

log = logging.getLogger("ember.gateway")
TICK_S = 1.0


@dataclass
class Plan:
    """What the autoscaler remembers of one deployment between ticks."""

    running: int | None = None  # replicas running or starting, as its cluster said at the last tick
    wanted_more_since: float | None = None
    wanted_fewer_since: float | None = None
    last_request: float = field(default_factory=time.monotonic)

    def decide(self, deployment: Deployment, load: int, now: float, follows_load: bool = True,
               idle_elsewhere_s: float = math.inf) -> int | None:
        """The count to change to now, or None to leave it. Without `follows_load`, only to zero and back.
        `idle_elsewhere_s`: since its replicas last began a request from any gateway (other gateway pods too)."""
        record, running = deployment.record, self.running
        if record is None or running is None:
            return None
        policy = record.autoscaling
        floor = max(record.min_replicas, 1)
        if load:
            self.last_request = now
        if running == 0:  # woken by a held request (the load then moves it on); on Kubernetes, a floor raised from
            # zero too (an `up` sets no count where an autoscaler owns it; locally `up` starts the floor itself)
            return 1 if load or record.min_replicas and not follows_load else None
        wanted = min(max(math.ceil(load / policy.target_concurrent_requests), floor), record.max_replicas) \
            if follows_load else running
        if wanted > running:
            self.wanted_fewer_since = None
            self.wanted_more_since = self.wanted_more_since if self.wanted_more_since is not None else now
            return wanted if now - self.wanted_more_since >= policy.scale_up_window_s else None
        self.wanted_more_since = None
        to_zero = policy.scale_to_zero_window_s
        idle = min(now - self.last_request, idle_elsewhere_s)
        if record.min_replicas == 0 and to_zero is not None and not load and idle >= to_zero:
            return 0
        if wanted < running:
            self.wanted_fewer_since = self.wanted_fewer_since if self.wanted_fewer_since is not None else now
            return wanted if now - self.wanted_fewer_since >= policy.scale_down_window_s else None
        self.wanted_fewer_since = None
        return None


class Autoscaler:
    def __init__(self, scalers: list[Scaler], load: Callable[[Deployment], int], on_change=lambda *_: None,
                 audit: Callable[[Deployment, int, int, str], None] = lambda *_: None):
        """`audit(deployment, from, to, result)`: called on a worker thread for each change applied (result "ok") or
        refused by the cluster (the exception's class name)."""
        self.scalers, self.load, self.on_change, self.audit = scalers, load, on_change, audit
        self.plans: dict[str, Plan] = {}
        self.held: Counter[str] = Counter()  # requests waiting for a replica to start, by deployment
        self._waking: dict[str, asyncio.Future] = {}

    def scaler(self, deployment: Deployment) -> Scaler | None:
        return next((s for s in self.scalers if s.handles(deployment)), None)

    def requested(self, deployment: Deployment) -> None:
        """A request was sent to the deployment (one that is answered between two ticks counts as activity too)."""
        self.plans.setdefault(deployment.name, Plan()).last_request = time.monotonic()

    async def tick(self, deployments: list[Deployment]) -> None:
        now = time.monotonic()
        for name in [n for n in self.plans if n not in {d.name for d in deployments}]:
            del self.plans[name]  # deleted
        for deployment in deployments:
            scaler = self.scaler(deployment)
            if scaler is None or deployment.name in self._waking:
                continue
            try:
                await self._tick_one(scaler, deployment, now)
            except Exception as exc:  # that cluster failed this once: the other deployments are still judged
                log.warning("autoscaling %s failed: %s", deployment.name, exc)

    async def _tick_one(self, scaler: Scaler, deployment: Deployment, now: float) -> None:
        plan = self.plans.setdefault(deployment.name, Plan())
        before, plan.running = plan.running, await asyncio.to_thread(scaler.running, deployment)
        if before is not None and plan.running is not None and plan.running > before:
            plan.last_request = now  # another gateway (pod) started one for its requests: not idle
        # a replica busy with a request another gateway sent, or one begun lately, is activity too
        elsewhere = 0.0 if deployment.busy else time.time() - deployment.last_request
        count = plan.decide(deployment, self.load(deployment) + self.held[deployment.name], now, scaler.follows_load,
                            elsewhere)
        if count is not None and count != plan.running:
            await self._resize(scaler, deployment, plan, count)

    async def _resize(self, scaler: Scaler, deployment: Deployment, plan: Plan, count: int) -> None:
        log.info("scaling %s from %s to %d replicas", deployment.name, plan.running, count)
        try:
            done = await asyncio.to_thread(scaler.resize, deployment, count)
        except Exception as exc:
            await asyncio.to_thread(self.audit, deployment, plan.running or 0, count, type(exc).__name__)
            raise
        if done is not None:  # None: an `up` holds the deployment, and nothing was applied
            await asyncio.to_thread(self.audit, deployment, plan.running or 0, done, "ok")
            self.on_change(deployment.name, plan.running or 0, done)
            plan.running, plan.wanted_more_since, plan.wanted_fewer_since = done, None, None

    def wakeable(self, deployment: Deployment) -> bool:
        """Whether a request that finds no replica of it may start one: a deployment that may scale to zero (one whose
        replicas are loading, failed or crashed gets no_ready_replica at once, not a wait)."""
        record = deployment.record
        return record is not None and record.min_replicas == 0 and self.scaler(deployment) is not None

    async def wake(self, deployment: Deployment) -> None:
        """Start a replica now if none runs (one start however many requests are held)."""
        if deployment.name not in self._waking:
            self._waking[deployment.name] = asyncio.ensure_future(self._wake(deployment))
        await asyncio.shield(self._waking[deployment.name])

    async def _wake(self, deployment: Deployment) -> None:
        try:
            scaler = self.scaler(deployment)
            plan = self.plans.setdefault(deployment.name, Plan())
            plan.last_request = time.monotonic()
            plan.running = await asyncio.to_thread(scaler.running, deployment)
            if not plan.running:
                for _ in range(50):  # an `up` holding the deployment's lock: it is starting replicas itself
                    await self._resize(scaler, deployment, plan, 1)
                    if plan.running:
                        break
                    await asyncio.sleep(0.2)
        finally:
            del self._waking[deployment.name]


async def scale_forever(autoscaler: Autoscaler, deployments: Callable[[], list[Deployment]]) -> None:
    while True:
        try:
            await autoscaler.tick(deployments())
        except Exception as exc:  # a cluster that failed this once: the next tick tries again
            log.warning("autoscaling failed: %s", exc)
        await asyncio.sleep(TICK_S)
