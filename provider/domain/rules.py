"""The rules that span resources, each written once.

A dynamic provider's check sees one resource at a time, so these rules are fed by three thin adapters, each
turning what it sees into the facts below: a stack file (stack.py, every resource at once), a program (the facts
each resource carries about those it references, judged by the providers' check, and the models a program
declares, judged as it declares them: resources.py) and the policy pack's view of a preview (policy/policies.py).
At create the providers judge the same facts again, read from the store.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ember.provider.domain import catalog
from ember.provider.domain.names import parse_model_name


@dataclass(frozen=True)
class Declaration:
    """A name a resource takes: a model (a base model, an addon, or the addon a fine-tuning job writes), a
    deployment or a dataset."""

    name: str  # accounts/<a>/<collection>/<id>
    by: str  # who takes it, as the adapter names it: "Model first", "models[0]"
    trained: bool = False  # the output model of a fine-tuning job


@dataclass(frozen=True)
class DeploymentFacts:
    """What an addon attached to a deployment needs to know of it."""

    name: str
    base_model: str | None  # None: not known yet (preview)
    max_lora_rank: int | None  # None: not known yet


def name_clash(first: Declaration, second: Declaration) -> str:
    """Why `second` cannot take the name `first` took. Model IDs are globally unique, base models and addons
    alike, and a fine-tuning job writes its output model itself."""
    if first.trained or second.trained:
        clash = f"is also declared by {first.by}" if second.trained else f"is the output_model of {first.by}"
        return (f"{second.name} {clash}: a fine-tuning job writes its output model itself (deploy it with "
                f"LoRAAddonArgs(source=job) under another ID); give one of them another ID")
    unique = "; model IDs are globally unique, base models and addons alike" if "/models/" in second.name else ""
    return f"{second.name} is already declared by {first.by}{unique}"


def name_clashes(declarations: Iterable[Declaration]) -> Iterator[tuple[Declaration, str]]:
    """Each declaration that takes a name an earlier one took, with why it may not."""
    seen: dict[str, Declaration] = {}
    for declaration in declarations:
        if declaration.name in seen:
            yield declaration, name_clash(seen[declaration.name], declaration)
        else:
            seen[declaration.name] = declaration


def addon_misfits(addon_base: str | None, rank: int | None, deployment: DeploymentFacts) -> list[tuple[str, str]]:
    """(field, message) for each way an addon of base `addon_base` and rank `rank` does not fit a deployment it is
    attached to: the deployment serves another base, or takes no adapter of that rank. Unknowns are judged later."""
    misfits = []
    serving = deployment.base_model
    if addon_base is not None and serving is not None and serving != addon_base:
        misfits.append(("deployments", f"{deployment.name} serves base model {serving}, not this addon's base "
                                       f"{addon_base}; attach it to a deployment of {addon_base}"))
    if rank is not None and deployment.max_lora_rank is not None and rank > deployment.max_lora_rank:
        misfits.append(("source", f"rank {rank} is above {deployment.name}'s max_lora_rank {deployment.max_lora_rank}; "
                                  f"raise it or train a smaller adapter"))
    return misfits


def base_model_refusal(base_model: str, is_addon: bool, declared: bool | None) -> str | None:
    """Why `base_model` cannot be what a deployment, an addon or a fine-tuning job is built on: it is an addon, or
    (in a program, `declared` False) neither a catalog model nor declared before its users."""
    if catalog.lookup(parse_model_name(base_model).resource_id):
        return None
    if is_addon:
        return f"{base_model} is a LoRA addon, not a base model"
    if declared is False:
        return (f"{base_model} is neither a catalog model nor a Model declared in this program; declare it before "
                f"its users (or adopt it with Model.get)")
    return None


def dataset_refusal(dataset: str, declared: bool | None) -> str | None:
    """Why a fine-tuning job cannot train on `dataset`: in a program, it is not a Dataset declared there."""
    return f"{dataset} is not a Dataset declared in this program" if declared is False else None
