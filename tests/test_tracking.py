"""Training curves: the SFT loop and TRL's DPO write TensorBoard event files with the expected scalar
names and values (read back with TensorBoard's own EventAccumulator); missing packages fail clearly."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cai_bootstrap.training import sft, tracking
from cai_bootstrap.training.dpo import train_dpo
from test_dpo import make_pairs, small_cfg
from test_sft import make_cfg, make_examples

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_sft_logs_loss_eval_loss_lr_and_throughput_to_tensorboard(tiny_model_folder, tmp_path):
    logs = tmp_path / "logs" / "sft"
    result = sft.train_sft(str(tiny_model_folder), make_examples(12), make_cfg(max_steps=4, save_steps=2,
                                                                                eval_share=0.25, logging_steps=1),
                           out_dir=tmp_path / "sft", seed=0, progress=False, tracking="tensorboard",
                           log_dir=logs, run_name="test/sft")
    got = scalars(logs)
    expected = {"train/loss", "train/learning_rate", "train/epoch", "train/tokens_per_second",
                "train/supervised_tokens_per_second", "eval/loss"}
    assert expected <= set(got), sorted(got)
    history = result.metrics["history"]
    assert [s for s, _ in got["train/loss"]] == [h["step"] for h in history] == [1, 2, 3, 4]
    assert [v for _, v in got["train/loss"]] == pytest.approx([h["loss"] for h in history], rel=1e-6)
    assert [v for _, v in got["train/learning_rate"]] == pytest.approx([h["lr"] for h in history], rel=1e-6)
    # eval loss at the checkpoint (step 2) and at the end (step 4)
    assert [s for s, _ in got["eval/loss"]] == [2, 4]
    assert got["eval/loss"][-1][1] == pytest.approx(result.metrics["eval_loss"], rel=1e-6)
    assert got["eval/loss"][0][1] == pytest.approx(result.metrics["eval_history"][0]["eval_loss"], rel=1e-6)


def test_sft_without_tracking_writes_no_event_file(tiny_model_folder, tmp_path):
    sft.train_sft(str(tiny_model_folder), make_examples(4), make_cfg(max_steps=1), out_dir=tmp_path / "sft",
                  seed=0, progress=False, log_dir=tmp_path / "logs")
    assert not (tmp_path / "logs").exists()


def test_dpo_reports_its_curves_through_trl_with_the_same_names(tiny_model_folder, tmp_path):
    logs = tmp_path / "logs" / "dpo_only"
    (logs / "stale").mkdir(parents=True)  # a previous run's logs are replaced, not drawn over
    train_dpo("base", str(tiny_model_folder), make_pairs(8), small_cfg(max_steps=2), out_dir=tmp_path / "dpo",
              seed=0, tracking="tensorboard", log_dir=logs, run_name="test/dpo_only")
    assert not (logs / "stale").exists()
    got = scalars(logs)
    assert set(tracking.DPO_TAGS) <= set(got), sorted(got)
    record = json.loads((tmp_path / "dpo" / "training.json").read_text())
    assert record["trainer_args"]["report_to"] == "tensorboard"
    history = record["history"]
    assert [s for s, _ in got["train/loss"]] == [h["step"] for h in history]
    assert [v for _, v in got["train/loss"]] == pytest.approx([h["loss"] for h in history], rel=1e-5)
    assert [v for _, v in got["train/rewards/accuracies"]] == pytest.approx(
        [h["rewards/accuracies"] for h in history], rel=1e-5)
    # SFT and DPO share the names of what they both have
    assert {"train/loss", "train/learning_rate", "train/epoch"} <= set(tracking.SFT_TAGS.values())
    assert {"train/loss", "train/learning_rate", "train/epoch"} <= set(tracking.DPO_TAGS)
    import os
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ  # restored after training


def test_missing_tracking_package_fails_with_the_install_command(monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(tracking.TrackingUnavailable, match=r"pip install 'cai-bootstrap\[wandb\]'"):
        tracking.require("wandb")
    with pytest.raises(ValueError, match="tracking must be one of"):
        tracking.require("mlflow")
    tracking.require("tensorboard")  # installed here
    tracking.require("none")


def test_trackio_logs_locally(tmp_path, monkeypatch):
    """Trackio is local-first: with the package installed, the SFT names land in its local database."""
    trackio = pytest.importorskip("trackio")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    t = tracking.open_tracker("trackio", log_dir=tmp_path / "logs", run_name="test/sft", config={"seed": 0})
    t.log(tracking.sft_scalars({"loss": 2.5, "lr": 1e-3, "epoch": 0.5, "tokens_per_s": 100.0}), 1)
    t.close()
    assert any((tmp_path / "trackio").rglob("*")), "trackio wrote nothing locally"
    del trackio
