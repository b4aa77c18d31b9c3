"""The policy pack: each policy on resource args shaped as the engine sends them, unknowns included; the
examples pass it and deliberately bad stacks fail it with messages a user can act on."""

import json
import shutil
from pathlib import Path

import pytest
from google.protobuf import json_format, struct_pb2
from pulumi_policy import PolicyResource, ResourceValidationArgs, StackValidationArgs
from pulumi_policy.deserialize import deserialize_properties
from pulumi_policy.proxy import UNKNOWN_NUMBER_VALUE, UNKNOWN_STRING_VALUE, unknown_checking_proxy

from ember.provider.backends.store import Store
from ember.provider.domain.kinds import BY_NAME, KINDS
from ember.provider.domain.kinds.gateway import GatewaySpec
from ember.provider.policy.check import Registration, run_pack
from ember.provider.domain.records import DeploymentRecord, GatewayRecord
from ember.provider.policy.policies import ADDON, DEPLOYMENT, JOB, MODEL, POLICIES, SPECS
from ember.provider.tools import cli

REPO = Path(__file__).resolve().parents[2]
PACK = REPO / "provider" / "policy"
CATALOG_BASE = "accounts/platform/models/llama-v3p1-8b-instruct"
NOT_FOR_ADDONS = "accounts/platform/models/llama-v3p1-405b-instruct"
UNKNOWN = UNKNOWN_STRING_VALUE


def engine_props(props: dict):
    """Props as the analyzer hands them to a policy: through a protobuf Struct (ints become floats), then
    deserialized and wrapped in the proxy that raises on unknown values."""
    struct = struct_pb2.Struct()
    struct.update({"__provider": "serialized-provider", **props})
    return unknown_checking_proxy(deserialize_properties(json_format.MessageToDict(struct)))


class Stack:
    def __init__(self):
        self.resources: list[PolicyResource] = []

    def add(self, resource_type, name, deps=None, **props):
        resource = PolicyResource(resource_type, engine_props(props), f"urn:pulumi:dev::p::{resource_type}::{name}",
                                  name, None, None, None, [], deps or {})
        self.resources.append(resource)
        return resource


def policy(name):
    return next(p for p in POLICIES if p.name == name)


def resource_violations(name, resource_type, config=None, **props):
    found = []
    args = ResourceValidationArgs(resource_type, engine_props(props), f"urn:pulumi:dev::p::{resource_type}::r", "r",
                                  None, None, config)
    policy(name).validate(args, lambda message, urn=None: found.append(message))
    return found


def stack_violations(name, stack, config=None):
    found = []
    policy(name).validate(StackValidationArgs(stack.resources, config),
                          lambda message, urn=None: found.append((message, urn)))
    return found


# ---------------------------------------------------------------------------------------------------------
# mandatory: the domain rules


def test_the_pack_judges_every_kind_including_datasets_and_fine_tuning_jobs():
    """Issue 29: the pack's kinds are the one list of kinds; a bad Dataset or FineTuningJob fails ember-spec or
    ember-names, naming the field and value, and unknowns are judged once known."""
    assert set(SPECS) == {kind.type_token for kind in KINDS}
    dataset = BY_NAME["Dataset"].type_token
    [message] = resource_violations("ember-names", dataset, account_id="acme", dataset_id="Chats!", source="c.jsonl")
    assert message.startswith("Dataset r: dataset_id") and "'Chats!'" in message
    job = dict(account_id="acme", base_model="accounts/acme/models/base", dataset="accounts/acme/datasets/chats",
               output_model="v1")
    assert resource_violations("ember-spec", JOB, **job) == []
    [message] = resource_violations("ember-spec", JOB, **job, epochs=0)
    assert message.startswith("FineTuningJob r: epochs") and "0" in message
    [message] = resource_violations("ember-spec", JOB, **job, early_stop=True)
    assert "early_stop: True needs an evaluation_dataset" in message
    [message] = resource_violations("ember-names", JOB, **(job | {"dataset": "accounts/globex/datasets/chats"}))
    assert message.startswith("FineTuningJob r: dataset") and "private to their account" in message
    assert resource_violations("ember-spec", JOB, **(job | {"epochs": UNKNOWN_NUMBER_VALUE})) == []


