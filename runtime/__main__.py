"""`python -m ember.runtime serve …` (also `ember serve`): run one deployment's replica; `finetune`: train a LoRA."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ember.provider.domain.names import parse_deployment_name, parse_model_name
from ember.runtime.serving.limits import Limits


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ember.runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="serve a deployment over the OpenAI API")
    add_serve_arguments(p)
    p = sub.add_parser("add-key", help="create an API key for an account; stores only its hash")
    p.add_argument("--keys", required=True, help="keys file (path or fsspec URL)")
    p.add_argument("--account", required=True)
    p = sub.add_parser("finetune", help="train a LoRA adapter: a fine-tuning job's JSON in, a PEFT adapter out")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--job", type=Path, help="the job (a JSON file): base model, datasets, hyperparameters")
    group.add_argument("--job-json", help="the job as a JSON string (how a Kubernetes Job passes it)")
    p.add_argument("--result", type=Path, help="where the losses and token counts go (JSON)")
    p.add_argument("--upload", help="a store URL: the adapter goes to URL/adapter/, the metrics to URL/result.json")
    return parser


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", required=True, help="the base model's Hugging Face directory")
    p.add_argument("--deployment", required=True, help="accounts/<account>/deployments/<id>")
    p.add_argument("--base-model", required=True, help="accounts/<account>/models/<id>: the name clients use")
    p.add_argument("--serverless", action="store_true", help="serve every account (addons only to their owners)")
    p.add_argument("--keys", required=True, help="API keys file (hashes), path or fsspec URL")
    p.add_argument("--usage", required=True, help="the usage folder (path or fsspec URL; the store's usage/): this "
                                                  "deployment's records go in <usage>/<deployment>/")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--addon", action="append", default=[], metavar="NAME=SOURCE", help="serve this addon from the start")
    p.add_argument("--desired-addons", help="JSON {name: source} in the store, reconciled on a timer and on demand")
    p.add_argument("--store", help="the model store's root (path or fsspec URL): the admin API loads addons by their "
                                   "model name from its manifests")
    p.add_argument("--reconcile-interval", type=float, default=30.0)
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond this get 429")
    p.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes,
                   help="a request body larger than this gets 413 (default %(default)s)")
    p.add_argument("--header-timeout", type=float, default=Limits.header_timeout_s, metavar="SECONDS",
                   help="a request head not whole within this closes its connection (default %(default)s)")
    p.add_argument("--body-timeout", type=float, default=Limits.body_timeout_s, metavar="SECONDS",
                   help="a request body not whole within this after its head gets 408 (default %(default)s)")
    p.add_argument("--max-connections", type=int, default=Limits.max_connections,
                   help="requests on connections beyond this many open ones get 503 (default %(default)s)")
    p.add_argument("--max-loras", type=int, default=8)
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="compute every prompt in full (prefix caching reuses the K/V of shared prompt prefixes)")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--kv-cache-tokens", type=int)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "int8", "int4", "fp8"])
    p.add_argument("--accelerator-type", default="CPU")
    p.add_argument("--accelerator-count", type=int, default=1)
    p.add_argument("--request-log", help="opt-in: log prompts and outputs to this file")
    p.add_argument("--retention-days", type=int, help="how long the request log keeps entries (1-365)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=os.environ.get("EMBER_COMPILE") != "0",
                   help="decode steps through torch.compile, compiled before the replica is ready and cached under "
                        "EMBER_CACHE_DIR (default on; EMBER_COMPILE=0 turns it off): --no-compile runs eagerly")


def serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from ember.provider.domain.accounts import DeploymentAccess
    from ember.runtime.engine.engine import EngineConfig
    from ember.runtime.fetch import cache_folder
    from ember.runtime.serving.app import create_app
    from ember.runtime.serving.connections import connection_protocol
    from ember.runtime.serving.replica import ServerConfig

    deployment = parse_deployment_name(args.deployment)
    parse_model_name(args.base_model)
    if args.request_log and not args.retention_days:
        print("--request-log needs --retention-days", file=sys.stderr)
        return 2
    addons = {}
    for item in args.addon:
        name, sep, source = item.partition("=")
        if not sep:
            print(f"--addon {item!r}: use NAME=SOURCE", file=sys.stderr)
            return 2
        addons[str(parse_model_name(name))] = source
    if args.threads:
        torch.set_num_threads(args.threads)
    # The engine thread lets go of the GIL around each torch op and takes it back after; behind a thread busy in
    # Python (validating a big request body, building a grammar) each take-back waits out a whole switch interval,
    # 5 ms by default, and a step of a hundred ops stalls every stream for half a second. At 0.5 ms it stays
    # tens of milliseconds (tests/test_hardening_grammar.py measures it).
    sys.setswitchinterval(0.0005)
    config = ServerConfig(
        model_dir=args.model_dir,
        deployment=DeploymentAccess(args.deployment, deployment.account_id, args.base_model, args.serverless),
        keys_url=args.keys,
        usage_url=args.usage,
        engine=EngineConfig(device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
                            kv_cache_tokens=args.kv_cache_tokens, max_num_seqs=args.max_num_seqs,
                            max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                            prefix_caching=args.prefix_caching, compile=args.compile,
                            compile_cache=cache_folder() / "compile"),
        max_queue=args.max_queue,
        limits=Limits(max_body_bytes=args.max_body_bytes, header_timeout_s=args.header_timeout,
                      body_timeout_s=args.body_timeout, max_connections=args.max_connections),
        addons=addons,
        desired_addons_url=args.desired_addons,
        store_url=args.store,
        reconcile_interval_s=args.reconcile_interval,
        request_log_url=args.request_log,
        retention_days=args.retention_days,
        accelerator_type=args.accelerator_type,
        accelerator_count=args.accelerator_count,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="info",
                http=connection_protocol(config.limits))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "add-key":
        from ember.provider.domain.accounts import Accounts

        print(Accounts.add_key(args.keys, args.account))
        return 0
    if args.command == "finetune":
        import json

        from ember.runtime.training.trainer import run

        return run(json.loads(args.job_json) if args.job_json else json.loads(args.job.read_text()), args.result,
                   args.upload)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
