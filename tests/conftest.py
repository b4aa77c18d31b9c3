import os

import pytest

# Replicas the tests start run eagerly (compiling each would cost 5-25 s a start); test_compiled_step.py
# compiles on purpose, a replica included.
os.environ.setdefault("EMBER_COMPILE", "0")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow (CI does)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random Llama directory shared by the tests that only read it."""
    from ember.runtime.devtools import tinymodels

    return tinymodels.make_model(tmp_path_factory.mktemp("models") / "tiny-llama", "tiny", seed=0)
