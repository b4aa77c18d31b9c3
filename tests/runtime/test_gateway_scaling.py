"""The gateway's part in changes without downtime: traffic split by weights (a canary), the autoscaler's decisions, and
a request for a deployment scaled to zero held while a replica starts (stand-in replicas and scalers: milliseconds)."""

import asyncio
import socket
import threading
import time
from collections import Counter

import httpx
from tests.runtime.gateway_helpers import FakeStore, StandIn, concurrent_completions, servers, start_gateway, store

from ember.provider.domain.audit import AuditLog
from ember.provider.domain.kinds.deployment import AutoscalingPolicy
from ember.provider.domain.records import DeploymentRecord
from ember.runtime.gateway.autoscaler import Autoscaler, Plan
from ember.runtime.gateway.directory import Deployment
from ember.runtime.gateway.routing import route

__all__ = ["servers", "store"]  # the fixtures every test here uses
BASE = "accounts/acme/models/base"
BLUE, GREEN = "accounts/acme/deployments/blue", "accounts/acme/deployments/green"
IDLE = "accounts/acme/deployments/idle"
TO_ZERO = {"min_replicas": 0, "max_replicas": 2,
           "autoscaling": AutoscalingPolicy(scale_to_zero_window_s=30, scale_up_window_s=5, scale_down_window_s=20,
                                            target_concurrent_requests=4)}


def complete(front, model: str = BASE) -> httpx.Response:
    return httpx.post(f"{front.url}/v1/completions", headers=front.headers("acme"), timeout=30,
                      json={"model": model, "prompt": "hello", "max_tokens": 4})


def test_a_canary_takes_its_weight_of_the_traffic_and_weight_zero_drains_it(store):
    blue, green = StandIn(["ok"]).start(), StandIn(["ok"]).start()
    store.deployment(BLUE, BASE, traffic_weight=90)
    store.deployment(GREEN, BASE, traffic_weight=10)
    store.register(BLUE, blue)
    store.register(GREEN, green)
    front = start_gateway(store)
    sides = Counter(complete(front).headers["x-ember-deployment"] for _ in range(200))
    assert sides[BLUE] + sides[GREEN] == 200 and 8 <= sides[GREEN] <= 40, sides  # 20 expected; 1e-4 odds outside
    metrics = httpx.get(f"{front.url}/metrics", headers=front.headers("platform")).text
    for side in (BLUE, GREEN):  # the metrics show each side
        series = f'ember_gateway_requests_total{{deployment="{side}",model="{BASE}",status="200"}}'
        assert f"{series} {sides[side]}.0" in metrics
    store.deployment(GREEN, BASE, traffic_weight=0)  # 100/0: green takes no new request
    time.sleep(0.3)
    assert {complete(front).headers["x-ember-deployment"] for _ in range(50)} == {BLUE}
    blue.stop()  # ... unless no other deployment can answer
    store.register(BLUE, blue, last_seen=0)
    time.sleep(0.3)
    assert complete(front).headers["x-ember-deployment"] == GREEN


def test_the_split_is_by_weight_among_deployments_with_a_replica(store):
    def deployment(name: str, weight: int, replicas: int) -> Deployment:
        from ember.provider.domain.accounts import DeploymentAccess
        from ember.runtime.gateway.directory import Replica

        record = DeploymentRecord(name=name, base_model=BASE, traffic_weight=weight)
        return Deployment(DeploymentAccess(name, "acme", BASE, False), frozenset(),
                          tuple(Replica(f"http://{name}/{i}") for i in range(replicas)), record)

    from ember.runtime.gateway.directory import Directory

    directory = Directory({BLUE: deployment(BLUE, 75, 1), GREEN: deployment(GREEN, 25, 1)})
    firsts = Counter(route(directory, "acme", BASE, draw=i / 100).deployments[0].name for i in range(100))
    assert firsts == {BLUE: 75, GREEN: 25}
    asleep = Directory({BLUE: deployment(BLUE, 75, 0), GREEN: deployment(GREEN, 25, 1)})
    assert {route(asleep, "acme", BASE, draw=i / 10).deployments[0].name for i in range(10)} == {GREEN}


