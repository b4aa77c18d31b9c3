"""The `ember` command line.

The provider half never imports torch; subcommands about the runtime (the tiny-model kit, later
`serve` and `bench`) import it only when they run, so `ember --help` and `ember schema` stay light.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from ember.provider.domain.names import parse_model_name
from ember.provider.domain.spec import SpecError
from ember.provider.tools import schemas, stackfile

QUICKSTART_STACK = Path("examples/quickstart/stack.json")
DEMO_QUESTION = "What is the capital of France?"


def _schema(args: argparse.Namespace) -> int:
    if args.check:
        stale = schemas.stale(args.check)
        for name in stale:
            print(f"stale: {args.check / name} (run: ember schema --out {args.check})", file=sys.stderr)
        return 1 if stale else 0
    if args.out:
        for path in schemas.write(args.out):
            print(path)
        return 0
    print(json.dumps(schemas.generate(), indent=2, sort_keys=True))
    return 0


def _validate(args: argparse.Namespace) -> int:
    print(stackfile.dump(stackfile.load(args.stack)))
    return 0


def _tiny_model(args: argparse.Namespace) -> int:
    from ember.runtime.devtools import tinymodels

    directory = tinymodels.make_model(
        args.directory, args.preset, seed=args.seed, shards=args.shards, architecture=args.architecture
    )
    print(directory)
    return 0


def _tiny_lora(args: argparse.Namespace) -> int:
    from ember.runtime.devtools import tinymodels

    lora = tinymodels.TinyLoRA(rank=args.rank, alpha=args.alpha, target_modules=tuple(args.targets.split(",")),
                               use_rslora=args.rslora)
    print(tinymodels.make_lora(args.base, args.directory, lora, seed=args.seed))
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    """Bring the quickstart's model and addons into place, then validate and print its stack."""
    from ember.provider.tools import quickstart

    try:
        quickstart.prepare(args.stack.parent / "models", log=lambda line: print(line, file=sys.stderr))
    except quickstart.QuickstartError as exc:
        print(f"ember quickstart: {exc}", file=sys.stderr)
        return 1
    print(stackfile.dump(stackfile.load(args.stack)))
    return 0


def _import_gguf(args: argparse.Namespace) -> int:
    """Convert a GGUF file into a Hugging Face model directory, as an upload does."""
    from ember.provider.domain.gguf_model import convert_gguf
    from ember.provider.domain.model_files import ModelFilesError

    try:
        directory = convert_gguf(args.file, args.directory, lambda line: print(line, file=sys.stderr))
    except ModelFilesError as exc:
        print(f"ember import-gguf: {exc}", file=sys.stderr)
        return 1
    print(directory)
    return 0


def _stack_command(args: argparse.Namespace) -> int:
    """preview | up | refresh | destroy a Pulumi program: the Pulumi CLI when installed, else offline."""
    from ember.provider.providers.base import EmberError, ProviderConfig
    from ember.provider.tools import automation, runner

    program = args.program.resolve()
    if not (program / "Pulumi.yaml").exists():
        print(f"ember: {program} has no Pulumi.yaml", file=sys.stderr)
        return 2
    try:
        packs = [_policy_pack(args.policy_pack)] if getattr(args, "policy_pack", None) else []
        pack_config = getattr(args, "policy_pack_config", None)
        if automation.pulumi_cli_available() and not args.offline:
            outputs = automation.run_with_pulumi(args.command, program, args.stack, policy_packs=packs,
                                                 policy_pack_config=pack_config, refresh=getattr(args, "refresh", False))
            state_dir = ProviderConfig.load(default_root=program).state_dir
            if args.command == "preview":  # the cost change under the engine's steps, against the backend's state
                _print_cost_diff(runner.OfflineRunner(program, args.stack, log=lambda _: None),
                                 automation.stack_resources(program, args.stack))
        else:
            offline = runner.OfflineRunner(program, args.stack)
            state_dir = offline.config.state_dir
            if args.command == "refresh":
                offline.refresh()
                return 0
            if args.command == "destroy":
                offline.destroy()
                print("destroyed: no replica process or store entry of this stack is left. Usage and audit records "
                      f"stay, for billing and audit, and so do the accounts' API keys ({state_dir / 'keys'}) and "
                      f"replica logs ({state_dir / 'logs'}): remove {state_dir} to drop them too")
                return 0
            if args.command == "preview":
                _print_cost_diff(offline)
                outputs = {}
            else:
                outputs = offline.up(refresh=getattr(args, "refresh", False))
            if packs:
                return _report_policies(packs[0], offline.registrations, pack_config, offline.config.store_url)
    except (runner.RunError, EmberError, SpecError, FileNotFoundError) as exc:  # the message names the resource, property and value
        print(f"ember {args.command} failed: {exc}", file=sys.stderr)
        return 1
    except Exception:  # a defect in the program (or in Ember): the whole traceback, not one line
        print(f"ember {args.command} failed:\n{traceback.format_exc()}", file=sys.stderr)
        return 1
    if args.command == "up":
        print("outputs:")
        for key, value in sorted(outputs.items()):
            print(f"  {key}: {json.dumps(value)}")
        endpoint = outputs.get("gateway") or outputs.get("endpoint")
        if not args.no_demo and endpoint and outputs.get("models"):
            try:
                _demo(endpoint, outputs["models"], state_dir)
            except DemoError as exc:
                print(f"ember up: {exc}", file=sys.stderr)
                return 1
    return 0


