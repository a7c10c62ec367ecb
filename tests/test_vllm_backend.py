"""The vLLM backend without vLLM: its clear errors, its engine settings, adapter chains combined into
one LoRA, and its records against the HF engine's through a stand-in `vllm` module that serves
vLLM-shaped outputs from the same weights, applying a LoRARequest as vLLM does (base weights plus the
unmerged adapter). The real vLLM runs in the `vllm` test job (tests/test_vllm_cpu.py).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cai_bootstrap.cli import app
from cai_bootstrap.config import ConfigError, VLLMConfig, load_config
from cai_bootstrap.formats import prompt_for
from cai_bootstrap.generation.engine import Decoding
from cai_bootstrap.generation.vllm_backend import BackendUnavailable, engine_args
from cai_bootstrap.models.adapter_chain import AdapterNotServable, combine, read_lora
from cai_bootstrap.models.loading import load_model
from cai_bootstrap.schemas import InstructionRecord
from cai_bootstrap.steps.evaluate import ModelUnderTest, evaluate_models
from cai_bootstrap.steps.generator import Generator


@pytest.fixture(scope="module")
def varied_model_folder(tmp_path_factory, smollm2_folder) -> Path:
    """Initialised at scale 0.1 so that greedy outputs differ between prompts (see test_distributed)."""
    from cai_bootstrap.models.tiny import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-varied"), smollm2_folder, initializer_range=0.1)


def make_adapter(model_folder, out, seed=1, **lora):
    """A LoRA adapter with non-zero weights, so that it changes the model."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **lora}
    peft = get_peft_model(load_model(str(model_folder)).model, LoraConfig(init_lora_weights=False, **settings))
    peft.save_pretrained(out)
    return out


def state(folder, adapters):
    return {k: v.clone() for k, v in load_model(str(folder), adapters=adapters).model.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# Adapter chains as one LoRA


def test_a_combined_chain_gives_the_weights_of_the_merged_chain(tmp_path, varied_model_folder):
    """Two adapters of different rank, scaling (one rsLoRA) and modules: the combined adapter, merged,
    gives the chain's merged weights (fp32 rounding only), and it is a few hundred kB, not a model."""
    import torch

    first = make_adapter(varied_model_folder, tmp_path / "first", seed=1)
    second = make_adapter(varied_model_folder, tmp_path / "second", seed=2, r=2, lora_alpha=16, use_rslora=True,
                          target_modules=["q_proj", "v_proj"])
    combined = combine([first, second], tmp_path / "work" / "combined")
    assert combined.rank == 6 and read_lora(combined.folder).rank == 6
    assert sum(p.stat().st_size for p in combined.folder.iterdir()) < 300_000
    assert list((tmp_path / "work").iterdir()) == [combined.folder]  # no temporary folder left beside it

    chain, one, base = (state(varied_model_folder, a) for a in ([first, second], [combined.folder], []))
    assert chain.keys() == one.keys()
    for key in chain:
        torch.testing.assert_close(one[key], chain[key], rtol=0, atol=1e-6)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (chain[q] - base[q]).abs().max() > 1e-2  # the chain changes the weights: the comparison can fail
    with_first = state(varied_model_folder, [first])
    assert (one[q] - with_first[q]).abs().max() > 1e-3  # and the second adapter counts
    k = "model.layers.0.self_attn.k_proj.weight"  # only the first adapter targets k_proj
    torch.testing.assert_close(one[k], with_first[k], rtol=0, atol=1e-6)


def test_adapters_a_plain_lora_server_cannot_apply_are_refused_naming_the_field(tmp_path, varied_model_folder):
    adapter = make_adapter(varied_model_folder, tmp_path / "dora", use_dora=True)
    with pytest.raises(AdapterNotServable, match=r"dora/adapter_config\.json: .*use_dora: True"):
        read_lora(adapter)
    config = tmp_path / "dora" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "use_dora": False,
                                  "modules_to_save": ["lm_head"]}))
    with pytest.raises(AdapterNotServable, match=r"modules_to_save: \['lm_head'\]"):
        combine([adapter, adapter], tmp_path / "combined")
    assert not (tmp_path / "combined").exists()


