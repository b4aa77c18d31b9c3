"""The `ember` command line.

The provider half never imports torch; subcommands about the runtime (the tiny-model kit, later
`serve` and `bench`) import it only when they run, so `ember --help` and `ember schema` stay light.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import schemas, stackfile
from .spec import LORA_TARGET_MODULES, SpecError

QUICKSTART_STACK = Path("examples/quickstart/stack.json")


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
    from ember.runtime import tinymodels

    directory = tinymodels.make_model(
        args.directory, args.preset, seed=args.seed, shards=args.shards, architecture=args.architecture
    )
    print(directory)
    return 0


def _tiny_lora(args: argparse.Namespace) -> int:
    from ember.runtime import tinymodels

    lora = tinymodels.TinyLoRA(rank=args.rank, alpha=args.alpha, target_modules=tuple(args.targets.split(",")),
                               use_rslora=args.rslora)
    print(tinymodels.make_lora(args.base, args.directory, lora, seed=args.seed))
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    """Generate the quickstart's tiny model and two addons, then validate and print its stack."""
    from ember.runtime import tinymodels

    models = args.stack.parent / "models"
    base = tinymodels.make_model(models / "tiny-llama", "tiny", seed=0)
    print(f"generated base model   {base}", file=sys.stderr)
    for seed, (name, lora) in enumerate(
        {
            "tiny-llama-pirate": tinymodels.TinyLoRA(rank=8, target_modules=("q_proj", "v_proj")),
            "tiny-llama-poet": tinymodels.TinyLoRA(rank=16, target_modules=LORA_TARGET_MODULES),
        }.items(),
        start=1,
    ):
        print(f"generated LoRA addon   {tinymodels.make_lora(base, models / name, lora, seed=seed)}", file=sys.stderr)
    print(stackfile.dump(stackfile.load(args.stack)))
    return 0


def _stack_command(args: argparse.Namespace) -> int:
    """preview | up | refresh | destroy a Pulumi program: the Pulumi CLI when installed, else offline."""
    from . import runner

    program = args.program.resolve()
    if not (program / "Pulumi.yaml").exists():
        print(f"ember: {program} has no Pulumi.yaml", file=sys.stderr)
        return 2
    try:
        if runner.pulumi_cli_available() and not args.offline:
            outputs = runner.run_with_pulumi(args.command, program, args.stack)
            state_dir = runner.ProviderConfig.load(default_root=program).state_dir
        else:
            offline = runner.OfflineRunner(program, args.stack)
            state_dir = offline.config.state_dir
            if args.command == "refresh":
                offline.refresh()
                return 0
            if args.command == "destroy":
                offline.destroy()
                print("destroyed: no replica process, port or store entry of this stack is left (usage records stay, for billing)")
                return 0
            outputs = offline.up(preview=args.command == "preview")
    except Exception as exc:  # the provider's message names the resource, property and value
        print(f"ember {args.command} failed: {exc}", file=sys.stderr)
        return 1
    if args.command == "up":
        print("outputs:")
        for key, value in sorted(outputs.items()):
            print(f"  {key}: {json.dumps(value)}")
        if not args.no_demo and outputs.get("endpoint") and outputs.get("models"):
            _demo(outputs, state_dir)
    return 0


def _demo(outputs: dict, state_dir: Path) -> None:
    """A chat completion from each model the stack exports, through its endpoint."""
    import urllib.request

    key = (state_dir / "keys" / f"{outputs['account']}.key").read_text().strip()
    for model in outputs["models"]:
        body = json.dumps({"model": model, "max_tokens": 12, "temperature": 0,
                           "messages": [{"role": "user", "content": "Say hello to Ember."}]}).encode()
        request = urllib.request.Request(f"{outputs['endpoint']}/v1/chat/completions", data=body,
                                         headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        text = answer["choices"][0]["message"]["content"]
        print(f"chat completion from {model} ({answer['usage']['completion_tokens']} tokens): {text!r}")


def _serve(args: argparse.Namespace) -> int:
    from ember.runtime.__main__ import serve

    return serve(args)


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

    p = sub.add_parser("quickstart", help="generate the quickstart's tiny models and print its validated stack")
    p.add_argument("--stack", type=Path, default=QUICKSTART_STACK)
    p.set_defaults(run=_quickstart)

    for command, text in (("preview", "show what `up` would change"), ("up", "create or update a stack's resources"),
                          ("refresh", "read the real state of a stack's resources (reports drift)"),
                          ("destroy", "delete every resource of a stack")):
        p = sub.add_parser(command, help=f"{text} (Pulumi CLI when installed, else the offline runner)")
        p.add_argument("program", type=Path, nargs="?", default=Path("."), help="a Pulumi program directory")
        p.add_argument("--stack", default="dev")
        p.add_argument("--offline", action="store_true", help="use the offline runner even if the Pulumi CLI is installed")
        if command == "up":
            p.add_argument("--no-demo", action="store_true", help="do not send the sample chat completions")
        p.set_defaults(run=_stack_command)

    p = sub.add_parser("serve", help="run a runtime replica: one deployment over the OpenAI API")
    from ember.runtime.__main__ import add_serve_arguments  # argparse only: no torch until it runs

    add_serve_arguments(p)
    p.set_defaults(run=_serve)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except SpecError as exc:
        print(f"ember: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