def test_names_report_the_field_and_value_and_skip_unknowns():
    [message] = resource_violations("ember-names", MODEL, account_id="Acme_Corp", source="models/base")
    assert "account_id" in message and "'Acme_Corp'" in message
    assert resource_violations("ember-names", MODEL, account_id=UNKNOWN, source="models/base") == []
    [message] = resource_violations("ember-names", DEPLOYMENT, account_id="acme", base_model="models/base")
    assert message.startswith("Deployment r: base_model") and "'models/base'" in message
    assert resource_violations("ember-names", DEPLOYMENT, account_id="acme", base_model=UNKNOWN) == []


def test_spec_rules_take_engine_floats_and_skip_rules_that_need_unknowns():
    ok = dict(account_id="acme", base_model=CATALOG_BASE, min_replicas=1, max_replicas=2)  # arrive as 1.0, 2.0
    assert resource_violations("ember-spec", DEPLOYMENT, **ok) == []
    [message] = resource_violations("ember-spec", DEPLOYMENT, **(ok | {"min_replicas": 3}))
    assert "min_replicas: 3 is more than max_replicas 2" in message
    # a cross-field rule with one side unknown is judged once it is known
    assert resource_violations("ember-spec", DEPLOYMENT, **(ok | {"min_replicas": UNKNOWN_NUMBER_VALUE})) == []
    [message] = resource_violations("ember-spec", DEPLOYMENT, **(ok | {"accelerator_type": "TPU_V5"}))
    assert "accelerator_type" in message and "TPU_V5" in message
    assert resource_violations("ember-spec", "aws:s3/bucket:Bucket", acl="public") == []  # not ours


def test_custom_base_models_are_never_served_serverless_even_when_the_name_is_unknown():
    stack = Stack()
    custom = stack.add(MODEL, "custom", account_id="acme", model_id="custom", source="models/base")
    stock = stack.add(MODEL, "stock", account_id="platform", catalog_id="llama-v3p1-8b-instruct")
    shared = stack.add(DEPLOYMENT, "shared", {"base_model": [custom]}, account_id="acme", base_model=UNKNOWN,
                       deployment_type="serverless")
    stack.add(DEPLOYMENT, "fine", {"base_model": [stock]}, account_id="platform", base_model=UNKNOWN,
              deployment_type="serverless")
    stack.add(DEPLOYMENT, "later", account_id="acme", base_model=UNKNOWN, deployment_type="serverless")
    stack.add(DEPLOYMENT, "dedicated", {"base_model": [custom]}, account_id="acme", base_model=UNKNOWN)
    [(message, urn)] = stack_violations("ember-serverless-catalog-bases-only", stack)
    assert urn == shared.urn and "accounts/acme/models/custom" in message and "make it 'dedicated'" in message
    named = Stack()
    named.add(DEPLOYMENT, "d", account_id="acme", base_model="accounts/acme/models/mine", deployment_type="serverless")
    assert len(stack_violations("ember-serverless-catalog-bases-only", named)) == 1


def test_an_addon_goes_only_on_deployments_of_its_base_model():
    stack = Stack()
    first = stack.add(MODEL, "first", account_id="acme", model_id="first", source="a")
    second = stack.add(MODEL, "second", account_id="acme", model_id="second", source="b")
    on_first = stack.add(DEPLOYMENT, "on-first", {"base_model": [first]}, account_id="acme",
                         deployment_id="on-first", base_model=UNKNOWN)
    on_second = stack.add(DEPLOYMENT, "on-second", {"base_model": [second]}, account_id="acme",
                          deployment_id="on-second", base_model=UNKNOWN)
    good = stack.add(ADDON, "good", {"base_model": [first], "deployments": [on_first]}, account_id="acme",
                     base_model=UNKNOWN, source="p", deployments=[UNKNOWN])
    bad = stack.add(ADDON, "bad", {"base_model": [first], "deployments": [on_second]}, account_id="acme",
                    base_model=UNKNOWN, source="p", deployments=[UNKNOWN])
    by_name = stack.add(ADDON, "by-name", account_id="acme", base_model="accounts/acme/models/second", source="p",
                        deployments=["accounts/acme/deployments/on-first"])
    found = stack_violations("ember-addons-on-their-base-deployments", stack)
    assert {urn for _, urn in found} == {bad.urn, by_name.urn} and good.urn not in {u for _, u in found}
    message = dict((u, m) for m, u in found)[bad.urn]
    assert "accounts/acme/deployments/on-second serves base model accounts/acme/models/second" in message
    assert on_first and on_second