# ------------------------------------------------------------------------------------------------
# Engine settings


def test_engine_settings_are_validated_where_they_are_defined():
    with pytest.raises(ConfigError, match="generation.vllm.max_loras"):
        load_config(None, ["generation.vllm.max_loras=1"])
    with pytest.raises(ConfigError, match="generation.vllm.gpu_memory_utilization"):
        load_config(None, ["generation.vllm.gpu_memory_utilization=1.5"])
    with pytest.raises(ConfigError, match="generation.vllm.kv_cache_memory_bytes"):
        load_config(None, ["generation.vllm.kv_cache_memory_bytes=1000"])
    with pytest.raises(ConfigError, match=r"generation.vllm.engine_args: .*\['dtype', 'enforce_eager'\]"):
        load_config(None, ["generation.vllm.engine_args={dtype: float16, enforce_eager: true}"])
    with pytest.raises(ConfigError, match="generation.vllm.nonsense"):
        load_config(None, ["generation.vllm.nonsense=1"])


def test_engine_args_carry_the_settings_and_lora_only_with_an_adapter(vllm_calls):
    settings = VLLMConfig(kv_cache_memory_bytes=1 << 30, enforce_eager=True, max_model_len=512,
                          engine_args={"swap_space": 0})
    base = engine_args(settings, dtype="float32", tensor_parallel_size=2, seed=3, lora_rank=None)
    assert base == {"dtype": "float32", "tensor_parallel_size": 2, "seed": 3, "gpu_memory_utilization": 0.9,
                    "enforce_eager": True, "kv_cache_memory_bytes": 1 << 30, "max_model_len": 512, "swap_space": 0}
    with_lora = engine_args(settings, dtype="float32", tensor_parallel_size=1, seed=0, lora_rank=6)
    assert {k: with_lora[k] for k in ("enable_lora", "max_loras", "max_lora_rank")} == {
        "enable_lora": True, "max_loras": 2, "max_lora_rank": 8}  # 6 rounded up to a rank vLLM serves
    wide = VLLMConfig(max_lora_rank=64, max_loras=4)
    assert engine_args(wide, dtype="auto", tensor_parallel_size=1, seed=0, lora_rank=6)["max_lora_rank"] == 64
    with pytest.raises(BackendUnavailable, match="max_lora_rank is 8 but the adapter has rank 16"):
        engine_args(VLLMConfig(max_lora_rank=8), dtype="auto", tensor_parallel_size=1, seed=0, lora_rank=16)


def test_vllm_backend_without_vllm_fails_at_step_start_in_one_line(tmp_path, tiny_model_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed, whatever this machine has
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"model: {{base: {tiny_model_folder}}}\ngeneration: {{backend: vllm}}\n")
    r = CliRunner().invoke(app, ["baseline", str(cfg), "--run-dir", str(tmp_path / "run")])
    assert r.exit_code == 1
    message = r.output.strip()
    assert "vllm is not installed" in message and "make setup-vllm" in message
    assert len(message.splitlines()) == 1 and "Traceback" not in message

    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))  # installed, but 8-bit weights asked for
    config = load_config(None, [f"model.base={tiny_model_folder}", "generation.backend=vllm",
                                "model.generation_quantization=8bit"])
    with pytest.raises(BackendUnavailable, match="model.generation_quantization none"):
        Generator(config)


# ------------------------------------------------------------------------------------------------
# Through a stand-in vLLM


