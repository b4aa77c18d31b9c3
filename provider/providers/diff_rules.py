"""What a change to a resource means: replacement (the inputs its kind declares replace it), in-place update,
or nothing.

A change that needs new weights or a new base (a model's source digest, an addon's base model, a
deployment's accelerators or engine shape, a dataset's content, any setting of a fine-tuning job) replaces
the resource; replica counts, autoscaling, attached addons and descriptions update in place. Inputs are compared
after check normalised them, so a reformatted program or a reinstalled package gives no diff.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ember.provider.domain.kinds import BY_SPEC


def compare(spec_cls: type, olds: dict[str, Any], news: dict[str, Any],
            has_unknown: Callable[[Any], bool]) -> tuple[list[str], list[str]]:
    """(changed properties, those among them that force a replacement)."""
    keys = [k for k in (*spec_cls.model_fields, *BY_SPEC[spec_cls].derived) if k in olds or k in news]
    changed = [k for k in keys if has_unknown(news.get(k)) or olds.get(k) != news.get(k)]
    replace = set(BY_SPEC[spec_cls].replace)
    if "source" in changed and not (olds.get("source_digest") and news.get("source_digest")):
        replace.add("source")  # a remote source has no digest at preview: a new URL means new weights
    return changed, [k for k in changed if k in replace]
