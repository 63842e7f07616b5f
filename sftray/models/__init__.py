"""Model assets: offline tiny tokenizer and tiny Llama config for fast CPU experiments."""