def fake_vllm(calls: dict) -> types.ModuleType:
    """A stand-in for the `vllm` package: LLM serves HF greedy generation of the folder it is given,
    with the LoRARequest's adapter applied unmerged, vLLM's output shape and stopping (token ids up to
    and including the EOS or the token that completes a stop string), and an engine core whose
    shutdown is counted (``calls["alive"]``: engines started and not shut down)."""

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)
            calls.setdefault("params", []).append(kwargs)

    class LoRARequest:
        def __init__(self, lora_name, lora_int_id, lora_path):
            self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path

    class EngineCore:
        def shutdown(self):
            calls["alive"] -= 1
            calls["shutdowns"] = calls.get("shutdowns", 0) + 1

    class LLM:
        def __init__(self, model, **kwargs):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            calls["llm"] = {"model": model, **kwargs}
            calls["alive"] = calls.get("alive", 0) + 1
            calls["most_alive"] = max(calls.get("most_alive", 0), calls["alive"])
            self.model = AutoModelForCausalLM.from_pretrained(model)
            self.tokenizer = AutoTokenizer.from_pretrained(kwargs["tokenizer"])
            self.llm_engine = types.SimpleNamespace(engine_core=EngineCore())

        def generate(self, prompts, sampling_params, use_tqdm, lora_request=None):
            import torch
            from peft import PeftModel

            model = self.model
            if lora_request is not None:
                assert calls["llm"]["enable_lora"] and calls["llm"]["max_loras"] >= 2
                calls.setdefault("loras", []).append(lora_request.lora_path)
                model = PeftModel.from_pretrained(AutoModel.from_pretrained(calls["llm"]["model"]),
                                                  lora_request.lora_path)
            outs = []
            for prompt, p in zip(prompts, sampling_params, strict=True):
                assert p.temperature == 0  # greedy only in this stand-in
                ids = torch.tensor([prompt["prompt_token_ids"]])
                with torch.inference_mode():
                    gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=p.max_tokens,
                                         do_sample=False, eos_token_id=p.stop_token_ids,
                                         pad_token_id=p.stop_token_ids[0])[0, ids.shape[1]:].tolist()
                for n in range(1, len(gen) + 1):
                    if any(s in self.tokenizer.decode(gen[:n]) for s in p.stop):
                        gen = gen[:n]
                        break
                completion = types.SimpleNamespace(token_ids=gen, text=self.tokenizer.decode(gen))
                outs.append(types.SimpleNamespace(prompt_token_ids=prompt["prompt_token_ids"], outputs=[completion]))
            return outs

    from transformers import AutoModelForCausalLM as AutoModel

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, SamplingParams
    module.lora = types.ModuleType("vllm.lora")
    module.lora.request = types.ModuleType("vllm.lora.request")
    module.lora.request.LoRARequest = LoRARequest
    module.config = types.ModuleType("vllm.config")
    module.config.lora = types.ModuleType("vllm.config.lora")
    module.config.lora.MaxLoRARanks = __import__("typing").Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]
    return module


@pytest.fixture
def vllm_calls(monkeypatch) -> dict:
    calls: dict = {}
    module = fake_vllm(calls)
    for name, mod in (("vllm", module), ("vllm.lora", module.lora), ("vllm.lora.request", module.lora.request),
                      ("vllm.config", module.config), ("vllm.config.lora", module.config.lora)):
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