def _print_cost_diff(offline, state=None) -> None:
    from ember.provider.tools import cost

    before, after = cost.preview_costs(offline, state=state, record_foreign=state is not None)
    print("cost:\n" + "\n".join(f"  {name}: {change}" for name, change in cost.diff(before, after)))


def _policy_pack(path: Path) -> Path:
    """A pack's folder, relative to where `ember` runs; `ember` names the pack installed with Ember."""
    if str(path) == "ember":
        from ember.provider import policy

        return Path(policy.__file__).parent
    if not (path / "PulumiPolicy.yaml").exists():
        raise FileNotFoundError(f"--policy-pack: {path.resolve()} has no PulumiPolicy.yaml (paths are relative to "
                                f"where you run ember; `--policy-pack ember` names Ember's own pack)")
    return path


def _report_policies(pack: Path, registrations, config_path: Path | None, store_url: str | None = None) -> int:
    """The pack's verdict on the previewed stack, as `pulumi preview --policy-pack` prints it; 1 if mandatory ones fail."""
    from ember.provider.policy.check import load_config, run_pack

    violations = run_pack(pack, registrations, load_config(config_path), store_url)
    for violation in violations:
        print(violation)
    mandatory = sum(v.mandatory for v in violations)
    print(f"policy pack {pack}: {len(registrations)} resource{'s' * (len(registrations) != 1)}, {mandatory} mandatory and "
          f"{len(violations) - mandatory} advisory violations")
    return 1 if mandatory else 0


class DemoError(RuntimeError):
    """The stack is up, but a model did not answer the demo's question; the message says which and why."""


