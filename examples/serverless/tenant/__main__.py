"""A tenant's stack: its own LoRA addon on the platform's serverless base model, no deployment of its own.

The addon names the base model; `serverless=True` puts it on every serverless deployment of that base,
where it is served to this account only, billed per token (`ember usage`). Its applications call the platform's
gateway, which this stack reads (it does not own it) to export its URL.
"""

import pulumi

from ember.provider import Gateway, LoRAAddon, LoRAAddonArgs

config = pulumi.Config()
addon = LoRAAddon(config.require("addon"), LoRAAddonArgs(
    account_id=config.require("account"), base_model="accounts/platform/models/llama-v3p1-8b-instruct",
    source=config.require("source"), serverless=True))

gateway = Gateway.get("gateway", "accounts/platform/gateways/gateway")

pulumi.export("gateway", gateway.url)
pulumi.export("model", addon.name)
pulumi.export("deployed_on", addon.deployed_on)
