"""The platform team's stack: the catalog's Llama 3.1 8B, served serverless to every account, behind the store's
gateway, the one endpoint every account calls.

An operator puts the catalog model's weights in the store once (`catalog/llama-v3p1-8b-instruct`);
tenants then add their LoRA addons to it from their own stacks (../tenant) and pay per token.
"""

import pulumi

from ember.provider import Deployment, DeploymentArgs, Gateway, GatewayArgs, Model, ModelArgs

config = pulumi.Config()
base = Model("llama-8b", ModelArgs(account_id="platform", catalog_id="llama-v3p1-8b-instruct"))
shared = Deployment("llama-8b-serverless", DeploymentArgs(
    account_id="platform", base_model=base, deployment_type="serverless",
    accelerator_type=config.get("acceleratorType"), max_replicas=config.get_int("maxReplicas")))

gateway = Gateway("gateway", GatewayArgs(account_id="platform"))

pulumi.export("gateway", gateway.url)
pulumi.export("endpoint", shared.endpoints.apply(lambda endpoints: endpoints[0] if endpoints else None))
pulumi.export("base_model", base.name)
