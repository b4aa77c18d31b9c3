"""Bills from usage records: per-token charges for serverless traffic, GPU-second charges for dedicated deployments,
per-training-token charges for fine-tuning.

Serverless requests are billed to the account that sent them, per token (prompt + completion), at the
price tier of their base model's size (serverless serves catalog models only, so the size is the
catalog's). Dedicated deployments are billed to the account that owns them, per accelerator-second their
replicas held (a replica record says from when to when, on what), whatever their traffic. Periods are
UTC months, days or hours; a replica's time is split across the periods it spans. A fine-tuning run is
billed to its account per token trained on (every epoch), at the tier of its base model's size. Serverless tokens
served on or after the shutdown date of their deployment's model (its record in the store) are charged nothing: such
requests are refused (410), and the few a replica served before it read the date are the platform's, not the caller's;
the report says how many there were.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ember.provider.domain import catalog
from ember.provider.domain.names import parse_deployment_name, parse_model_name
from ember.provider.domain.spec import AcceleratorType, FieldError, parse

PERIODS = ("month", "day", "hour")
TOKENS, ACCELERATOR_SECONDS, TRAINING = "serverless-tokens", "dedicated-accelerator-seconds", "fine-tuning-tokens"


class BillingError(ValueError):
    pass


class PriceTier(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    up_to_billion_params: float | None = Field(description="the tier covers base models up to this size; null: any size")
    usd_per_million_tokens: float = Field(ge=0)


class PriceTable(BaseModel):
    """What Ember charges: users may give their own (`ember usage --prices FILE`, JSON of this shape)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    currency: str = "USD"
    serverless_tiers: tuple[PriceTier, ...] = Field(min_length=1)
    usd_per_accelerator_hour: dict[AcceleratorType, float]
    fine_tuning_tiers: tuple[PriceTier, ...] = Field(
        (PriceTier(up_to_billion_params=16, usd_per_million_tokens=0.50),
         PriceTier(up_to_billion_params=80, usd_per_million_tokens=3.00),
         PriceTier(up_to_billion_params=None, usd_per_million_tokens=6.00)), min_length=1,
        description="per million tokens trained on, by base model size")

    @model_validator(mode="after")
    def _tiers_cover_every_size(self) -> "PriceTable":
        for field in ("serverless_tiers", "fine_tuning_tiers"):
            bounds = [t.up_to_billion_params for t in getattr(self, field)]
            for i, bound in enumerate(bounds[:-1]):
                following = bounds[i + 1]
                if bound is None or (following is not None and bound >= following):
                    raise FieldError(f"{field}.{i}.up_to_billion_params",
                                     f"{bound!r}: tiers must grow in size, with only the last one null")
            if bounds[-1] is not None:
                raise FieldError(f"{field}.{len(bounds) - 1}.up_to_billion_params",
                                 f"{bounds[-1]!r}: the last tier must be null, so that every model size has a price")
        missing = [a.value for a in AcceleratorType if a not in self.usd_per_accelerator_hour]
        if missing:
            raise FieldError("usd_per_accelerator_hour", f"has no price for {', '.join(missing)}")
        for accelerator, price in self.usd_per_accelerator_hour.items():
            if price < 0:
                raise FieldError(f"usd_per_accelerator_hour.{accelerator.value}", f"{price!r} is negative")
        return self

    def per_million_tokens(self, parameter_count: int, tiers: str = "serverless_tiers") -> float:
        billions = parameter_count / 1e9
        return next(t.usd_per_million_tokens for t in getattr(self, tiers)
                    if t.up_to_billion_params is None or billions <= t.up_to_billion_params)


