"""The CPU backend is chosen on a CPU with whole weights and nowhere else (cpu_backend.py): faking
the device and the launcher's strategy, a CUDA or sharded run goes through PEFT's, TRL's and
transformers' own code, and the two backends compute the same things."""

from __future__ import annotations

import json

import pytest
import torch

from cai_bootstrap import cpu_backend
from cai_bootstrap.cpu_backend import choose, sharded_strategy, strategy_of_config
from cai_bootstrap.training import dpo, sft
from test_accelerate_configs import CONFIG_DIR, _worker_env
from test_dpo import make_pairs, small_cfg
from test_sft import make_cfg, make_examples

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning",
                                        "ignore:.*padding_free=True.*:UserWarning")


def test_the_decision():
    assert choose("auto", "cpu") == cpu_backend.CPUBackend(True, "auto: a CPU with whole weights")
    for device in ("cuda", "cuda:1"):
        assert not choose("auto", device).used and f"{device} is not a CPU" in choose("auto", device).reason
    for strategy in ("deepspeed", "fsdp"):
        decided = choose("auto", "cpu", strategy)
        assert not decided.used and f"{strategy} shards the weights" in decided.reason
    assert choose("off", "cpu") == cpu_backend.CPUBackend(False, "configured off")
    with pytest.raises(ValueError, match="cpu_backend must be auto or off"):
        choose("on", "cpu")


@pytest.mark.parametrize("name, strategy", [("ddp.yaml", None), ("cpu_2proc.yaml", None),
                                            ("fsdp.yaml", "fsdp"), ("deepspeed_zero3.yaml", "deepspeed")])
def test_sharded_strategies_are_seen_as_accelerate_launches_them(name, strategy, monkeypatch):
    """In a worker's environment as accelerate launch prepares it, and from the config file in the parent."""
    assert strategy_of_config(CONFIG_DIR / name) == strategy
    if name == "cpu_2proc.yaml":
        return
    for var in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(var, raising=False)
    assert sharded_strategy() is None
    for key, value in _worker_env(name).items():
        monkeypatch.setenv(key, value)
    assert sharded_strategy() == strategy


def fake(monkeypatch, device="cuda", strategy=None):
    """The backend's view of this process as a CUDA or sharded run would give it; the run itself
    stays on this CPU."""
    monkeypatch.setattr(cpu_backend, "this_device", lambda: device)
    monkeypatch.setattr(cpu_backend, "sharded_strategy", lambda: strategy)


def _lora_layer_kinds(model) -> set[str]:
    from peft.tuners.lora.layer import Linear as LoRALinear

    return {("fused" if hasattr(m, "_peft_forward") else "peft") for m in model.modules() if type(m) is LoRALinear}


# --- SFT -------------------------------------------------------------------------------------------


def test_sft_takes_peft_and_torch_off_the_cpu_backend_and_learns_the_same(tiny_model_folder, tmp_path, monkeypatch):
    import peft

    records, layers = {}, {}

    real = peft.get_peft_model

    def spy(model, config, **kwargs):
        wrapped = real(model, config, **kwargs)
        layers[name] = wrapped
        return wrapped

    monkeypatch.setattr(peft, "get_peft_model", spy)
    cfg = make_cfg(max_steps=2, lora=dict(r=4, alpha=8, dropout=0.1))
    for name, device, strategy in (("cpu", "cpu", None), ("cuda", "cuda", None), ("zero3", "cpu", "deepspeed")):
        fake(monkeypatch, device, strategy)
        records[name] = sft.train_sft(str(tiny_model_folder), make_examples(8), cfg, out_dir=tmp_path / name,
                                      seed=0, progress=False).metrics
    on, cuda, zero3 = records["cpu"], records["cuda"], records["zero3"]
    assert on["cpu_backend"] == {"setting": "auto", "used": True, "reason": "auto: a CPU with whole weights"}
    assert on["lora"]["dropout_masks"] == "training.lora_dropout (PCG64)" and _lora_layer_kinds(layers["cpu"]) == {"fused"}
    for name, rec in (("cuda", cuda), ("zero3", zero3)):
        assert rec["cpu_backend"]["used"] is False
        assert rec["lora"]["dropout_masks"] == "torch" and rec["lora"]["layers"] == "peft"
        assert _lora_layer_kinds(layers[name]) == {"peft"}
        assert all(type(m.lora_dropout["default"]) is torch.nn.Dropout for m in layers[name].modules()
                   if hasattr(m, "lora_dropout") and "default" in getattr(m, "lora_dropout", {}))
    assert "cuda is not a CPU" in cuda["cpu_backend"]["reason"] and "deepspeed" in zero3["cpu_backend"]["reason"]
    # torch's dropout masks are another draw than PCG64's, so the losses differ a little, not more
    assert [h["loss"] for h in cuda["history"]] == pytest.approx([h["loss"] for h in on["history"]], rel=0.01)


