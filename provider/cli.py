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