def test_vllm_engine_gives_the_hf_engine_records(tmp_path, varied_model_folder, vllm_calls):
    """Same weights (base + a chain of two adapters), same greedy decoding: the vLLM path's
    Generations, fingerprint and provenance equal the HF engine's, stop strings and lengths included.
    vLLM gets the base folder and the chain as one LoRA request; no merged checkpoint is written, the
    combined adapter is removed and the engine shut down on close."""
    first = make_adapter(varied_model_folder, tmp_path / "first", seed=1)
    second = make_adapter(varied_model_folder, tmp_path / "second", seed=2)
    prompts = [prompt_for(i) for i in ("Name a colour.", "Why is the sky blue?", "Say hi.", "Count to five.")]
    hf_cfg = load_config(None, [f"model.base={varied_model_folder}", "generation.batch_size=1"])
    vllm_cfg = load_config(None, [f"model.base={varied_model_folder}", "generation.backend=vllm",
                                  "generation.tensor_parallel_size=2", "generation.vllm.enforce_eager=true",
                                  "generation.vllm.kv_cache_memory_bytes=1073741824"])

    with Generator(hf_cfg, adapters=[first, second]) as hf:
        free_run = hf.generate(prompts, Decoding(max_new_tokens=10, stop_strings=()))
        # a stop string the model does write (inside prompt 0's output), so the stop path is exercised
        stops = (free_run[0].raw_text[4:7],)
        decoding = Decoding(max_new_tokens=10, stop_strings=stops)
        expected = hf.generate(prompts, decoding)
        hf_facts = (hf.fingerprint, hf.provenance)
        eos = hf.tokenizer.eos_token_id
    work = tmp_path / "work"
    with Generator(vllm_cfg, adapters=[first, second], work_dir=work) as gen:
        got = gen.generate(prompts, decoding)
        assert (gen.fingerprint, gen.provenance) == hf_facts
        assert gen.stats.prompts == 4 and gen.stats.completion_tokens == sum(g.completion_tokens for g in got)
        assert gen.runtime == {"backend": "vllm", "tensor_parallel_size": 2, "lora": True}
        combined = Path(vllm_calls["loras"][0])
        assert [p.name for p in work.iterdir()] == [combined.name]  # only the small combined adapter
        assert {p.name for p in combined.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
        assert vllm_calls["alive"] == 1
    assert not combined.exists() and vllm_calls["alive"] == 0 and vllm_calls["shutdowns"] == 1

    assert got == expected
    assert got[0].finish_reason == "stop" and got[0].stop_string == stops[0]
    assert {g.finish_reason for g in got} >= {"stop", "length"}
    llm = vllm_calls["llm"]
    assert Path(llm["model"]) == varied_model_folder.resolve()  # the base weights, not a merged copy
    assert {k: llm[k] for k in ("tensor_parallel_size", "enforce_eager", "kv_cache_memory_bytes", "max_lora_rank")} == {
        "tensor_parallel_size": 2, "enforce_eager": True, "kv_cache_memory_bytes": 1 << 30, "max_lora_rank": 8}
    assert vllm_calls["params"][0] == {"max_tokens": 10, "temperature": 0.0, "top_p": 1.0, "seed": None,
                                       "stop": list(stops), "include_stop_str_in_output": True,
                                       "stop_token_ids": [eos], "skip_special_tokens": False}


def test_evaluate_holds_one_vllm_engine_at_a_time(tmp_path, varied_model_folder, vllm_calls):
    """Four models (base, one adapter, a chain, another adapter) evaluated on vLLM: one engine each,
    each shut down before the next starts; LoRA only where there is an adapter, a single adapter
    served from its own folder; the isolation checks hold."""
    sft = make_adapter(varied_model_folder, tmp_path / "sft", seed=1)
    dpo = make_adapter(varied_model_folder, tmp_path / "dpo", seed=2)
    dpo_only = make_adapter(varied_model_folder, tmp_path / "dpo_only", seed=3)
    models = [ModelUnderTest("base", str(varied_model_folder), ()),
              ModelUnderTest("sft", str(varied_model_folder), (sft,)),
              ModelUnderTest("dpo", str(varied_model_folder), (sft, dpo)),
              ModelUnderTest("dpo_only", str(varied_model_folder), (dpo_only,))]
    items = [InstructionRecord(id=f"t{i}", instruction=text, category="open", source="builtin")
             for i, text in enumerate(("Say hi.", "Name a fruit."))]
    config = load_config(None, [f"model.base={varied_model_folder}", "generation.backend=vllm",
                                "evaluation.max_new_tokens=4"])
    responses, record = evaluate_models(models, items, config, work_dir=tmp_path / "work")
    assert vllm_calls["most_alive"] == 1 and vllm_calls["alive"] == 0 and vllm_calls["shutdowns"] == 4
    assert record["isolation"]["verified"] and set(responses) == {m.name for m in models}
    assert [record["models"][m.name]["runtime"]["lora"] for m in models] == [False, True, True, True]
    assert [Path(p).parent for p in vllm_calls["loras"]] == [tmp_path, tmp_path / "work", tmp_path]
    assert vllm_calls["loras"][0] == str(sft) and not list((tmp_path / "work").iterdir())
    assert len({record["models"][m.name]["fingerprint"] for m in models}) == 4