def test_the_autoscaler_moves_after_its_windows_and_reaches_zero_only_when_idle():
    record = DeploymentRecord(name=IDLE, base_model=BASE, **TO_ZERO)
    deployment = Deployment(None, frozenset(), (), record)
    plan = Plan(running=1, last_request=0.0)
    assert plan.decide(deployment, 9, 0.0) is None  # 9 in flight wants 3, capped at max 2: after the up window
    assert plan.decide(deployment, 9, 4.0) is None
    assert plan.decide(deployment, 9, 5.0) == 2
    plan.running = 2
    assert plan.decide(deployment, 1, 6.0) is None  # wants 1: after the down window of low load
    assert plan.decide(deployment, 6, 10.0) is None  # load back: the down window starts again
    assert plan.decide(deployment, 1, 11.0) is None and plan.decide(deployment, 1, 30.0) is None
    assert plan.decide(deployment, 1, 31.0) == 1
    plan.running = 1
    assert plan.decide(deployment, 0, 40.0) is None  # idle since the request seen at 31 s: zero at 61 s
    assert plan.decide(deployment, 0, 61.0) == 0
    plan.running = 0
    assert plan.decide(deployment, 0, 70.0) is None and plan.decide(deployment, 1, 71.0) == 1  # a held request wakes
    floor = DeploymentRecord(name=IDLE, base_model=BASE, min_replicas=1, max_replicas=2)
    kept = Plan(running=1, last_request=0.0)
    assert kept.decide(Deployment(None, frozenset(), (), floor), 0, 1e6) is None  # min 1 never reaches zero
    assert Plan(running=1, last_request=0.0).decide(deployment, 9, 100.0, follows_load=False) is None  # HPA's part
    # another gateway pod sent it a request 3 s ago (its replica's registration says so): not idle
    assert Plan(running=1, last_request=0.0).decide(deployment, 0, 100.0, idle_elsewhere_s=3.0) is None
    assert Plan(running=1, last_request=0.0).decide(deployment, 0, 100.0, idle_elsewhere_s=30.0) == 0
    # A floor raised from zero: on Kubernetes the gateway starts one (an `up` sets no count an autoscaler owns);
    # locally `up` starts the floor itself, and the autoscaler never restarts a replica that died
    raised = Deployment(None, frozenset(), (), DeploymentRecord(name=IDLE, base_model=BASE, min_replicas=1,
                                                                max_replicas=2))
    assert Plan(running=0, last_request=0.0).decide(raised, 0, 100.0, follows_load=False) == 1
    assert Plan(running=0, last_request=0.0).decide(raised, 0, 100.0) is None
    busy = Deployment(None, frozenset(), (), DeploymentRecord(name=IDLE, base_model=BASE, **TO_ZERO))
    assert Plan(running=1, last_request=0.0).decide(busy, 0, 100.0, idle_elsewhere_s=0.0) is None  # a long stream


class StandInScaler:
    """A cluster whose replicas are stand-ins: a start registers one after `start_s`."""

    follows_load = True

    def __init__(self, store: FakeStore, start_s: float = 0.5, starts: bool = True):
        self.store, self.start_s, self.starts = store, start_s, starts
        self.replicas: list[StandIn] = []
        self.resizes: list[int] = []

    def handles(self, deployment) -> bool:
        return deployment.name == IDLE

    def running(self, deployment) -> int:
        return len(self.replicas)

    def resize(self, deployment, count: int) -> int:
        self.resizes.append(count)
        while len(self.replicas) < count:
            replica = StandIn(["ok"])
            self.replicas.append(replica)
            if self.starts:
                threading.Timer(self.start_s, self._ready, (replica,)).start()
        while len(self.replicas) > count:
            replica = self.replicas.pop()
            self.store.register(IDLE, replica, state="draining")
            replica.stop()
        return len(self.replicas)

    def _ready(self, replica: StandIn) -> None:
        replica.start()
        self.store.register(IDLE, replica)


def test_a_deployment_at_zero_is_woken_by_a_request_that_waits_for_it_and_goes_back_when_idle(store):
    store.deployment(IDLE, BASE, **(TO_ZERO | {"autoscaling": AutoscalingPolicy(scale_to_zero_window_s=5)}))
    scaler = StandInScaler(store)
    front = start_gateway(store, scalers=(scaler,))

    began = time.monotonic()
    answers = asyncio.run(concurrent_completions(front, BASE, 8))
    assert [a.status_code for a in answers] == [200] * 8 and time.monotonic() - began >= 0.5
    assert scaler.resizes == [1]  # one start for the eight held requests
    assert 'ember_gateway_scaled_total{deployment="accounts/acme/deployments/idle",direction="up"} 1.0' in \
        httpx.get(f"{front.url}/metrics", headers=front.headers("platform")).text
    deadline = time.monotonic() + 15  # idle for its window: back to zero
    while scaler.replicas and time.monotonic() < deadline:
        time.sleep(0.2)
    assert scaler.resizes == [1, 0]
    time.sleep(0.3)
    assert complete(front).status_code == 200 and scaler.resizes == [1, 0, 1]  # and woken again
    # each change applied is in the audit log, by the gateway's autoscaler
    records = AuditLog(store.url).read()
    assert [(r.account, r.actor, r.action, r.target, r.result, r.detail) for r in records] == [
        ("acme", "autoscaler:accounts/platform/gateways/front", "deployment.scaled", IDLE, "ok", f"{a} -> {b} replicas")
        for a, b in ((0, 1), (1, 0), (0, 1))]


