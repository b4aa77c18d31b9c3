"""Damage model files on purpose: change a JSON file's fields or a safetensors file's tensors in place."""

import json
from pathlib import Path

from safetensors.torch import load_file, save_file


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def edit_tensors(path: Path, change) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)