# ---------------------------------------------------------------------------------------------------------
# guardrails


def test_allowed_accelerators():
    config = {"allowed": ["CPU", "NVIDIA_H100_80GB"]}
    base = dict(account_id="acme", base_model=CATALOG_BASE)
    [message] = resource_violations("ember-allowed-accelerators", DEPLOYMENT, config,
                                    **base, accelerator_type="NVIDIA_H200_141GB")
    assert "'NVIDIA_H200_141GB' is not allowed" in message and "CPU, NVIDIA_H100_80GB" in message
    assert resource_violations("ember-allowed-accelerators", DEPLOYMENT, config, **base, accelerator_type=UNKNOWN) == []
    assert resource_violations("ember-allowed-accelerators", DEPLOYMENT, None, **base,
                               accelerator_type="NVIDIA_H200_141GB") == []  # default: every type


def test_gpus_and_replicas_per_deployment():
    base = dict(account_id="acme", base_model=CATALOG_BASE, accelerator_type="NVIDIA_H100_80GB")
    [message] = resource_violations("ember-max-gpus-per-deployment", DEPLOYMENT, None, **base,
                                    accelerator_count=8, max_replicas=4)
    assert "8 x max_replicas 4 = 32 accelerators" in message and "maximum of 16" in message
    assert resource_violations("ember-max-gpus-per-deployment", DEPLOYMENT, {"maximum": 32}, **base,
                               accelerator_count=8, max_replicas=4) == []
    assert resource_violations("ember-max-gpus-per-deployment", DEPLOYMENT, None, **base,
                               accelerator_count=8, max_replicas=UNKNOWN_NUMBER_VALUE) == []
    assert resource_violations("ember-max-gpus-per-deployment", DEPLOYMENT, None, account_id="acme",
                               base_model=CATALOG_BASE, max_replicas=64) == []  # CPU replicas hold no GPU
    [message] = resource_violations("ember-max-replicas", DEPLOYMENT, {"maximum": 4}, **base, max_replicas=5)
    assert "max_replicas 5 is above this policy's maximum of 4" in message


def test_request_log_retention():
    base = dict(account_id="acme", base_model=CATALOG_BASE)
    [message] = resource_violations("ember-request-logging-retention", DEPLOYMENT, {"maxRetentionDays": 7}, **base,
                                    request_logging={"enabled": True, "retention_days": 30})
    assert "retention_days 30 is above this policy's maximum of 7 days" in message
    for logging in ({"enabled": True, "retention_days": 7}, {"enabled": False},
                    {"enabled": True, "retention_days": UNKNOWN_NUMBER_VALUE}):
        assert resource_violations("ember-request-logging-retention", DEPLOYMENT, {"maxRetentionDays": 7}, **base,
                                   request_logging=logging) == []


def test_gpus_per_stack_count_what_is_known():
    stack = Stack()
    for i in range(3):
        stack.add(DEPLOYMENT, f"d{i}", account_id="acme", base_model=CATALOG_BASE,
                  accelerator_type="NVIDIA_H100_80GB", accelerator_count=8, max_replicas=3)
    stack.add(DEPLOYMENT, "unknown", account_id="acme", base_model=CATALOG_BASE, accelerator_type="NVIDIA_H100_80GB",
              accelerator_count=UNKNOWN_NUMBER_VALUE, max_replicas=8)
    [(message, _)] = stack_violations("ember-max-gpus-per-stack", stack)
    assert "72 accelerators" in message and "maximum of 64 per stack" in message
    assert stack_violations("ember-max-gpus-per-stack", stack, {"maximum": 72}) == []


# ember-account-gpu-quota: two other stacks' records in a store, and this stack's declared deployments

