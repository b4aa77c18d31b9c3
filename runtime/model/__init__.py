"""The Llama-family model: config.json, weights, the forward pass, attention, sampling and the tokenizer."""
