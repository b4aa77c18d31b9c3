"""A tenant's stack: its own LoRA addon on the platform's serverless base model, no deployment of its own.

The addon names the base model; `serverless=True` puts it on every serverless deployment of that base,
where it is served to this account only, billed per token (`ember usage`).
"""

import pulumi

from ember.provider import LoRAAddon, LoRAAddonArgs

config = pulumi.Config()
addon = LoRAAddon(config.require("addon"), LoRAAddonArgs(
    account_id=config.require("account"), base_model="accounts/platform/models/llama-v3p1-8b-instruct",
    source=config.require("source"), serverless=True))

pulumi.export("model", addon.name)
pulumi.export("deployed_on", addon.deployed_on)
