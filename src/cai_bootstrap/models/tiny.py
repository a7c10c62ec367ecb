"""A tiny randomly initialised Llama with a real tokenizer: for tests and benchmark smoke runs."""

from __future__ import annotations

from pathlib import Path


def save_tiny_llama(out_dir: str | Path, tokenizer_source: str | Path, *, initializer_range: float = 0.02,
                    seed: int = 0) -> Path:
    """2 layers, hidden 64, the tokenizer's full vocabulary; saved like a real model folder.

    A larger ``initializer_range`` (e.g. 0.1) makes greedy outputs differ from prompt to prompt; at
    the default every prompt tends to repeat one token.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_source)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, initializer_range=initializer_range,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    LlamaForCausalLM(config).save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir
