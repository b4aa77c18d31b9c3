"""The quickstart's stack on a Kubernetes GPU cluster.

    pulumi config set ember:storeUrl s3://ember-models/store          # where the provider uploads
    pulumi config set --secret storeAccessKey …; pulumi config set --secret storeSecretKey …
    pulumi config set kubeconfig ~/.kube/config                       # optional: the ambient one otherwise
    pulumi config set namespace ember                                 # labelled for Pod Security `restricted`
    pulumi config set gatewayHost ember.example.com                   # optional: an Ingress for the gateway
    pulumi up

`ember quickstart` puts the model and the poet addon under ../quickstart/models first, and
`python ../fine-tuning/make_dataset.py` writes the pirate dataset, which a Job in the cluster trains on. The base
model and addons upload to the store; the runtime pods (image: runtime/Dockerfile) load them from there and pick
up addons without a restart.
"""

import pulumi
import pulumi_kubernetes as k8s

from ember.provider import (Dataset, DatasetArgs, DeploymentArgs, FineTuningJobArgs, GatewayArgs, KubernetesArgs,
                            KubernetesDeployment, KubernetesFineTuningJob, KubernetesGateway, KubernetesGatewayArgs,
                            LoRAAddon, LoRAAddonArgs, Model, ModelArgs)

config = pulumi.Config()
ACCOUNT = "quickstart"
kubeconfig = config.get("kubeconfig")
provider = k8s.Provider("cluster", kubeconfig=kubeconfig, namespace=config.get("namespace")) if kubeconfig else None

base = Model("smollm2-135m-instruct", ModelArgs(account_id=ACCOUNT,
                                                source="../quickstart/models/smollm2-135m-instruct.gguf"))
cluster = KubernetesArgs(image=config.get("image"), namespace=config.get("namespace"), store_url=config.get("storeUrl"),
                         store_credentials={"AWS_ACCESS_KEY_ID": config.get_secret("storeAccessKey") or "",
                                            "AWS_SECRET_ACCESS_KEY": config.get_secret("storeSecretKey") or ""},
                         provider=provider, kubeconfig=kubeconfig)
gpu = KubernetesDeployment(
    "smollm2-gpu",
    DeploymentArgs(account_id=ACCOUNT, base_model=base, accelerator_type=config.get("acceleratorType"),
                   accelerator_count=config.get_int("acceleratorCount") or 1, min_replicas=config.get_int("minReplicas"),
                   max_replicas=config.get_int("maxReplicas"), max_loras=8),
    cluster,
)
# The pirate addon is trained in the cluster, as a batch/v1 Job on one GPU of the same type, from the fine-tuning
# example's dataset (python ../fine-tuning/make_dataset.py writes it), then deployed like any addon.
pirate_chats = Dataset("pirate-chats", DatasetArgs(account_id=ACCOUNT, source="../fine-tuning/data/train.jsonl"))
tuning = KubernetesFineTuningJob(
    "smollm2-pirate-sft",
    FineTuningJobArgs(account_id=ACCOUNT, base_model=base, dataset=pirate_chats, output_model="smollm2-pirate-v1",
                      epochs=1, learning_rate=1e-3, lora_rank=8),
    cluster, accelerator_type=config.get("acceleratorType") or "NVIDIA_H100_80GB",
)
addons = [LoRAAddon("smollm2-pirate", LoRAAddonArgs(account_id=ACCOUNT, base_model=base, source=tuning.job,
                                                    deployments=[gpu.deployment])),
          LoRAAddon("smollm2-poet", LoRAAddonArgs(account_id=ACCOUNT, base_model=base, deployments=[gpu.deployment],
                                                  source="../quickstart/models/smollm2-poet"))]

# The one endpoint applications call, in front of every deployment of the store: two pods behind a Service (and an
# Ingress where `gatewayHost` is set).
gateway = KubernetesGateway("gateway", GatewayArgs(account_id=ACCOUNT), cluster,
                            KubernetesGatewayArgs(ingress_host=config.get("gatewayHost")))

pulumi.export("gateway", gateway.url)
pulumi.export("endpoint", gpu.endpoint)
pulumi.export("models", pulumi.Output.all(base.name, *[a.name for a in addons]))