THIS_STACK = "organization/team/dev"
H100 = "NVIDIA_H100_80GB"


def _record(name: str, owner: str | None, **inputs) -> DeploymentRecord:
    account = name.split("/")[1]
    return DeploymentRecord(name=name, base_model=CATALOG_BASE, owner=owner,
                            inputs={"account_id": account, "base_model": CATALOG_BASE, **inputs})


@pytest.fixture
def quota_store(tmp_path):
    """acme: 16 + 2 accelerators in the chat team's stack; this stack's `train` (16) as its last up left it, from
    before records had owners (matched by name), and `old` (32), which it no longer declares (matched by owner);
    globex's 64; the platform's serverless deployment (8), which acme's addons ride."""
    url = f"file://{tmp_path / 'store'}"
    store = Store(url, tmp_path / "locks")
    for record in (
            _record("accounts/acme/deployments/chat", "organization/chat/prod/chat", accelerator_type=H100,
                    accelerator_count=8, max_replicas=2),
            _record("accounts/acme/deployments/embed", "organization/chat/prod/embed", accelerator_type=H100,
                    accelerator_count=2, max_replicas=1),
            _record("accounts/acme/deployments/cpu-only", "organization/chat/prod/cpu", max_replicas=8),
            _record("accounts/acme/deployments/train", None, accelerator_type=H100, accelerator_count=8,
                    max_replicas=2),
            _record("accounts/acme/deployments/old", f"{THIS_STACK}/old", accelerator_type=H100, accelerator_count=8,
                    max_replicas=4),
            _record("accounts/globex/deployments/big", "organization/globex/prod/big", accelerator_type=H100,
                    accelerator_count=8, max_replicas=8),
            _record("accounts/platform/deployments/llama-8b-serverless", "organization/platform/prod/llama",
                    deployment_type="serverless", accelerator_type=H100, accelerator_count=1, max_replicas=8)):
        store.write_deployment_record(record)
    return url


def declared(name: str, account: str, count, replicas, **props) -> dict:
    """A Deployment's props as the program registers them, its owner (this stack's resource) among its references."""
    return dict(account_id=account, deployment_id=name, base_model=CATALOG_BASE, accelerator_type=H100,
                accelerator_count=count, max_replicas=replicas,
                references={"owner": f"{THIS_STACK}/{name}", "base_model": {"declared": False}}, **props)


def declare(stack: Stack, name: str, account: str, count, replicas, **props):
    return stack.add(DEPLOYMENT, name, **declared(name, account, count, replicas, **props))


def quota(stack, config):
    return [message for message, _ in stack_violations("ember-account-gpu-quota", stack, config)]


def test_an_account_quota_counts_every_stack_of_the_store_once(quota_store):
    stack = Stack()
    declare(stack, "train", "acme", 8, 2)  # its own record, now as declared: counted once
    declare(stack, "later", "acme", UNKNOWN_NUMBER_VALUE, 4)  # judged once known
    declare(stack, "embed", "acme", UNKNOWN_NUMBER_VALUE, 1)  # taken over from the chat team: its record is not counted
    # acme: train 16 (this stack) + chat 16 = 32; counting train's record again or the removed `old` would make
    # it 48 or 64, embed's record 34, and globex's or the platform's serverless GPUs 96 or 40
    assert quota(stack, {"storeUrl": quota_store, "accounts": {"acme": 32}}) == []
    [message] = quota(stack, {"storeUrl": quota_store, "default": 31})
    assert message == ("account acme: its deployments may hold 32 accelerators at max_replicas across every stack of "
                       "the store (16 in this stack, 16 in others), above its quota of 31 (the default); the largest: "
                       "accounts/acme/deployments/chat 16, accounts/acme/deployments/train 16 (this stack)")
    stack.resources.pop()  # without the takeover, embed's record counts
    [message] = quota(stack, {"storeUrl": quota_store, "default": 33})
    assert "34 accelerators" in message and message.endswith("accounts/acme/deployments/embed 2")
    assert "organization/chat" not in message and "globex" not in message  # other stacks by deployment name only
    [message] = quota(stack, {"storeUrl": quota_store, "default": 100, "accounts": {"acme": 20.0}})  # engine floats
    assert "34 accelerators" in message and "above its quota of 20;" in message