def test_held_requests_are_bounded_in_number_and_time(store):
    store.deployment(IDLE, BASE, **TO_ZERO)
    front = start_gateway(store, scalers=(StandInScaler(store, starts=False),), cold_start_timeout_s=1.0,
                          max_held_requests=2)

    began = time.monotonic()
    answers = asyncio.run(concurrent_completions(front, BASE, 3))
    assert time.monotonic() - began < 5
    codes = sorted(a.json()["error"]["code"] for a in answers)
    assert codes == ["cold_start_queue_full", "cold_start_timeout", "cold_start_timeout"]
    assert all(a.status_code == 503 and a.headers["retry-after"] == "5" for a in answers)


class RefusingScaler(StandInScaler):
    def resize(self, deployment, count: int) -> int:
        raise RuntimeError("the API server said 403 Forbidden for accounts/acme/deployments/idle")


def test_a_cluster_that_refuses_to_start_a_replica_is_a_503_that_names_no_cause(store):
    store.deployment(IDLE, BASE, **TO_ZERO)
    front = start_gateway(store, scalers=(RefusingScaler(store),))
    answer = complete(front)
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "cold_start_failed"
    assert answer.headers["retry-after"] == "5" and "403" not in answer.text  # the cause is the operator's, in the log
    records = AuditLog(store.url).read(account="acme")  # the failure's class, not its words
    assert records and {(r.action, r.target, r.result, r.detail) for r in records} == {
        ("deployment.scaled", IDLE, "RuntimeError", "0 -> 1 replicas")}


def test_a_replica_another_gateway_started_is_activity_and_not_taken_back():
    """Two gateway pods: one wakes a deployment for its held requests; the other, which saw none, must not scale it
    straight back to zero on its next tick."""
    from ember.provider.domain.accounts import DeploymentAccess

    record = DeploymentRecord(name=IDLE, base_model=BASE, **TO_ZERO)
    deployment = Deployment(DeploymentAccess(IDLE, "acme", BASE, False), frozenset(), (), record)

    class Counted:
        follows_load = True
        count, resizes = 0, []

        def handles(self, d):
            return True

        def running(self, d):
            return self.count

        def resize(self, d, count):
            self.resizes.append(count)
            return count

    scaler = Counted()
    autoscaler = Autoscaler([scaler], load=lambda d: 0)
    autoscaler.plans[IDLE] = Plan(running=0, last_request=time.monotonic() - 3600)  # long idle, as it saw it
    scaler.count = 1  # the other pod started one
    asyncio.run(autoscaler.tick([deployment]))
    assert scaler.resizes == [] and autoscaler.plans[IDLE].running == 1


def test_a_dedicated_deployment_at_zero_is_woken_while_the_shared_one_answers(store):
    catalog, shared = "accounts/platform/models/llama-v3p1-8b-instruct", "accounts/platform/deployments/shared"
    own = StandIn(["ok"]).start()
    store.deployment(shared, catalog, serverless=True)
    store.register(shared, own)
    store.deployment(IDLE, catalog, **TO_ZERO)
    scaler = StandInScaler(store)
    front = start_gateway(store, scalers=(scaler,))
    first = complete(front, catalog)
    assert first.status_code == 200 and first.headers["x-ember-deployment"] == shared  # not held: answered at once
    deadline = time.monotonic() + 10
    while complete(front, catalog).headers["x-ember-deployment"] != IDLE:  # its own, once it is ready
        assert time.monotonic() < deadline, "the caller's own deployment was not woken"
        time.sleep(0.1)
    assert scaler.resizes == [1]


class GoneMidRequest:
    """A replica drained under a request: it takes the connection, then closes it without a response."""

    def __init__(self, after_s: float):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._serve, args=(after_s,), daemon=True).start()

    def _serve(self, after_s: float) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Timer(after_s, connection.close).start()


def test_a_request_whose_replica_went_is_sent_to_one_registered_since_it_came(store):
    """A replacement: the new replica registers while a request is on the old one, which then goes. The request is
    sent to the new one (read from the store after the old one failed), not answered 503."""
    prod = "accounts/acme/deployments/prod"
    old, new = GoneMidRequest(after_s=0.6), StandIn(["ok"]).start()
    store.deployment(prod, BASE)
    store.register(prod, old.url)
    front = start_gateway(store)  # reads the store every 0.1 s
    threading.Timer(0.3, store.register, (prod, new)).start()
    answer = complete(front)
    assert answer.status_code == 200 and answer.headers["x-ember-attempts"] == "2" and len(new.seen) == 1
    old.listener.close()
