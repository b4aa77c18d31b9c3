"""The platform team's stack: the catalog's Llama 3.1 8B, served serverless to every account.

An operator puts the catalog model's weights in the store once (`catalog/llama-v3p1-8b-instruct`);
tenants then add their LoRA addons to it from their own stacks (../tenant) and pay per token.
"""

import pulumi

from ember.provider import Deployment, DeploymentArgs, Model, ModelArgs

config = pulumi.Config()
base = Model("llama-8b", ModelArgs(account_id="platform", catalog_id="llama-v3p1-8b-instruct"))
shared = Deployment("llama-8b-serverless", DeploymentArgs(
    account_id="platform", base_model=base, deployment_type="serverless",
    accelerator_type=config.get("acceleratorType"), max_replicas=config.get_int("maxReplicas")))

pulumi.export("endpoint", shared.endpoints.apply(lambda endpoints: endpoints[0] if endpoints else None))
pulumi.export("base_model", base.name)