def test_sft_clips_the_gradient_norm_before_each_step(tiny_model_folder, tmp_path, monkeypatch):
    norms: list[float] = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):  # the norm the optimizer sees
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    runs = {}
    for clip in (0.01, None):
        norms.clear()
        metrics = sft.train_sft(str(tiny_model_folder), make_examples(8), make_cfg(max_steps=2, max_grad_norm=clip),
                                out_dir=tmp_path / str(clip), seed=0, progress=False).metrics
        runs[clip] = (list(norms), [h["grad_norm"] for h in metrics["history"]])
        assert metrics["hyperparameters"]["max_grad_norm"] == clip
    (clipped, before), (free, unrecorded) = runs[0.01], runs[None]
    assert all(b > 0.01 for b in before) and all(n == pytest.approx(0.01, rel=1e-4) for n in clipped)
    assert unrecorded == [None, None] and free[0] == pytest.approx(before[0], rel=1e-5) and free[0] > 0.01


# --- DPO -------------------------------------------------------------------------------------------


def _one_loss(trainer):
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    trainer.model.train()
    return float(trainer.compute_loss(trainer.model, batch).detach())


def test_dpo_on_cuda_or_sharded_goes_through_trls_own_code(tiny_model_folder, tmp_path, monkeypatch):
    from trl import DPOTrainer

    pairs, cfg = make_pairs(8), small_cfg()
    losses, trainers = {}, {}
    trl_forwards = []
    real = DPOTrainer._compute_loss
    monkeypatch.setattr(DPOTrainer, "_compute_loss",
                        lambda self, *a, **k: (trl_forwards.append(type(self).__name__), real(self, *a, **k))[1])
    for name, device, strategy in (("cpu", "cpu", None), ("cuda", "cuda", None), ("fsdp", "cpu", "fsdp")):
        fake(monkeypatch, device, strategy)
        setup = dpo.build_trainer("base", str(tiny_model_folder), pairs, cfg, out_dir=tmp_path / name, seed=0)
        trainer = trainers[name] = setup.trainer
        losses[name] = _one_loss(trainer)
        base = trainer.accelerator.unwrap_model(trainer.model).get_base_model()
        assert trainer.packed is getattr(base, "_packed_lm_head", False) is (name == "cpu")
        assert (trainer.fused_lora_layers > 0) is (name == "cpu")
        assert setup.trainer_args["padding_free"] is (name != "cpu")  # dpo.packing asks TRL where ours is off
        assert setup.trainer_args["use_liger_kernel"] is False  # liger_kernel is not installed here
        assert trainer.padding_free is False  # TRL 1.16 falls back to padding
    assert len(trl_forwards) == 3  # TRL's loss code runs on every backend
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-5) and losses["fsdp"] == pytest.approx(losses["cpu"], rel=1e-5)

    # the trainer refuses the CPU code under FSDP even where the backend was chosen (the environment
    # said nothing): transformers sets is_fsdp_enabled from accelerate's state when it builds the trainer
    from transformers import Trainer

    real_create = Trainer.create_accelerator_and_postprocess

    def create_as_fsdp(self):
        real_create(self)
        self.is_fsdp_enabled = True

    fake(monkeypatch, "cpu", None)
    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", create_as_fsdp)
    trainer = dpo.build_trainer("base", str(tiny_model_folder), pairs, cfg, out_dir=tmp_path / "late", seed=0).trainer
    assert trainer.cpu_backend.used and trainer.is_fsdp_enabled
    assert _one_loss(trainer) == pytest.approx(losses["cpu"], rel=1e-5)
    assert trainer.packed is False and trainer.fused_lora_layers == 0