def test_another_accounts_gpus_count_against_that_account_only(quota_store):
    stack = Stack()
    declare(stack, "train", "acme", 8, 2)
    # globex holds 64 against a default of 10, but this stack adds nothing to globex: it is not this stack's to answer
    assert quota(stack, {"storeUrl": quota_store, "default": 10, "accounts": {"acme": 34}}) == []
    declare(stack, "small", "globex", 1, 1)
    [message] = quota(stack, {"storeUrl": quota_store, "default": 10, "accounts": {"acme": 34}})
    assert message.startswith("account globex: its deployments may hold 65 accelerators") and "acme" not in message
    # a serverless deployment counts towards the account that declares it (the platform), not the tenants on it
    platform = Stack()
    declare(platform, "llama-8b-serverless", "platform", 1, 16, deployment_type="serverless")
    [message] = quota(platform, {"storeUrl": quota_store, "accounts": {"platform": 8, "acme": 0}})
    assert message.startswith("account platform: its deployments may hold 16 accelerators") and \
        "(16 in this stack, 0 in others)" in message
    cpu = Stack()
    cpu.add(DEPLOYMENT, "cpu", account_id="acme", deployment_id="cpu", base_model=CATALOG_BASE, max_replicas=8)
    assert quota(cpu, {"storeUrl": quota_store, "default": 0}) == []  # CPU replicas hold no accelerator


def test_the_quota_store_is_read_once_and_fails_closed(quota_store, tmp_path, monkeypatch):
    stack = Stack()
    declare(stack, "train", "acme", 8, 2)
    reads = []
    records = Store.deployment_records
    monkeypatch.setattr(Store, "deployment_records", lambda self: reads.append(self.url) or records(self))
    assert quota(stack, {"storeUrl": quota_store, "default": 64}) == [] and reads == [quota_store]
    # a store that does not exist yet holds no deployment
    assert quota(stack, {"storeUrl": f"file://{tmp_path / 'fresh'}", "default": 16}) == []
    # one that cannot be read is a violation naming its URL
    [message] = quota(stack, {"storeUrl": "nosuch://bucket/store", "default": 64})
    assert message.startswith("the store nosuch://bucket/store cannot be read (ValueError: ")
    broken = tmp_path / "store" / "deployments" / "acme" / "chat" / "deployment.json"
    broken.write_text("{not json")
    [message] = quota(stack, {"storeUrl": quota_store, "default": 64})
    assert message.startswith(f"the store {quota_store} cannot be read (JSONDecodeError")
    # nothing to judge (no quota for the accounts it adds to): the store is not even read
    reads.clear()
    assert quota(stack, {"storeUrl": "nosuch://bucket/store", "accounts": {"globex": 1}}) == [] and reads == []


def test_the_quota_store_comes_from_the_stack_or_the_environment(quota_store, monkeypatch):
    stack = Stack()
    declare(stack, "train", "acme", 8, 2)
    for name in ("EMBER_STORE_URL", "EMBER_STATE_DIR"):
        monkeypatch.delenv(name, raising=False)
    # the pack runs in its own folder: the store beside the program is one it cannot find, and says so
    [message] = quota(stack, {"default": 20})
    assert message.startswith("no store to read: the store beside the program (.ember/store") and "storeUrl" in message
    monkeypatch.setenv("EMBER_STATE_DIR", "relative/state")  # relative to the program, which the pack cannot see
    assert quota(stack, {"default": 20})[0].startswith("no store to read")
    monkeypatch.setenv("EMBER_STORE_URL", quota_store)
    [message] = quota(stack, {"default": 20})
    assert "34 accelerators" in message
    monkeypatch.delenv("EMBER_STORE_URL")
    monkeypatch.setenv("EMBER_STATE_DIR", quota_store.removeprefix("file://").removesuffix("/store"))
    assert "34 accelerators" in quota(stack, {"default": 20})[0]


