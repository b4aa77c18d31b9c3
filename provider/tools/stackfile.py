"""Stack files: a whole stack's resources as JSON, validated by the spec.

A stack file is the declarative twin of a Pulumi program, for `ember validate` and the quickstart.
Relative local `source` paths are read relative to the file, as a Pulumi program's are relative to
its project directory.
"""

from __future__ import annotations

import json
from pathlib import Path

from ember.provider.domain.spec import SpecError, parse
from ember.provider.domain.stack import StackSpec


def load(path: str | Path) -> StackSpec:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError("StackSpec", [("(file)", f"{str(path)!r} does not exist")]) from None
    except json.JSONDecodeError as exc:
        raise SpecError("StackSpec", [("(file)", f"{str(path)!r} is not JSON: {exc}")]) from None
    for group in ("models", "addons", "datasets"):
        for item in data.get(group, ()) if isinstance(data, dict) else ():
            source = item.get("source") if isinstance(item, dict) else None
            if isinstance(source, str) and "://" not in source and not Path(source).is_absolute():
                item["source"] = str((path.parent / source).resolve())
    return parse(StackSpec, data)


def dump(stack: StackSpec) -> str:
    return json.dumps(stack.model_dump(mode="json", exclude_none=True), indent=2)