def test_dpo_records_its_backend_and_liger_follows_the_package_on_cuda(tiny_model_folder, tmp_path, monkeypatch):
    fake(monkeypatch, "cpu", None)
    dpo.train_dpo("base", str(tiny_model_folder), make_pairs(4), small_cfg(max_steps=1), out_dir=tmp_path / "on",
                  seed=0, cpu_backend="auto")
    dpo.train_dpo("base", str(tiny_model_folder), make_pairs(4), small_cfg(max_steps=1), out_dir=tmp_path / "off",
                  seed=0, cpu_backend="off")
    on, off = (json.loads((tmp_path / n / dpo.TRAINING_JSON).read_text()) for n in ("on", "off"))
    assert on["cpu_backend"] == {"setting": "auto", "used": True, "reason": "auto: a CPU with whole weights"}
    assert on["forward"].startswith("training.packing") and on["lora_layers"].startswith("training.fused_lora")
    assert off["cpu_backend"] == {"setting": "off", "used": False, "reason": "configured off"}
    assert off["forward"] == "trl (padding_free False, use_liger_kernel False)" and off["lora_layers"] == "peft"
    assert off["history"][0]["loss"] == pytest.approx(on["history"][0]["loss"], rel=1e-5)
    assert on["trainer_args"]["max_grad_norm"] == 1.0
    assert dpo.trainer_arguments(small_cfg(max_grad_norm=None), out_dir=tmp_path, seed=0)["max_grad_norm"] == 0.0

    import importlib.util

    from cai_bootstrap.models import loading

    monkeypatch.setattr(loading, "default_device", lambda: "cuda")
    real_find_spec = importlib.util.find_spec
    for installed in (False, True):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: object() if name == "liger_kernel" and installed else real_find_spec(name, *a))
        args = dpo.trainer_arguments(small_cfg(), out_dir=tmp_path, seed=0,
                                     backend=choose("auto", "cuda"))
        assert args["use_liger_kernel"] is installed and args["padding_free"] is True and args["use_cpu"] is False


# --- generation ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def varied(tmp_path_factory, smollm2_folder):
    """A tiny Llama whose outputs differ from prompt to prompt (init scale 0.1, as test_distributed's)."""
    from cai_bootstrap.models.loading import load_model
    from cai_bootstrap.models.tiny import save_tiny_llama

    return load_model(str(save_tiny_llama(tmp_path_factory.mktemp("varied"), smollm2_folder, initializer_range=0.1)))


def test_generation_off_the_cpu_backend_is_transformers_generate_with_the_same_records(varied, monkeypatch):
    from cai_bootstrap.generation import engine as engine_mod
    from cai_bootstrap.generation.engine import Decoding, Engine
    from test_generation import PROMPTS

    ours, plain = (Engine(varied.model, varied.tokenizer, batch_size=4, cpu_backend=s) for s in ("auto", "off"))
    assert ours.backend.used and not plain.backend.used and plain.backend.reason == "configured off"
    free = ours.generate(PROMPTS[:1], Decoding(max_new_tokens=12, stop_strings=()))[0]
    decodings = [Decoding(max_new_tokens=12, stop_strings=(free.raw_text[3:7],)),  # the first row stops early
                 Decoding(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=5, stop_strings=())]
    expected = [ours.generate(PROMPTS, d) for d in decodings]
    assert expected[0][0].finish_reason == "stop" and len({g.completion_tokens for g in expected[0]}) > 1

    generate_calls = []
    real_generate = type(varied.model).generate
    monkeypatch.setattr(type(varied.model), "generate",
                        lambda self, *a, **k: generate_calls.append(1) or real_generate(self, *a, **k))
    monkeypatch.setattr(Engine, "_decode", lambda *a, **k: pytest.fail("our decode loop ran"))
    monkeypatch.setattr(engine_mod, "_preallocated_cache", lambda *a, **k: pytest.fail("our KV cache ran"))
    assert [plain.generate(PROMPTS, d) for d in decodings] == expected
    assert len(generate_calls) == 2 * 2  # two batches of four per decoding


def test_sampling_seeds_per_prompt_whatever_the_batch_or_the_shards(varied):
    from cai_bootstrap.generation.engine import Decoding, Engine
    from test_generation import PROMPTS

    d = Decoding(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=7, stop_strings=())
    whole = [g.raw_text for g in Engine(varied.model, varied.tokenizer, batch_size=4).generate(PROMPTS, d)]
    one = [g.raw_text for g in Engine(varied.model, varied.tokenizer, batch_size=1).generate(PROMPTS, d)]
    assert one == whole and len(set(whole)) == len(whole)
    # shards as two processes would run them (strided, then reversed within each), global positions kept
    engine = Engine(varied.model, varied.tokenizer, batch_size=4)
    out: dict[int, str] = {}
    for shard in ([0, 2, 4, 6], [5, 3, 1]):
        for i, g in zip(shard, engine.generate([PROMPTS[i] for i in shard], d, indices=shard), strict=True):
            out[i] = g.raw_text
    assert [out[i] for i in range(len(PROMPTS))] == whole
    # the seed still matters, and so does the position (a repeated prompt gets another sample)
    other = [g.raw_text for g in engine.generate(PROMPTS, Decoding(**{**vars(d), "seed": 8}))]
    assert all(a != b for a, b in zip(whole, other, strict=True))
    twice = engine.generate([PROMPTS[0], PROMPTS[0]], d)
    assert twice[0].raw_text == whole[0] and twice[1].raw_text != twice[0].raw_text