def test_a_bad_quota_config_is_refused_naming_the_field_and_value(quota_store):
    import jsonschema

    stack = Stack()
    declare(stack, "train", "acme", 8, 2)
    for config, expected in (({"default": -1}, "policy config: default: -1 is not a number of accelerators"),
                             ({"accounts": {"acme": 2.5}}, "policy config: accounts.acme: 2.5 is not a number"),
                             ({"accounts": {"Acme_Corp": 8}},
                              "policy config: accounts.Acme_Corp: 'Acme_Corp' is not a valid account ID: use 1-63"),
                             ({"storeUrl": ""}, "policy config: storeUrl: '' is not a store URL")):
        [message] = quota(stack, {"storeUrl": quota_store} | config)
        assert message.startswith(expected), message
        # the engine refuses the same config by the policy's schema before the pack runs
        schema = policy("ember-account-gpu-quota").config_schema
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(config, {"type": "object", "properties": schema.properties})
    schema = policy("ember-account-gpu-quota").config_schema
    jsonschema.validate(json.loads((REPO / "examples/policy/policy-config.json").read_text())["ember-account-gpu-quota"],
                        {"type": "object", "properties": schema.properties})


def test_ember_preview_hands_the_pack_the_stacks_store(quota_store):
    """The offline runner starts the pack with the stack's store as EMBER_STORE_URL: the pack runs in its own folder."""
    properties = struct_pb2.Struct()
    properties.update({"__provider": "serialized-provider", **declared("train", "acme", 8, 2)})
    registrations = [Registration(DEPLOYMENT, "train", f"urn:pulumi:dev::team::{DEPLOYMENT}::train", properties)]
    config = {"ember-account-gpu-quota": {"default": 20}}
    [violation] = run_pack(PACK, registrations, config, store_url=quota_store)
    assert violation.policy == "ember-account-gpu-quota" and violation.mandatory
    assert violation.message.startswith("account acme: its deployments may hold 34 accelerators")
    assert run_pack(PACK, registrations, {"ember-account-gpu-quota": {"default": 34}}, store_url=quota_store) == []
    [violation] = run_pack(PACK, registrations, config)  # no store for the pack: it says so, and fails closed
    assert violation.message.startswith("no store to read")


def test_serverless_addons_only_on_bases_that_take_them():
    stack = Stack()
    big = stack.add(MODEL, "big", account_id="platform", catalog_id="llama-v3p1-405b-instruct")
    refused = stack.add(ADDON, "refused", {"base_model": [big]}, account_id="acme", base_model=UNKNOWN, source="p",
                        serverless=True)
    stack.add(ADDON, "taken", account_id="acme", base_model=CATALOG_BASE, source="p", serverless=True)
    stack.add(ADDON, "dedicated-only", account_id="acme", base_model=NOT_FOR_ADDONS, source="p")
    [(message, urn)] = stack_violations("ember-serverless-addons", stack)
    assert urn == refused.urn and "llama-v3p1-405b-instruct" in message and "llama-v3p1-8b-instruct" in message
    narrowed = stack_violations("ember-serverless-addons", stack, {"bases": ["llama-v3p1-70b-instruct"]})
    assert len(narrowed) == 2  # the platform team may narrow the list


def test_serverless_uses_of_deprecated_models_are_reported_advisory_by_default(monkeypatch):
    """Issue 34: the catalog file's dates come in each resource's references (the pack sees no `ember:` config)."""
    from datetime import date

    from pulumi_policy import EnforcementLevel

    from ember.provider.domain import catalog_lifecycle

    assert policy("ember-no-deprecated-serverless-models").enforcement_level == EnforcementLevel.ADVISORY
    dates = {"model": "llama-v3p1-8b-instruct", "deprecation_date": "2027-01-01", "shutdown_date": "2027-01-15"}
    shared = dict(account_id="platform", base_model=CATALOG_BASE, deployment_type="serverless",
                  references={"base_model_lifecycle": dates})
    addon = dict(account_id="acme", base_model=CATALOG_BASE, source="p", serverless=True,
                 references={"base_model_lifecycle": dates})
    name = "ember-no-deprecated-serverless-models"
    for day, expected in [(date(2026, 12, 31), None),
                          (date(2027, 1, 1), "llama-v3p1-8b-instruct is deprecated for serverless use: it shuts "
                                             "down on 2027-01-15"),
                          (date(2027, 1, 15), "llama-v3p1-8b-instruct was shut down for serverless use on 2027-01-15")]:
        monkeypatch.setattr(catalog_lifecycle, "today", lambda: day)
        found = resource_violations(name, DEPLOYMENT, **shared) + resource_violations(name, ADDON, **addon)
        assert found == ([] if expected is None else [f"Deployment r: {expected}; move it to another catalog model, "
                                                      f"or to a dedicated deployment",
                                                      f"LoRAAddon r: {expected}; move it to another catalog model, "
                                                      f"or to a dedicated deployment"])
        # dedicated use, and resources without dates (no catalog file) are not its business
        assert resource_violations(name, DEPLOYMENT, **(shared | {"deployment_type": "dedicated"})) == []
        assert resource_violations(name, ADDON, **(addon | {"serverless": False})) == []
        assert resource_violations(name, DEPLOYMENT, **(shared | {"references": {}})) == []


