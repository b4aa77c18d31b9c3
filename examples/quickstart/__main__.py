"""Ember quickstart: a tiny base model, two LoRA addons and a deployment on this machine.

`ember quickstart` generates the tiny random weights under models/ first; `ember up examples/quickstart`
deploys them. Swap `source` for your own Hugging Face directories to serve real models.
"""

import pulumi

from ember.provider import Deployment, DeploymentArgs, LoRAAddon, LoRAAddonArgs, Model, ModelArgs

ACCOUNT = "quickstart"

base = Model("tiny-llama", ModelArgs(account_id=ACCOUNT, source="models/tiny-llama",
                                     display_name="Tiny Llama (random weights)"))
local = Deployment("tiny-llama-local", DeploymentArgs(account_id=ACCOUNT, base_model=base, accelerator_type="CPU",
                                                      min_replicas=1, max_replicas=1, max_loras=4,
                                                      description="The embedded local cluster"))
addons = [
    LoRAAddon(name, LoRAAddonArgs(account_id=ACCOUNT, base_model=base, source=f"models/{name}", deployments=[local]))
    for name in ("tiny-llama-pirate", "tiny-llama-poet")
]

pulumi.export("endpoint", local.endpoints.apply(lambda endpoints: endpoints[0] if endpoints else None))
pulumi.export("account", ACCOUNT)
pulumi.export("models", pulumi.Output.all(base.name, *[a.name for a in addons]))
