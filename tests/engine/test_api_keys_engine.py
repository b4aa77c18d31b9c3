"""An ApiKey under the real Pulumi engine: its key is a secret output (encrypted in the stack's state, shown only with
--show-secrets), the store holds its hash, a rotation is planned and made create-before-delete, and destroy revokes."""

import json

import pytest
from tests.engine.engine_helpers import EngineStack, requires_pulumi

from ember.provider.domain.accounts import Accounts

pytestmark = [pytest.mark.engine, pytest.mark.slow, requires_pulumi]

PROGRAM = '''
import pulumi
from ember.provider import ApiKey, ApiKeyArgs
key = ApiKey("ci", ApiKeyArgs(account_id="acme", role="admin", rotation="ROTATION"))
pulumi.export("key", key.key)
pulumi.export("hint", key.key_hint)
'''


def test_an_api_keys_key_is_a_secret_in_the_engines_state_and_rotation_replaces_it_create_first(tmp_path):
    program = tmp_path / "keys"
    program.mkdir()
    (program / "Pulumi.yaml").write_text("name: keys\nruntime: python\n")
    (program / "__main__.py").write_text(PROGRAM.replace("ROTATION", "one"))
    stack = EngineStack(program, tmp_path / "engine")
    keys_file = program / ".ember" / "store" / "keys.json"
    try:
        stack.up()
        key = json.loads(stack.pulumi("stack", "output", "--json", "--show-secrets").stdout)["key"]
        assert json.loads(stack.pulumi("stack", "output", "--json").stdout)["key"] == "[secret]"
        exported = stack.pulumi("stack", "export").stdout
        assert key.startswith("ek-") and key not in exported  # encrypted in the state: only ciphertext there
        resource = next(r for r in json.loads(exported)["deployment"]["resources"] if r["urn"].endswith("::ci"))
        assert "ciphertext" in resource["outputs"]["key"]
        assert key not in keys_file.read_text()
        caller = Accounts.load(keys_file).authenticate(key)
        assert (caller.key_id, caller.role) == ("accounts/acme/apiKeys/ci", "admin")

        (program / "__main__.py").write_text(PROGRAM.replace("ROTATION", "two"))
        planned = json.loads(stack.pulumi("preview", "--json").stdout)["steps"]
        assert [(s["op"], s["replaceReasons"]) for s in planned if s["urn"].endswith("::ci")] == [("replace", ["rotation"])]
        out = stack.up().stdout
        # the new key is made before the old one is revoked
        assert out.index("ApiKey ci created replacement") < out.index("ApiKey ci deleting original"), out
        new = json.loads(stack.pulumi("stack", "output", "--json", "--show-secrets").stdout)["key"]
        accounts = Accounts.load(keys_file)
        assert new != key and accounts.authenticate(key) is None and accounts.authenticate(new) is not None
    finally:
        stack.pulumi("destroy", "--yes", check=False)
    assert Accounts.load(keys_file).records == []  # destroy revoked it