# ---------------------------------------------------------------------------------------------------------
# the pack as the engine runs it: examples pass, bad stacks fail


BAD_PROGRAM = '''
from ember.provider.resources import *
custom = Model("custom", ModelArgs(account_id="acme", source="models/base"))
other = Model("other", ModelArgs(account_id="acme", source="models/base"))
big = Deployment("big", DeploymentArgs(account_id="acme", base_model=other, accelerator_type="NVIDIA_H200_141GB",
                 accelerator_count=8, max_replicas=4, request_logging=RequestLoggingArgs(enabled=True, retention_days=90),
                 cluster="kubernetes"))  # (the local cluster's check would refuse the GPUs before the pack ran)
# by name: a Deployment object would let the addon's own check refuse the other base before the pack ran
LoRAAddon("pirate", LoRAAddonArgs(account_id="acme", base_model=custom, source="models/pirate",
                                  deployments=["accounts/acme/deployments/big"]))
'''


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    program = tmp_path_factory.mktemp("policy") / "quickstart"
    shutil.copytree(REPO / "examples/quickstart", program, ignore=shutil.ignore_patterns(".ember", "models"))
    assert cli.main(["quickstart", "--stack", str(program / "stack.json")]) == 0
    return program


@pytest.mark.slow
def test_the_examples_pass_the_pack(quickstart, tmp_path, capsys):
    guardrails = ["--policy-pack", "ember", "--policy-pack-config", str(REPO / "examples/policy/policy-config.json")]
    assert cli.main(["preview", str(quickstart), "--offline", *guardrails]) == 0
    assert "8 resources, 0 mandatory and 0 advisory violations" in capsys.readouterr().out

    serverless = tmp_path / "serverless"
    shutil.copytree(REPO / "examples/serverless", serverless, ignore=shutil.ignore_patterns(".ember", "models"))
    for name in ("support-bot", "legal-drafts"):
        shutil.copytree(quickstart / "models" / "smollm2-poet", serverless / "tenant" / "models" / name)
    assert cli.main(["preview", str(serverless / "platform"), "--offline", *guardrails]) == 0
    assert "3 resources, 0 mandatory" in capsys.readouterr().out
    # a tenant's stack reads the platform's gateway, which is in the store once the platform's stack is up
    spec = GatewaySpec(account_id="platform", gateway_id="gateway")
    Store(f"file://{serverless / '.ember' / 'store'}", tmp_path / "locks").write_gateway_record(GatewayRecord(
        name=spec.name, spec=spec.model_dump(mode="json"), inputs=spec.model_dump(mode="json", exclude_none=True)))
    assert cli.main(["preview", str(serverless / "tenant"), "--stack", "acme", "--offline", *guardrails]) == 0
    assert "1 resource, 0 mandatory" in capsys.readouterr().out

    from tests.provider.test_kubernetes import run_example

    cluster = run_example(preview=True)
    types = {r.type for r in cluster.monitor.registrations}
    assert DEPLOYMENT in types and "kubernetes:apps/v1:Deployment" in types
    # its GPUs count towards its account's quota: against the stack's store, here one with no other deployment
    assert run_pack(PACK, cluster.monitor.registrations, json.loads((REPO / "examples/policy/policy-config.json").read_text()),
                    store_url=f"file://{tmp_path / 'cluster-store'}") == []


