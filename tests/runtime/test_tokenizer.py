"""Tokenizer and chat templates agree with transformers; streamed text equals decoded text."""

import random

import pytest

from ember.provider.domain.model_files import ModelFilesError
from ember.runtime.devtools import tinymodels
from ember.runtime.model.tokenizer import IncrementalDetokenizer, TextTokenizer

transformers = pytest.importorskip("transformers")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo, wörld! 42"},
            {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "again"}]


@pytest.mark.parametrize("template_file", [False, True])
def test_encode_decode_and_chat_match_transformers(tmp_path, template_file):
    directory = tinymodels.make_model(tmp_path / "m", chat_template_file=template_file)
    ours, theirs = TextTokenizer.from_dir(directory), transformers.AutoTokenizer.from_pretrained(directory)
    text = "The pirate's poem: 🦜 ünïcode & tabs\t!"
    assert ours.encode(text) == theirs(text).input_ids
    assert ours.decode(ours.encode(text)) == theirs.decode(theirs(text).input_ids, skip_special_tokens=True) == text
    assert ours.render_chat(MESSAGES) == theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    expected = theirs.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert ours.encode_chat(MESSAGES) == list(expected)
    assert ours.encode_chat(MESSAGES).count(ours.token_id(tinymodels.BOS)) == 1


def test_incremental_detokenizer_streams_exactly_the_decoded_text(tiny_model):
    tokenizer = TextTokenizer.from_dir(tiny_model)
    rng = random.Random(0)
    for _ in range(20):
        prompt = tokenizer.encode("Héllo 🦜 world")
        ids = tokenizer.encode("ünï 🦜🦜 code, the sea!" * 2, add_special_tokens=False)
        ids += [rng.randrange(tokenizer.vocab_size) for _ in range(10)]
        stream = IncrementalDetokenizer(tokenizer, prompt)
        text = "".join(stream.add(t) for t in ids)
        full = tokenizer.decode(ids)
        assert full.startswith(text) and set(full[len(text):]) <= {"\ufffd"}  # only unfinished bytes are held


def test_template_errors_and_missing_files(tmp_path, tiny_model):
    tokenizer = TextTokenizer.from_dir(tiny_model)
    bad = TextTokenizer(tokenizer.tokenizer, {}, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="messages: the chat template refused them: roles must alternate"):
        bad.render_chat(MESSAGES)
    with pytest.raises(ValueError, match="no chat template"):
        TextTokenizer(tokenizer.tokenizer, {}, None).render_chat(MESSAGES)
    with pytest.raises(ModelFilesError, match="tokenizer.json is missing"):
        TextTokenizer.from_dir(tmp_path)
