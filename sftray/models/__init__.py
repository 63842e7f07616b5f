"""Base models and tokenizers: loading, LoRA, the offline tiny tokenizer and pretrained tiny Llama, build-once caches."""
