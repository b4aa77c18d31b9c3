"""Shared helpers for runtime tests: tiny models with peaked logits and their transformers twins."""

import inspect

import torch

from ember.runtime.devtools import tinymodels

# Random weights with std 0.02 give near-uniform logits where greedy ties flip on rounding; 0.1 gives
# clear winners, so token-for-token comparisons test the model rather than the last bit of fp32.
SHARP = {"init_std": 0.1}


def make(path, **overrides):
    return tinymodels.make_model(path, "tiny", seed=11, **(SHARP | overrides))


def hf_model(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def peft_model(base, adapter):
    """PEFT's model of a base directory with one adapter, its load-time warnings silenced."""
    import warnings

    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(hf_model(base), adapter).eval()


def peft_logits(base, adapter, tokens):
    """PEFT's logits of every position of `tokens` [len, vocab]: the reference for an adapter's."""
    with torch.no_grad():
        return peft_model(base, adapter)(torch.tensor([tokens])).logits[0]


def hf_greedy(model, prompt, max_tokens):
    """transformers' greedy decoding with its own KV cache, never stopping at EOS (like ignore_eos).

    generate() cannot do that: min_new_tokens masks the EOS logits, which changes the argmax.
    """
    # transformers 5.x renames past_key_values to cache.
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    tokens = []
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(max_tokens):
            tokens.append(int(out.logits[0, -1].argmax()))
            state = getattr(out, name, None) or out.past_key_values
            out = model(torch.tensor([[tokens[-1]]]), use_cache=True, **{name: state})
    return tokens
