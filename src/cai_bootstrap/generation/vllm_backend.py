"""Generation on vLLM (``generation.backend: vllm``; GPUs, tensor parallel): the same ``generate`` and
``stats`` as :class:`~cai_bootstrap.generation.engine.Engine`, and the same records.

Prompts are tokenized by us (plain text, BOS only when asked) and handed to vLLM as token ids; vLLM's
generated token ids go through the HF engine's own :func:`~cai_bootstrap.generation.engine.finish`, so
cleaning, stop strings and finish reasons are decided by one function whatever the backend. vLLM is
told the stop strings and the tokenizer's EOS ids only so that it stops early.

vLLM is an optional extra (``pip install '.[vllm]'``) and is imported only when this backend is chosen.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from .engine import Decoding, Generation, GenerationStats, encode_prompts, finish

INSTALL_HINT = "pip install '.[vllm]'"


class BackendUnavailable(UserError, RuntimeError):
    """The configured generation backend cannot run here."""


def require_vllm() -> None:
    try:
        importlib.import_module("vllm")
    except ModuleNotFoundError as e:
        if e.name != "vllm":
            raise  # installed but broken: the real error says more than a hint would
        raise BackendUnavailable(f"generation.backend is vllm but vllm is not installed: {INSTALL_HINT} "
                                 f"(GPU machines), or set generation.backend: hf") from None


def eos_ids(tokenizer) -> list[int]:
    ids = tokenizer.eos_token_id
    return sorted(set(ids) if isinstance(ids, list) else {ids})


def sampling_params(decoding: Decoding, eos: Sequence[int], index: int) -> dict[str, Any]:
    """vLLM ``SamplingParams`` arguments for prompt ``index``: temperature 0 is greedy; a sampled run
    seeds every prompt on its own, so results do not depend on how vLLM batches them."""
    return {
        "max_tokens": decoding.max_new_tokens,
        "temperature": decoding.temperature,
        "top_p": decoding.top_p if not decoding.greedy else 1.0,
        "seed": None if decoding.greedy else decoding.seed * 100003 + index,
        "stop": list(decoding.stop_strings),
        "include_stop_str_in_output": True,  # finish() cuts the text itself, from the token ids
        "stop_token_ids": list(eos),
        "skip_special_tokens": False,  # like the HF engine, which decodes special tokens as text
    }


def to_generations(tokenizer, outputs: Sequence[Any], prompt_lengths: Sequence[int],
                   stops: Sequence[str]) -> list[Generation]:
    """vLLM ``RequestOutput``s (first completion's ``token_ids``) to our Generations, through ``finish``."""
    return [finish(tokenizer, list(o.outputs[0].token_ids), stops, n) for o, n in zip(outputs, prompt_lengths,
                                                                                        strict=True)]


@dataclass
class VLLMEngine:
    """Generation over a ``vllm.LLM``; ``batch_size`` is left to vLLM's scheduler."""

    llm: Any
    tokenizer: Any
    add_bos: bool = False
    stats: GenerationStats = field(default_factory=GenerationStats)

    @classmethod
    def load(cls, model_dir: str | Path, tokenizer, *, tensor_parallel_size: int = 1, dtype: str = "auto",
             add_bos: bool = False) -> VLLMEngine:
        require_vllm()
        import vllm

        llm = vllm.LLM(model=str(model_dir), tokenizer=str(model_dir), dtype=dtype,
                       tensor_parallel_size=tensor_parallel_size)
        return cls(llm, tokenizer, add_bos)

    def generate(self, prompts: Sequence[str], decoding: Decoding,
                 progress: Callable[[int, int], None] | None = None) -> list[Generation]:
        from vllm import SamplingParams

        encoded = encode_prompts(self.tokenizer, prompts, self.add_bos)
        eos = eos_ids(self.tokenizer)
        params = [SamplingParams(**sampling_params(decoding, eos, i)) for i in range(len(prompts))]
        t0 = time.perf_counter()
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded], sampling_params=params,
                                    use_tqdm=False)
        elapsed = time.perf_counter() - t0
        gens = to_generations(self.tokenizer, outputs, [len(ids) for ids in encoded], decoding.stop_strings)
        tokens = sum(g.completion_tokens for g in gens)
        self.stats.prompts += len(prompts)
        self.stats.completion_tokens += tokens
        self.stats.seconds += elapsed
        self.stats.batches += 1
        self.stats.prompt_tokens += sum(len(ids) for ids in encoded)
        self.stats.padded_prompt_tokens += sum(len(ids) for ids in encoded)  # paged attention: no padding
        if progress:
            progress(len(prompts), tokens)
        return gens

    def close(self) -> None:
        """Drop the engine and return GPU memory (best effort: vLLM keeps some state per process)."""
        import gc

        import torch

        self.llm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
