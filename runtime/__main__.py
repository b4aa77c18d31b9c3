"""`python -m ember.runtime serve …` (also `ember serve`): run one deployment's replica; `finetune`: train a LoRA."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from datetime import datetime
from pathlib import Path

from ember.provider.domain.accounts import IMPLICIT_KEY_ID, ROLES
from ember.provider.domain.replica_spec import ReplicaSpec, read_replica_spec
from ember.provider.domain.spec import Precision, SpecError, parse
from ember.runtime.gateway.config import GatewayConfig
from ember.runtime.serving.limits import Limits


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ember.runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="serve a deployment over the OpenAI API")
    add_serve_arguments(p)
    p = sub.add_parser("gateway", help="the store's gateway: one endpoint routing by model name to its deployments")
    add_gateway_arguments(p)
    p = sub.add_parser("add-key", help="create an API key for an account; stores only its hash")
    p.add_argument("--keys", required=True, help="keys file (path or fsspec URL)")
    p.add_argument("--account", required=True)
    p.add_argument("--key-id", default=IMPLICIT_KEY_ID, help="its name's last part (accounts/<a>/apiKeys/<id>)")
    p.add_argument("--role", choices=ROLES, default="admin")
    p.add_argument("--expires-at", type=datetime.fromisoformat, help="ISO 8601 with a UTC offset")
    p = sub.add_parser("finetune", help="train a LoRA adapter: a fine-tuning job's JSON in, a PEFT adapter out")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--job", type=Path, help="the job (a JSON file): base model, datasets, hyperparameters")
    group.add_argument("--job-json", help="the job as a JSON string (how a Kubernetes Job passes it)")
    p.add_argument("--result", type=Path, help="where the losses and token counts go (JSON)")
    p.add_argument("--upload", help="a store URL: the adapter goes to URL/adapter/, the metrics to URL/result.json")
    return parser


def _default(field: str) -> str:
    """A ReplicaSpec field's default, for a flag's help: the flags leave it unset, so the spec's own applies."""
    default = ReplicaSpec.model_fields[field].get_default(call_default_factory=True)
    return f"(default {getattr(default, 'value', default)})"


# The hand flags, each setting one ReplicaSpec field (its dest): the spec's field → the flag that sets it.
SPEC_FLAGS = {"model": "--model-dir", "deployment": "--deployment", "base_model": "--base-model",
              "serverless": "--serverless", "addons": "--addon", "keys": "--keys", "usage": "--usage",
              "store": "--store", "desired_addons": "--desired-addons", "precision": "--precision",
              "max_loras": "--max-loras", "max_lora_rank": "--max-lora-rank", "accelerator_type": "--accelerator-type",
              "accelerator_count": "--accelerator-count", "request_log": "--request-log",
              "retention_days": "--retention-days", "max_queue": "--max-queue", "prefix_caching": "--no-prefix-caching",
              "max_model_len": "--max-model-len", "kv_cache_tokens": "--kv-cache-tokens",
              "max_num_seqs": "--max-num-seqs", "device": "--device"}


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replica-spec", metavar="FILE|URL",
                   help="the replica's spec, a JSON ReplicaSpec (a path or fsspec URL; what the provider writes), "
                        "instead of the flags below")
    spec = p.add_argument_group("the replica spec by hand", "each sets one field of the spec; not with --replica-spec")
    _add_spec_flags(spec.add_argument)
    process = p.add_argument_group("this process")
    process.add_argument("--host", default="127.0.0.1")
    process.add_argument("--port", type=int, default=8000)
    process.add_argument("--advertise-url", metavar="URL",
                         help="where the gateway reaches this replica, which registers in the store's replicas/ "
                              "(default: http://HOST:PORT when --host is an address; a Kubernetes pod is given its IP)")
    process.add_argument("--reconcile-interval", type=float, metavar="SECONDS",
                         help="how often the desired addon set is re-read (default: ServerConfig's)")
    process.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes,
                         help="a request body larger than this gets 413 (default %(default)s)")
    process.add_argument("--header-timeout", type=float, default=Limits.header_timeout_s, metavar="SECONDS",
                         help="a request head not whole within this closes its connection (default %(default)s)")
    process.add_argument("--body-timeout", type=float, default=Limits.body_timeout_s, metavar="SECONDS",
                         help="a request body not whole within this after its head gets 408 (default %(default)s)")
    process.add_argument("--max-connections", type=int, default=Limits.max_connections,
                         help="requests on connections beyond this many open ones get 503 (default %(default)s)")
    process.add_argument("--threads", type=int, help="torch CPU threads")
    process.add_argument("--compile", action=argparse.BooleanOptionalAction,
                         default=os.environ.get("EMBER_COMPILE") != "0",
                         help="decode steps through torch.compile, compiled before the replica is ready and cached "
                              "under EMBER_CACHE_DIR (default on; EMBER_COMPILE=0 turns it off): --no-compile runs "
                              "eagerly")


def add_gateway_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, metavar="URL", help="the model store (a path or fsspec URL)")
    p.add_argument("--gateway", metavar="NAME", help="accounts/<a>/gateways/<id>: the Gateway whose settings (rate "
                                                     "limits, retries) it reads from the store; default: the store's "
                                                     "one gateway, or the spec's defaults when it has none")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--refresh-interval", type=float, default=GatewayConfig.refresh_interval_s, metavar="SECONDS",
                   help="how often the store is read again (default %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes,
                   help="a request body larger than this gets 413 (default %(default)s)")
    p.add_argument("--max-connections", type=int, default=Limits.max_connections,
                   help="requests on connections beyond this many open ones get 503 (default %(default)s)")
    p.add_argument("--state-dir", metavar="DIR",
                   help="the local cluster's state directory (the provider's): the gateway then scales its "
                        "deployments' replicas with their load, to zero and back")


def _add_spec_flags(add) -> None:
    """Every one defaults to None (not given): the ReplicaSpec's own default applies, named there once."""
    add("--model-dir", dest="model", metavar="DIR|URL",
        help="the base model's Hugging Face directory (a path or store URL)")
    add("--deployment", help="accounts/<account>/deployments/<id>")
    add("--base-model", help="accounts/<account>/models/<id>: the name clients use")
    add("--serverless", action="store_true", default=None, help="serve every account (addons only to their owners)")
    add("--keys", help="API keys file (hashes), path or fsspec URL")
    add("--usage", help="the usage folder (path or fsspec URL; the store's usage/): this deployment's records go in "
                        "<usage>/<deployment>/")
    add("--addon", dest="addons", action="append", metavar="NAME=SOURCE", help="serve this addon from the start")
    add("--desired-addons", help="JSON {name: source} in the store, reconciled on a timer and on demand")
    add("--store", help="the model store's root (path or fsspec URL): the admin API loads addons by their model name "
                        "from its manifests")
    add("--max-queue", type=int, help=f"waiting requests beyond this get 429 {_default('max_queue')}")
    add("--max-loras", type=int, help=f"LoRA slots on the device; 0 serves the base only {_default('max_loras')}")
    add("--max-lora-rank", type=int, help=_default("max_lora_rank"))
    add("--no-prefix-caching", dest="prefix_caching", action="store_false", default=None,
        help="compute every prompt in full (prefix caching reuses the K/V of shared prompt prefixes)")
    add("--max-model-len", type=int)
    add("--kv-cache-tokens", type=int)
    add("--max-num-seqs", type=int)
    add("--device", help=_default("device"))
    add("--precision", "--dtype", dest="precision", choices=[p.value for p in Precision],
        help="default fp32 on CPU, bf16 on CUDA (--dtype: its former name)")
    add("--accelerator-type", help=_default("accelerator_type"))
    add("--accelerator-count", "--tensor-parallel-size", dest="accelerator_count", type=int,
        help=f"accelerators the model is split across, one rank (process) each: tensor parallelism; on the CPU, "
             f"ranks share the cores {_default('accelerator_count')}")
    add("--request-log", help="opt-in: log prompts and outputs to this file")
    add("--retention-days", type=int, help="how long the request log keeps entries (1-365)")


class UsageError(ValueError):
    """A replica spec that cannot be served, said as the person who gave it would recognise it."""


