import pytest

from ember.provider.domain import catalog
from ember.provider.domain.store_layout import StoreLayout

# Published parameter counts (the models' safetensors index totals / model cards).
PUBLISHED = {
    "llama-v3p1-8b-instruct": 8_030_261_248,
    "llama-v3p1-70b-instruct": 70_553_706_496,
    "llama-v3p1-405b-instruct": 405_853_388_800,
    "llama-v3p2-1b-instruct": 1_235_814_400,
    "llama-v3p2-3b-instruct": 3_212_749_824,
    "qwen2p5-7b-instruct": 7_615_616_512,
    "mistral-7b-instruct-v0p3": 7_248_023_552,
    "qwen3-8b": 8_190_735_360,
    "gemma2-9b-it": 9_241_705_984,
    "phi-3-mini-4k-instruct": 3_821_079_552,
    "mixtral-8x7b-instruct": 46_702_792_704,
    "qwen3-30b-a3b": 30_532_122_624,
}
# Mixture of Experts: the parameters one token reads, as the model cards round them (billions)
ACTIVE = {"mixtral-8x7b-instruct": 12.9}


@pytest.mark.parametrize("model_id, count", PUBLISHED.items())
def test_parameter_counts_match_the_published_models(model_id, count):
    assert catalog.lookup(model_id).parameter_count == count


@pytest.mark.parametrize("model_id, count", ACTIVE.items())
def test_mixture_of_experts_active_parameters(model_id, count):
    assert round(catalog.lookup(model_id).dims.active_parameter_count / 1e9, 1) == count


def test_catalog_entries_point_into_the_store():
    assert set(PUBLISHED) == set(catalog.CATALOG)
    assert StoreLayout("s3://bucket/ember").catalog("llama-v3p1-8b-instruct") == "s3://bucket/ember/catalog/llama-v3p1-8b-instruct"
    assert catalog.lookup("not-a-model") is None