def _error_message(exc) -> str:
    try:
        return json.loads(exc.read())["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return exc.reason


def _ask(request, what: str, attempts: int = 3) -> dict:
    """The answer, asked again (as the openai client does) after the Retry-After of a 503 or 429."""
    import urllib.error
    import urllib.request

    while True:
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            attempts -= 1
            wait = exc.headers.get("retry-after", "")
            if exc.code not in (429, 503) or not attempts or not wait.isdigit() or int(wait) > 10:
                raise DemoError(f"{what} failed: HTTP {exc.code}: {_error_message(exc)}") from None
            time.sleep(int(wait))


def _demo(endpoint: str, models: list[str], state_dir: Path) -> None:
    """A chat completion from each model the stack exports, through its gateway (or its deployment's endpoint)."""
    import urllib.request

    print(f"asking each model, through {endpoint}: {DEMO_QUESTION}")
    for model in models:
        # the deployment's account calls it: a model name says which (accounts/<account>/models/<id>)
        key = (state_dir / "keys" / f"{parse_model_name(model).account_id}.key").read_text().strip()
        body = json.dumps({"model": model, "max_tokens": 32, "temperature": 0,
                           "messages": [{"role": "user", "content": DEMO_QUESTION}]}).encode()
        request = urllib.request.Request(f"{endpoint}/v1/chat/completions", data=body,
                                         headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        answer = _ask(request, f"asking {model} through {endpoint}")
        text = answer["choices"][0]["message"]["content"]
        one_line = text.replace("\n", "\\n")
        print(f"answer from {model} ({answer['usage']['completion_tokens']} tokens): {one_line}")


def _cost(args: argparse.Namespace) -> int:
    """The stack's monthly estimate from a preview (offline runner), and its change from the current state."""
    from ember.provider.tools import automation, billing, cost
    from ember.provider.tools.runner import OfflineRunner, RunError

    try:
        prices = billing.load_prices(args.prices)
        # the current state is the Pulumi backend's when the CLI runs this stack, else the offline runner's
        state = automation.stack_resources(args.program, args.stack) if automation.pulumi_cli_available() and \
            not args.offline else None
        before, after = cost.preview_costs(OfflineRunner(args.program, args.stack, log=lambda _: None), prices,
                                           record_foreign=True, state=state)
    except (billing.BillingError, SpecError, RunError) as exc:
        print(f"ember cost: {exc}", file=sys.stderr)
        return 2
    if args.format == "json":
        report = after.as_dict() | ({"diff": dict(cost.diff(before, after))} if args.diff else {})
        print(json.dumps(report, indent=2))
        return 0
    print(cost.table(after))
    if args.diff:
        print("\n".join(f"  {name}: {change}" for name, change in cost.diff(before, after)))
    return 0


def _usage(args: argparse.Namespace) -> int:
    """Charges per account and period from the usage records in a store."""
    import csv

    from ember.provider.domain.usage import read_replicas, read_shutdowns, read_training, read_usage  # no torch
    from ember.provider.tools import billing
    from ember.provider.tools.runner import OfflineRunner

    store_url = args.store or OfflineRunner(args.program, args.stack, log=lambda _: None).config.store_url
    try:
        prices = billing.load_prices(args.prices)
        records, replicas, shutdowns = read_usage(store_url), read_replicas(store_url), read_shutdowns(store_url)
        charges = billing.bill(records, replicas, prices, args.period, read_training(store_url), shutdowns)
        uncharged = billing.uncharged(records, replicas, shutdowns)
    except (billing.BillingError, SpecError, ValueError) as exc:  # ValueError: a deployment record it cannot read
        print(f"ember usage: {exc}", file=sys.stderr)
        return 2
    if args.account:
        charges = [c for c in charges if c.account_id == args.account]
        uncharged = [u for u in uncharged if u.account_id == args.account]
    notes = [u.note() for u in uncharged]
    if args.format == "json":
        totals = [{"account_id": a, "period": p, "amount": v} for (a, p), v in billing.totals(charges).items()]
        print(json.dumps({"currency": prices.currency, "charges": [c.as_dict() for c in charges], "totals": totals,
                          "notes": notes}, indent=2))
    elif args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(billing.Charge.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(c.as_dict() for c in charges)
        for note in notes:  # not a row: a CSV reader gets charges only
            print(f"note: {note}", file=sys.stderr)
    else:
        print(f"{'account':<16} {'period':<14} {'kind':<30} {'item':<52} {'quantity':>14} {prices.currency:>12}")
        for c in charges:
            print(f"{c.account_id:<16} {c.period:<14} {c.kind:<30} {c.item:<52} {c.quantity:>14,.0f} {c.amount:>12.4f}")
        for (account, period), amount in billing.totals(charges).items():
            print(f"{account:<16} {period:<14} {'total':<30} {'':<52} {'':>14} {amount:>12.4f}")
        for note in notes:
            print(f"note: {note}")
    if args.plot:
        print(f"plotted {billing.plot(charges, args.plot, prices.currency)}", file=sys.stderr)
    return 0


def _audit(args: argparse.Namespace) -> int:
    """The admin actions in a store's audit log: who did what to which resource, and how it ended."""
    from ember.provider.domain.audit import AuditLog, parse_since  # pydantic and fsspec only: no torch
    from ember.provider.tools.runner import OfflineRunner

    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        print(f"ember audit: {exc}", file=sys.stderr)
        return 2
    store_url = args.store or OfflineRunner(args.program, args.stack, log=lambda _: None).config.store_url
    records = AuditLog(store_url).read(args.account, since)
    if args.format == "json":
        print(json.dumps([r.model_dump(exclude_none=True) for r in records], indent=2))
        return 0
    columns = ("time", "account", "actor", "action", "target", "result", "detail")
    rows = [columns] + [tuple(getattr(r, c) or "" for c in columns) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns) - 1)]  # the last column is not padded
    for row in rows:
        print("  ".join([cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]).rstrip())
    return 0


def _serve(args: argparse.Namespace) -> int:
    from ember.runtime.__main__ import serve

    return serve(args)


def _gateway(args: argparse.Namespace) -> int:
    from ember.runtime.__main__ import serve_gateway

    return serve_gateway(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description="LLM serving infrastructure as code.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("schema", help="print or write the JSON Schemas generated from the resource spec")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--out", type=Path, metavar="DIR", help="write one file per schema into DIR")
    group.add_argument("--check", type=Path, metavar="DIR", help="exit 1 if the schemas in DIR are stale")
    p.set_defaults(run=_schema)

    p = sub.add_parser("validate", help="validate a stack file and print its normalised spec")
    p.add_argument("stack", type=Path)
    p.set_defaults(run=_validate)

    p = sub.add_parser("quickstart", help="bring the quickstart's model (SmolLM2-135M-Instruct) and addons into place "
                                          "and print its validated stack")
    p.add_argument("--stack", type=Path, default=QUICKSTART_STACK)
    p.set_defaults(run=_quickstart)

    for command, text in (("preview", "show what `up` would change"), ("up", "create or update a stack's resources"),
                          ("refresh", "read the real state of a stack's resources (reports drift)"),
                          ("destroy", "delete every resource of a stack")):
        p = sub.add_parser(command, help=f"{text} (Pulumi CLI when installed, else the offline runner)")
        p.add_argument("program", type=Path, nargs="?", default=Path("."), help="a Pulumi program directory")
        p.add_argument("--stack", default="dev")
        p.add_argument("--offline", action="store_true", help="use the offline runner even if the Pulumi CLI is installed")
        if command == "preview":
            p.add_argument("--policy-pack", type=Path, metavar="DIR",
                           help="check the preview with a CrossGuard policy pack: a folder, or `ember` for Ember's own")
            p.add_argument("--policy-pack-config", type=Path, metavar="FILE", help="JSON configuration for the pack")
        if command == "up":
            p.add_argument("--no-demo", action="store_true", help="do not send the sample chat completions")
            p.add_argument("--refresh", action="store_true",
                           help="refresh first, as `pulumi up --refresh` (restarts replicas that died, reloads addons)")
        p.set_defaults(run=_stack_command)
    _add_report_commands(sub)
    _add_runtime_commands(sub)
    return parser


def _add_report_commands(sub) -> None:
    """What a stack costs: charged (from usage records) and estimated (from a preview); and its audit log."""
    p = sub.add_parser("usage", help="what each account is charged, per period, from the store's usage records")
    p.add_argument("program", type=Path, nargs="?", default=Path("."),
                   help="a Pulumi program directory (its store is read; see --store)")
    p.add_argument("--stack", default="dev")
    p.add_argument("--store", metavar="URL", help="the model store's URL (default: the program's, as the provider finds it)")
    p.add_argument("--period", choices=("month", "day", "hour"), default="month")
    p.add_argument("--prices", type=Path, metavar="FILE", help="a JSON price table (default: Ember's list prices)")
    p.add_argument("--account", help="only this account")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--plot", type=Path, metavar="PNG", help="also plot usage and charges over time to this PNG")
    p.set_defaults(run=_usage)

    p = sub.add_parser("audit", help="the admin actions in the store's audit log: addons, keys, scaling")
    p.add_argument("program", type=Path, nargs="?", default=Path("."),
                   help="a Pulumi program directory (its store is read; see --store)")
    p.add_argument("--stack", default="dev")
    p.add_argument("--store", metavar="URL", help="the model store's URL (default: the program's, as the provider finds it)")
    p.add_argument("--account", help="only this account's records")
    p.add_argument("--since", metavar="T", help="only records at or after T: an ISO date or time (UTC unless it says), "
                                               "or a span back from now: 30m, 1h, 7d")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(run=_audit)

    p = sub.add_parser("cost", help="the stack's monthly cost estimate from a preview (and --diff: its change)")
    p.add_argument("program", type=Path, nargs="?", default=Path("."), help="a Pulumi program directory")
    p.add_argument("--stack", default="dev")
    p.add_argument("--prices", type=Path, metavar="FILE", help="a JSON price table (default: Ember's list prices)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--diff", action="store_true", help="also the change against the stack's current state")
    p.add_argument("--offline", action="store_true", help="the offline runner's state, even with the Pulumi CLI")
    p.set_defaults(run=_cost)


def _add_runtime_commands(sub) -> None:
    """The runtime's commands, and the model tools beside it."""
    p = sub.add_parser("serve", help="run a runtime replica: one deployment over the OpenAI API")
    from ember.runtime.__main__ import add_serve_arguments  # argparse only: no torch until it runs

    add_serve_arguments(p)
    p.set_defaults(run=_serve)

    p = sub.add_parser("gateway", help="run the store's gateway by hand: one endpoint routing by model name")
    from ember.runtime.__main__ import add_gateway_arguments  # argparse only

    add_gateway_arguments(p)
    p.set_defaults(run=_gateway)

    p = sub.add_parser("import-gguf", help="convert a GGUF file into a Hugging Face model directory (as an upload does)")
    p.add_argument("file", type=Path, help="a .gguf file (llama, qwen2)")
    p.add_argument("directory", type=Path, help="where to write the model; must not exist yet")
    p.set_defaults(run=_import_gguf)

    p = sub.add_parser("tiny-model", help="generate a random Hugging Face-format model directory")
    p.add_argument("directory", type=Path)
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "bench-100m"])
    p.add_argument("--architecture", default="llama", choices=["llama", "qwen2", "mistral"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=1)
    p.set_defaults(run=_tiny_model)

    p = sub.add_parser("tiny-lora", help="generate a random PEFT LoRA adapter for a model directory")
    p.add_argument("base", type=Path)
    p.add_argument("directory", type=Path)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default="q_proj,v_proj", help="comma-separated projection names")
    p.add_argument("--rslora", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_tiny_lora)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except SpecError as exc:
        print(f"ember: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
