"""configs/accelerate/*.yaml, checked with accelerate's own code (1.15): the config loader
(unknown keys are errors there), the launch-command validation that picks the launcher, the
environment the launcher hands to the workers, and the FSDP / DeepSpeed plugins built from that
environment exactly as a worker builds them. That cpu_2proc.yaml really starts two gloo processes
is shown by tests/test_distributed.py (it launches with it)."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import ComputeEnvironment, DistributedType

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "accelerate"

# file -> (distributed type, processes, mixed precision, which launcher flag accelerate sets)
EXPECTED = {
    "cpu_2proc.yaml": (DistributedType.MULTI_GPU, 2, "no", "multi_gpu"),
    "ddp.yaml": (DistributedType.MULTI_GPU, 8, "bf16", "multi_gpu"),
    "fsdp.yaml": (DistributedType.FSDP, 8, "bf16", "use_fsdp"),
    "deepspeed_zero3.yaml": (DistributedType.DEEPSPEED, 8, "bf16", "use_deepspeed"),
}


def launch_args(name: str):
    """What `accelerate launch --config_file NAME script.py` resolves before starting anything."""
    args = launch_command_parser().parse_args(["--config_file", str(CONFIG_DIR / name), "script.py"])
    return _validate_launch_command(args)


def test_the_expected_configs_and_nothing_else():
    assert sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loads_with_accelerates_loader(name):
    dist, nproc, precision, _ = EXPECTED[name]
    cfg = load_config_from_file(str(CONFIG_DIR / name))  # raises on unknown keys
    assert isinstance(cfg, ClusterConfig)
    assert cfg.compute_environment == ComputeEnvironment.LOCAL_MACHINE
    assert cfg.distributed_type == dist
    assert cfg.num_processes == nproc and cfg.num_machines == 1 and cfg.machine_rank == 0
    assert cfg.mixed_precision == precision
    assert cfg.main_process_port == 0  # a free port: concurrent runs on one machine do not clash
    raw = yaml.safe_load((CONFIG_DIR / name).read_text())
    for key in ("compute_environment", "distributed_type", "num_processes", "mixed_precision", "num_machines"):
        assert key in raw, f"{name}: {key} must be explicit"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_has_a_header_saying_when_to_use_it(name):
    lines = (CONFIG_DIR / name).read_text().splitlines()
    header = lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))]
    assert len(header) >= 4, f"{name}: the comment header should say when to use it"
    assert any("accelerate launch --config_file configs/accelerate/" + name in line for line in header)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_launcher_selection(name):
    dist, nproc, precision, flag = EXPECTED[name]
    args, defaults, _ = launch_args(name)
    flags = {f: bool(getattr(args, f)) for f in ("multi_gpu", "use_fsdp", "use_deepspeed", "tpu", "cpu")}
    assert flags == {f: f == flag for f in flags}, flags  # one launcher, and never the --cpu one
    assert args.num_processes == nproc and args.mixed_precision == precision


def test_cpu_2proc_uses_the_torchrun_launcher_with_cpu_threads():
    """MULTI_CPU in a config goes to accelerate's single-process "simple" launcher; MULTI_GPU goes
    to torchrun, which starts both workers (they join over gloo with cpu=True)."""
    args, defaults, _ = launch_args("cpu_2proc.yaml")
    assert defaults.use_cpu is True and defaults.distributed_type != DistributedType.MULTI_CPU
    assert args.multi_gpu and args.num_processes == 2


def _worker_env(name: str) -> dict[str, str]:
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args, defaults, mp_from_config = launch_args(name)
    if args.use_deepspeed:  # as accelerate's launch_command() does before calling the launcher
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return env


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp.yaml", "deepspeed_zero3.yaml"])
def test_workers_get_bf16(name):
    assert _worker_env(name)["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_fsdp_plugin_as_a_worker_builds_it():
    import torch
    import accelerate.utils.dataclasses as dc
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import ShardingStrategy, StateDictType
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    env = _worker_env("fsdp.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "1"
    # sync_module_states asks for the current CUDA device; pretend there is one (no GPU here)
    with mock.patch.dict(os.environ, env, clear=True), mock.patch.object(dc, "is_cuda_available", lambda: True), \
            mock.patch.object(torch.cuda, "current_device", lambda: 0):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 1
    assert plugin.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert plugin.transformer_cls_names_to_wrap is None  # taken from the model's _no_split_modules
    assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT
    assert plugin.use_orig_params is True  # frozen base + trainable LoRA in one FSDP unit
    assert plugin.cpu_ram_efficient_loading and plugin.sync_module_states
    assert not plugin.activation_checkpointing
    raw = yaml.safe_load((CONFIG_DIR / "fsdp.yaml").read_text())["fsdp_config"]
    assert raw["fsdp_offload_params"] is False


def test_deepspeed_plugin_as_a_worker_builds_it():
    from accelerate.utils import DeepSpeedPlugin

    env = _worker_env("deepspeed_zero3.yaml")
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    with mock.patch.dict(os.environ, env, clear=True):
        plugin = DeepSpeedPlugin()
        plugin.set_mixed_precision("bf16")  # what AcceleratorState does with mixed_precision
    ds = plugin.deepspeed_config
    assert plugin.zero_stage == 3 and ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert ds["zero_optimization"]["offload_param"]["device"] == "none"
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert plugin.zero3_init_flag is True
    # left to the trainer: TRL's DPOTrainer fills "auto" from its TrainingArguments and refuses a
    # fixed value that differs (dpo.gradient_accumulation_steps, max_grad_norm)
    assert ds["gradient_accumulation_steps"] == "auto"
    assert ds.get("gradient_clipping", "auto") == "auto"
    assert ds["train_micro_batch_size_per_gpu"] == "auto"
    assert ds["bf16"]["enabled"] is True