@pytest.mark.slow
def test_a_bad_stack_fails_with_messages_a_user_can_act_on(tmp_path, capsys):
    program = tmp_path / "bad"
    program.mkdir()
    from ember.runtime.devtools import tinymodels

    base = tinymodels.make_model(program / "models" / "base", "tiny")
    tinymodels.make_lora(base, program / "models" / "pirate")
    (program / "Pulumi.yaml").write_text("name: bad\nruntime: python\n")
    (program / "__main__.py").write_text(BAD_PROGRAM)
    config = tmp_path / "policy-config.json"
    config.write_text(json.dumps({"ember-allowed-accelerators": {"allowed": ["CPU", "NVIDIA_H100_80GB"]},
                                  "ember-max-replicas": "advisory"}))
    code = cli.main(["preview", str(program), "--offline", "--policy-pack", str(PACK),
                     "--policy-pack-config", str(config)])
    out = capsys.readouterr().out
    assert code == 1
    assert "[mandatory] ember-allowed-accelerators (big): accelerator_type 'NVIDIA_H200_141GB' is not allowed" in out
    assert "[mandatory] ember-max-gpus-per-deployment (big): accelerator_count 8 x max_replicas 4 = 32" in out
    assert "[mandatory] ember-request-logging-retention (big): request_logging.retention_days 90" in out
    assert "[mandatory] ember-addons-on-their-base-deployments (pirate): LoRAAddon pirate: deployments: " \
           "accounts/acme/deployments/big serves base model accounts/acme/models/other" in out
    assert "[mandatory] ember-monthly-budget: the stack's deployments are estimated at $116,800.00/month" in out
    assert "5 resources" not in out and "4 resources, 5 mandatory and 0 advisory violations" in out


def test_a_bad_policy_config_is_refused_by_name(tmp_path):
    from ember.provider.policy.check import PolicyPackError, _policy_config

    with pytest.raises(PolicyPackError, match="ember-max-replicas.enforcementLevel 'sometimes'"):
        _policy_config({"ember-max-replicas": {"enforcementLevel": "sometimes"}})


def test_configured_integers_print_as_integers():
    """The engine hands policy config over as floats: a message says "maximum of 8", not "8.0"."""
    [message] = resource_violations("ember-max-replicas", DEPLOYMENT, {"maximum": 8.0}, account_id="acme",
                                     deployment_id="d", base_model=CATALOG_BASE, max_replicas=9)
    assert message.endswith("above this policy's maximum of 8")


def test_model_ids_are_unique_across_models_and_addons():
    stack = Stack()
    stack.add(MODEL, "first", account_id="acme", model_id="shared", source="a")
    stack.add(ADDON, "second", account_id="acme", model_id="shared", base_model="accounts/acme/models/x", source="p")
    stack.add(MODEL, "unknown-id", account_id="acme", model_id=UNKNOWN, source="b")
    [(message, urn)] = stack_violations("ember-unique-model-ids", stack)
    assert message == ("LoRAAddon second: model_id: accounts/acme/models/shared is already declared by Model first; "
                       "model IDs are globally unique, base models and addons alike") and urn.endswith("::second")


def test_an_addon_rank_above_its_deployments_max_lora_rank(tmp_path):
    from ember.runtime.devtools import tinymodels

    base = tinymodels.make_model(tmp_path / "base", "tiny")
    big = tinymodels.make_lora(base, tmp_path / "big", rank=16)
    stack = Stack()
    small = stack.add(DEPLOYMENT, "small", account_id="acme", deployment_id="small", base_model="accounts/acme/models/b",
                      max_lora_rank=8)
    stack.add(ADDON, "big", {"deployments": [small]}, account_id="acme", model_id="big",
              base_model="accounts/acme/models/b", source=str(big), deployments=[UNKNOWN])
    [(message, _)] = stack_violations("ember-addons-on-their-base-deployments", stack)
    assert message.startswith("LoRAAddon big: source: rank 16 is above accounts/acme/deployments/small's max_lora_rank 8")
