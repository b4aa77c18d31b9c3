"""Did the pirate addon learn? Held-out questions to the base model and to the addon, and the loss curve.

    python examples/fine-tuning/evaluate.py [--stack dev] [--plot loss.png]

Asks every question of data/held_out.json (subjects and shapes the training never saw) of both models through
the deployment's endpoint, greedy, and prints how often each answer begins with "Arr!"; plots the job's training
loss per step and its evaluation loss per epoch. Reads the stack's outputs as `ember up` left them (offline
runner state, or `pulumi stack output` when the stack ran under the Pulumi CLI).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent


def stack_outputs(stack: str) -> dict:
    state = HERE / ".ember" / "stacks" / f"ember-fine-tuning-{stack}.json"
    if state.exists():
        return json.loads(state.read_text())["outputs"]
    if shutil.which("pulumi"):
        out = subprocess.run(["pulumi", "stack", "output", "--json", "--stack", stack], cwd=HERE, check=True,
                             capture_output=True, text=True)
        return json.loads(out.stdout)
    sys.exit(f"no outputs for stack {stack!r}: run `ember up {HERE}` first")


def ask(endpoint: str, key: str, model: str, question: str) -> str:
    body = json.dumps({"model": model, "max_tokens": 24, "temperature": 0,
                       "messages": [{"role": "user", "content": question}]}).encode()
    request = urllib.request.Request(f"{endpoint}/v1/chat/completions", data=body,
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"]


def plot(outputs: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = outputs["step_loss"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(steps) + 1), steps, label="training loss (per step)")
    per_epoch = len(steps) // max(len(outputs["evaluation_loss"]), 1)
    ax.plot([per_epoch * (i + 1) for i in range(len(outputs["evaluation_loss"]))], outputs["evaluation_loss"], "o-",
            label="evaluation loss (per epoch)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy on assistant tokens")
    ax.set_title("pirate LoRA on SmolLM2-135M-Instruct")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", default="dev")
    parser.add_argument("--plot", type=Path, default=HERE / "loss.png")
    parser.add_argument("--show", action="store_true", help="print every answer")
    args = parser.parse_args(argv)
    outputs = stack_outputs(args.stack)
    key = (HERE / ".ember" / "keys" / f"{outputs['account']}.key").read_text().strip()
    questions = json.loads((HERE / "data" / "held_out.json").read_text())
    base, pirate = outputs["models"]
    rates = {}
    for model in (base, pirate):
        answers = [ask(outputs["endpoint"], key, model, q) for q in questions]
        rates[model] = sum(a.startswith("Arr!") for a in answers) / len(answers)
        for question, answer in zip(questions, answers) if args.show else ():
            print(f"  {model.rsplit('/', 1)[-1]}: {question} -> {answer!r}")
        print(f"{model}: {rates[model]:.0%} of {len(questions)} held-out answers begin with 'Arr!'")
    print(f"trained on {outputs['trained_tokens']} tokens in {outputs['training_seconds']:.0f} s; "
          f"loss plotted to {plot(outputs, args.plot)}")
    return 0 if rates[pirate] >= 0.9 and rates[base] <= 0.1 else 1


if __name__ == "__main__":
    sys.exit(main())
