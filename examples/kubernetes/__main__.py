"""The quickstart's stack on a Kubernetes GPU cluster.

    pulumi config set ember:storeUrl s3://ember-models/store          # where the provider uploads
    pulumi config set --secret storeAccessKey …; pulumi config set --secret storeSecretKey …
    pulumi config set kubeconfig ~/.kube/config                       # optional: the ambient one otherwise
    pulumi up

`ember quickstart` puts the model and addons under ../quickstart/models first. The base model and addons upload to
the store; the runtime pods (image: runtime/Dockerfile) load them
from there and pick up addons without a restart.
"""

import pulumi
import pulumi_kubernetes as k8s

from ember.provider import DeploymentArgs, KubernetesArgs, KubernetesDeployment, LoRAAddon, LoRAAddonArgs, Model, ModelArgs

config = pulumi.Config()
ACCOUNT = "quickstart"
kubeconfig = config.get("kubeconfig")
provider = k8s.Provider("cluster", kubeconfig=kubeconfig, namespace=config.get("namespace")) if kubeconfig else None

base = Model("smollm2-135m-instruct", ModelArgs(account_id=ACCOUNT,
                                                source="../quickstart/models/smollm2-135m-instruct.gguf"))
gpu = KubernetesDeployment(
    "smollm2-gpu",
    DeploymentArgs(account_id=ACCOUNT, base_model=base, accelerator_type=config.get("acceleratorType"),
                   accelerator_count=1, min_replicas=config.get_int("minReplicas"),
                   max_replicas=config.get_int("maxReplicas"), max_loras=8),
    KubernetesArgs(image=config.get("image"), namespace=config.get("namespace"), store_url=config.get("storeUrl"),
                   store_credentials={"AWS_ACCESS_KEY_ID": config.get_secret("storeAccessKey") or "",
                                      "AWS_SECRET_ACCESS_KEY": config.get_secret("storeSecretKey") or ""},
                   provider=provider),
)
addons = [LoRAAddon(name, LoRAAddonArgs(account_id=ACCOUNT, base_model=base, source=f"../quickstart/models/{name}",
                                        deployments=[gpu.deployment]))
          for name in ("smollm2-pirate", "smollm2-poet")]

pulumi.export("endpoint", gpu.endpoint)
pulumi.export("models", pulumi.Output.all(base.name, *[a.name for a in addons]))