def replica_spec_of(args: argparse.Namespace) -> ReplicaSpec:
    """The ReplicaSpec that `serve`'s arguments give: the file's, or the one the hand flags build."""
    given = [SPEC_FLAGS[field] for field in SPEC_FLAGS if getattr(args, field) is not None]
    if args.replica_spec:
        if given:
            raise UsageError(f"{given[0]}: not with --replica-spec, whose spec sets it")
        try:
            return read_replica_spec(args.replica_spec)
        except SpecError as exc:
            raise UsageError("\n".join(f"--replica-spec {args.replica_spec}: {field or '(spec)'}: {message}"
                                        for field, message in exc.errors)) from None
        except OSError as exc:
            raise UsageError(f"--replica-spec {args.replica_spec}: cannot be read: {exc}") from None
    try:
        return parse(ReplicaSpec, _fields_of_flags(args))
    except SpecError as exc:
        raise UsageError("\n".join(f"{_flag_of(field)}: {message}" for field, message in exc.errors)) from None


def _fields_of_flags(args: argparse.Namespace) -> dict:
    fields = {field: getattr(args, field) for field in SPEC_FLAGS if getattr(args, field) is not None}
    if args.request_log and not args.retention_days:
        raise UsageError("--request-log needs --retention-days")
    retention = fields.pop("retention_days", None)  # without --request-log, nothing is logged: it keeps nothing
    if args.request_log:
        fields["request_log"] = {"url": args.request_log, "retention_days": retention}
    addons = {}
    for item in fields.pop("addons", []):
        name, sep, source = item.partition("=")
        if not sep:
            raise UsageError(f"--addon {item!r}: use NAME=SOURCE")
        addons[name] = source
    return fields | ({"addons": addons} if addons else {})


def _flag_of(field: str) -> str:
    top, _, rest = field.partition(".")
    if top == "request_log" and rest.startswith("retention_days"):
        return SPEC_FLAGS["retention_days"]
    return SPEC_FLAGS.get(top, field)


def serve(args: argparse.Namespace) -> int:
    try:
        spec = replica_spec_of(args)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    import torch

    from ember.runtime.fetch import cache_folder
    from ember.runtime.serving.app import create_app
    from ember.runtime.serving.connections import run_server
    from ember.runtime.serving.registration import advertised_url
    from ember.runtime.serving.replica_config import ProcessOptions, server_config

    if args.threads:
        torch.set_num_threads(args.threads)
    # The engine thread lets go of the GIL around each torch op and takes it back after; behind a thread busy in
    # Python (validating a big request body, building a grammar) each take-back waits out a whole switch interval,
    # 5 ms by default, and a step of a hundred ops stalls every stream for half a second. At 0.5 ms it stays
    # tens of milliseconds (tests/runtime/test_hardening_grammar.py measures it).
    sys.setswitchinterval(0.0005)
    process = ProcessOptions(
        limits=Limits(max_body_bytes=args.max_body_bytes, header_timeout_s=args.header_timeout,
                      body_timeout_s=args.body_timeout, max_connections=args.max_connections),
        compile=args.compile, compile_cache=cache_folder() / "compile",
        advertise_url=advertised_url(args.host, args.port, args.advertise_url),
        **({"reconcile_interval_s": args.reconcile_interval} if args.reconcile_interval is not None else {}))
    config = server_config(spec, process)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(config)
    run_server(app, args.host, args.port, config.limits, on_stop=app.state.replica.drain)
    return 0


def serve_gateway(args: argparse.Namespace) -> int:
    from ember.runtime.gateway.app import create_gateway_app
    from ember.runtime.serving.connections import run_server

    limits = Limits(max_body_bytes=args.max_body_bytes, max_connections=args.max_connections)
    config = GatewayConfig(store_url=args.store, gateway=args.gateway, limits=limits,
                           refresh_interval_s=args.refresh_interval, state_dir=args.state_dir)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per forwarded request is uvicorn's access log's job
    app = create_gateway_app(config)
    run_server(app, args.host, args.port, limits, counted=app.state.gateway.metrics.open_connections.set)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "gateway":
        return serve_gateway(args)
    if args.command == "add-key":
        from ember.provider.domain.accounts import Accounts

        print(Accounts.add_key(args.keys, args.account, args.key_id, args.role, args.expires_at))
        return 0
    if args.command == "finetune":
        import json

        from ember.runtime.training.trainer import run

        return run(json.loads(args.job_json) if args.job_json else json.loads(args.job.read_text()), args.result,
                   args.upload)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