DEFAULT_PRICES = PriceTable(
    serverless_tiers=(PriceTier(up_to_billion_params=4, usd_per_million_tokens=0.10),
                      PriceTier(up_to_billion_params=16, usd_per_million_tokens=0.20),
                      PriceTier(up_to_billion_params=80, usd_per_million_tokens=0.90),
                      PriceTier(up_to_billion_params=None, usd_per_million_tokens=3.00)),
    usd_per_accelerator_hour={AcceleratorType.CPU: 0.0, AcceleratorType.NVIDIA_A100_80GB: 2.90,
                              AcceleratorType.NVIDIA_H100_80GB: 4.00, AcceleratorType.NVIDIA_H200_141GB: 5.00,
                              AcceleratorType.AMD_MI300X_192GB: 4.50},
)


def load_prices(path: Path | None) -> PriceTable:
    if path is None:
        return DEFAULT_PRICES
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise BillingError(f"--prices: {path}: {exc}") from None
    return parse(PriceTable, data)


@dataclass(frozen=True)
class Charge:
    account_id: str
    period: str  # "2026-11", "2026-11-25" or "2026-11-25T10" (UTC)
    kind: str  # serverless-tokens | dedicated-accelerator-seconds | fine-tuning-tokens
    item: str  # the model (serverless), the deployment (dedicated) or the job (fine-tuning)
    detail: str  # the price tier's base model, or the accelerator type
    quantity: float  # tokens (served or trained on), or accelerator-seconds
    unit_price: float  # per million tokens, or per accelerator-hour
    amount: float

    def as_dict(self) -> dict:
        return asdict(self)


def period_of(t: float, period: str) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime({"month": "%Y-%m", "day": "%Y-%m-%d", "hour": "%Y-%m-%dT%H"}[period])


def _next_boundary(t: float, period: str) -> float:
    start = datetime.fromtimestamp(t, timezone.utc)
    if period == "hour":
        nxt = start.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    elif period == "day":
        nxt = start.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    else:
        first = start.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        nxt = (first + timedelta(days=32)).replace(day=1)
    return nxt.timestamp()


def split_interval(start: float, end: float, period: str) -> Iterable[tuple[str, float]]:
    """(period, seconds) for each period the interval [start, end) overlaps."""
    t = start
    while t < end:
        boundary = min(_next_boundary(t, period), end)
        yield period_of(t, period), boundary - t
        t = boundary


def _serverless_size(base_model: str) -> int:
    entry = catalog.lookup(parse_model_name(base_model).resource_id)
    if entry is None:
        raise BillingError(f"base_model: {base_model!r} is served serverless but is not a catalog model")
    return entry.parameter_count


@dataclass(frozen=True)
class Uncharged:
    """Serverless tokens one account was served on or after its model's shutdown date, which are not charged."""

    account_id: str
    base_model: str
    shutdown_date: date
    requests: int
    tokens: int

    def note(self) -> str:
        model = parse_model_name(self.base_model).resource_id
        return (f"{self.account_id}: {model} was shut down for serverless use on {self.shutdown_date.isoformat()}; "
                f"{self.tokens:,} tokens in {self.requests} request{'s' * (self.requests != 1)} on or after that day are "
                f"not charged")


def _serverless(records: list[dict], replicas: list[dict],
                shutdowns: Mapping[str, date]) -> Iterable[tuple[dict, dict, date | None]]:
    """(record, its replica, the shutdown date it came on or after, or None) of each serverless request record."""
    by_replica = {r["replica"]: r for r in replicas}
    for record in records:
        replica = by_replica.get(record["replica"], {})
        if replica.get("deployment_type") != "serverless":
            continue  # dedicated traffic is paid for by the accelerator-second
        shutdown = shutdowns.get(replica["deployment"])
        after = shutdown is not None and record["time"] >= datetime.combine(shutdown, datetime.min.time(),
                                                                             timezone.utc).timestamp()
        yield record, replica, shutdown if after else None


def uncharged(records: list[dict], replicas: list[dict], shutdowns: Mapping[str, date]) -> list[Uncharged]:
    """What `bill` leaves uncharged for a shutdown, per account and model (`shutdowns`: serverless deployment →
    its shutdown date, from the store's deployment records)."""
    counts: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    for record, replica, shutdown in _serverless(records, replicas, shutdowns):
        if shutdown is not None:
            count = counts[(record["account_id"], replica["base_model"], shutdown)]
            count[0] += 1
            count[1] += record["prompt_tokens"] + record["completion_tokens"]
    return [Uncharged(*key, *count) for key, count in sorted(counts.items())]


def bill(records: list[dict], replicas: list[dict], prices: PriceTable = DEFAULT_PRICES,
         period: str = "month", training: list[dict] = (), shutdowns: Mapping[str, date] | None = None) -> list[Charge]:
    """Charges per account, period and item, from request, replica and fine-tuning records. `shutdowns`: serverless
    deployment → its model's shutdown date; its tokens from that day (UTC) on are not charged (see `uncharged`)."""
    if period not in PERIODS:
        raise BillingError(f"period: {period!r} is not one of {', '.join(PERIODS)}")
    quantities: dict[tuple, float] = defaultdict(float)
    for record, replica, shutdown in _serverless(records, replicas, shutdowns or {}):
        if shutdown is not None:
            continue
        base = replica["base_model"]
        key = (record["account_id"], period_of(record["time"], period), TOKENS, record["model"], base,
               prices.per_million_tokens(_serverless_size(base)))
        quantities[key] += record["prompt_tokens"] + record["completion_tokens"]
    for replica in replicas:
        if replica.get("deployment_type") == "serverless":
            continue  # the platform's cost, recovered per token
        accelerator = replica["accelerator_type"]
        owner = parse_deployment_name(replica["deployment"]).account_id
        price = prices.usd_per_accelerator_hour[AcceleratorType(accelerator)]
        for when, seconds in split_interval(replica["started"], replica["last_seen"], period):
            key = (owner, when, ACCELERATOR_SECONDS, replica["deployment"], accelerator, price)
            quantities[key] += seconds * replica["accelerator_count"]
    for run in training:
        price = prices.per_million_tokens(run["parameter_count"], "fine_tuning_tiers")
        key = (run["account_id"], period_of(run["time"], period), TRAINING, run["job"], run["base_model"], price)
        quantities[key] += run["trained_tokens"]
    charges = []
    for (account, when, kind, item, detail, price), quantity in sorted(quantities.items()):
        amount = quantity / 3600 * price if kind == ACCELERATOR_SECONDS else quantity / 1e6 * price
        charges.append(Charge(account, when, kind, item, detail, round(quantity, 3), price, round(amount, 10)))
    return charges


def totals(charges: list[Charge]) -> dict[tuple[str, str], float]:
    """Amount per (account, period)."""
    out: dict[tuple[str, str], float] = defaultdict(float)
    for charge in charges:
        out[(charge.account_id, charge.period)] += charge.amount
    return {k: round(v, 10) for k, v in sorted(out.items())}


def plot(charges: list[Charge], path: Path, currency: str = "USD") -> Path:
    """Usage over time per account: serverless tokens and dedicated accelerator-hours, and what they cost."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers or in CI
    import matplotlib.pyplot as plt

    periods = sorted({c.period for c in charges})
    accounts = sorted({c.account_id for c in charges})
    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    panels = [(TOKENS, lambda c: c.quantity / 1e6, "serverless tokens (millions)"),
              (ACCELERATOR_SECONDS, lambda c: c.quantity / 3600, "dedicated accelerator-hours"),
              (None, lambda c: c.amount, f"charges ({currency})")]
    for ax, (kind, value, label) in zip(axes, panels):
        bottom = [0.0] * len(periods)
        for account in accounts:
            heights = [sum(value(c) for c in charges if c.account_id == account and c.period == p
                           and (kind is None or c.kind == kind)) for p in periods]
            ax.bar(periods, heights, bottom=bottom, label=account)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(title="account", loc="upper left")
    axes[-1].set_xlabel("period (UTC)")
    plt.setp(axes[-1].get_xticklabels(), rotation=30, ha="right")
    fig.suptitle("Ember usage by account")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
