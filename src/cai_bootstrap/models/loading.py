"""Resolve a model spec, load it (optionally quantized, optionally with adapters), fingerprint, free.

A spec is an embedded name (``smollm2-135m``), a local folder, or a hub id (``Qwen/Qwen2.5-0.5B``).
Quantized loading goes through bitsandbytes; when it is impossible the load fails with a clear
message unless the caller allows a full-precision fallback, which is then recorded. Adapters are
merged into full-precision weights and kept unmerged on quantized ones (:mod:`.adapters`).
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from .adapters import apply_adapters
from .embedded import EMBEDDED, ModelNotAvailable, prepare

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@dataclass(frozen=True)
class ResolvedModel:
    spec: str
    path: Path
    kind: str  # embedded | local | hub


def _looks_like_hub_id(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~"))


_shadow_noted: set[str] = set()


def resolve(spec: str) -> ResolvedModel:
    if spec in EMBEDDED:
        folder, _ = prepare(spec)
        return ResolvedModel(spec, folder, "embedded")
    local = Path(spec).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelNotAvailable(f"{local} is not a model folder (no config.json)")
        if _looks_like_hub_id(spec) and spec not in _shadow_noted:
            _shadow_noted.add(spec)  # once per process: a run loads its model many times
            from ..console import console

            console.print(f"[yellow]note: model {spec!r} is the local folder {local.resolve()}, not the hub model "
                          f"of that name (a folder of that name here shadows it)[/]", highlight=False, soft_wrap=True)
        return ResolvedModel(spec, local.resolve(), "local")
    if _looks_like_hub_id(spec):
        return ResolvedModel(spec, _hub_snapshot(spec), "hub")
    raise ModelNotAvailable(
        f"model {spec!r} is neither an embedded name ({', '.join(EMBEDDED)}), a local folder, nor a hub id (org/name)"
    )


def _hub_snapshot(repo_id: str) -> Path:
    """Download (or find in the local hub cache) a hub model; fail with a clear message offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(repo_id, local_files_only=offline, cache_dir=os.environ.get("HF_HUB_CACHE"),
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except LocalEntryNotFoundError as e:
        raise ModelNotAvailable(
            f"hub model {repo_id!r} is not in the local hub cache and the hub cannot be reached "
            f"(no network here{', HF_HUB_OFFLINE is set' if offline else ''}). Download it on a machine "
            f"with network access, or pass a local folder."
        ) from e
    except Exception as e:  # connection errors come in many types across versions
        raise ModelNotAvailable(
            f"hub model {repo_id!r} could not be fetched: {type(e).__name__}: {str(e)[:200]}. "
            f"No network here? Pass a local folder or an embedded model instead."
        ) from e


def load_tokenizer(path: str | Path):
    """Tokenizer for plain-text prompting: left padding, a pad token distinct from EOS where possible."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        vocab = tok.get_vocab()
        for candidate in (tok.unk_token, "<|fim_pad|>", "<pad>"):
            if candidate in vocab and vocab[candidate] != tok.eos_token_id:
                tok.pad_token = candidate
                break
        else:
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token  # recorded as pad_is_eos; the attention mask hides it
    return tok


def tokenizer_facts(tok) -> dict[str, Any]:
    return {
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "eos_token_id": tok.eos_token_id,
        "pad_token": tok.pad_token,
        "pad_token_id": tok.pad_token_id,
        "pad_is_eos": tok.pad_token_id == tok.eos_token_id,
    }


class QuantizationUnavailable(UserError, RuntimeError):
    pass


def _quantization_config(quantization: str, device: str):
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationUnavailable(
            f"{quantization} loading needs bitsandbytes, which is not installed (pip install bitsandbytes)"
        )
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=_torch_dtype("bfloat16"))


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    resolved: ResolvedModel
    provenance: dict[str, Any] = field(default_factory=dict)


def load_model(
    spec: str,
    *,
    quantization: str = "none",
    allow_full_precision_fallback: bool = False,
    dtype: str = "float32",
    adapters: list[str | Path] | None = None,
    device: str | None = None,
    trainable: bool = False,
) -> LoadedModel:
    """Load base weights fresh from disk, then apply the adapter chain in order, frozen: merged into
    full-precision weights, unmerged on quantized ones (recorded as ``adapters_applied``)."""
    from transformers import AutoModelForCausalLM

    resolved = resolve(spec)
    device = device or default_device()
    torch_dtype = _torch_dtype("float32" if dtype == "auto" and device == "cpu" else
                               ("bfloat16" if dtype == "auto" else dtype))
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    used, fallback, reason = quantization, False, None
    if quantization != "none":
        try:
            kwargs["quantization_config"] = _quantization_config(quantization, device)
            kwargs["device_map"] = device
            model = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs)
        except Exception as e:
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            if not allow_full_precision_fallback:
                raise QuantizationUnavailable(
                    f"{quantization} loading of {spec!r} failed on {device}: {reason}. "
                    f"Pass --allow-full-precision-fallback (or model.allow_full_precision_fallback: true) "
                    f"to load full precision instead; the fallback is recorded in provenance."
                ) from e
            kwargs.pop("quantization_config", None)
            kwargs.pop("device_map", None)
            used, fallback = "none", True
    if used == "none":
        model = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs).to(device)
    tok = load_tokenizer(resolved.path)
    adapter_paths = [str(Path(a)) for a in adapters or []]
    model, applied = apply_adapters(model, adapter_paths)
    if not trainable:
        model.eval()
    prov = {
        "model": spec,
        "path": str(resolved.path),
        "kind": resolved.kind,
        "quantization": used,
        "quantization_requested": quantization,
        "full_precision_fallback": fallback,
        "fallback_reason": reason,
        "dtype": str(torch_dtype).replace("torch.", ""),
        "device": device,
        "adapters": adapter_paths,
        "adapters_applied": applied if adapter_paths else None,
        **tokenizer_facts(tok),
    }
    return LoadedModel(model, tok, resolved, prov)


SUM_CHUNK = 1 << 22  # elements summed in float64 at a time: 32 MB of temporary, whatever the tensor


def fingerprint(model, sample: int = 65536, gather=None, chunk: int = SUM_CHUNK) -> str:
    """A hash of the weights the model actually holds: name, shape, dtype, a strided sample of
    values per tensor (full tensors up to ``sample`` elements) and the float64 sum of all its values.
    Any merged adapter or in-place edit of a weight matrix changes it; hashing a strided sample keeps
    it fast for 30B-parameter models, and the sum is taken ``chunk`` elements at a time, so no
    tensor is ever copied whole (Qwen2.5-32B's embedding in float64 would be 6 GB).

    ``gather(tensor)``: a context in which a sharded tensor is whole (ZeRO-3 gathers one weight at a
    time, so the full weights are never all in memory at once).
    """
    import contextlib

    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in sorted(model.state_dict(keep_vars=True).items()):
            with gather(t) if gather is not None else contextlib.nullcontext():
                _hash_tensor(h, name, t.detach(), sample, chunk)
    return h.hexdigest()[:16]


def _chunked_sum(flat, chunk: int) -> float:
    """The float64 sum of a 1-D tensor, ``chunk`` elements converted at a time (a fixed order)."""
    import torch

    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for start in range(0, flat.numel(), chunk):
        total += flat[start:start + chunk].sum(dtype=torch.float64)
    return float(total)


def _hash_tensor(h, name: str, t, sample: int, chunk: int) -> None:
    import torch

    h.update(name.encode())
    h.update(str(tuple(t.shape)).encode())
    h.update(str(t.dtype).encode())
    flat = t.reshape(-1)
    if flat.numel() > sample:
        flat = flat[:: max(1, flat.numel() // sample)][:sample]
    data = flat.to("cpu").contiguous()
    if data.dtype == torch.bfloat16:
        data = data.view(torch.int16)
    h.update(data.numpy().tobytes())
    if t.is_floating_point():
        h.update(repr(_chunked_sum(t.reshape(-1), chunk)).encode())


def free(loaded: LoadedModel | None) -> None:
    """Drop every reference we hold and return memory to the allocator."""
    import torch

    if loaded is not None:
        loaded.model = None
        loaded.tokenizer = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
