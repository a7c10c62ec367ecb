"""Experiments: seeds and rounds as run directories that share data, resume, record which model wrote
what (by fingerprint), estimate their cost and report per seed and pooled. The real pipeline on the
tiny random model (QC patched to keep its random text)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cai_bootstrap.config import ConfigError, load_config
from cai_bootstrap.data import pairs as pairs_data
from cai_bootstrap.data.ranking import Choice
from cai_bootstrap.experiment import runner
from cai_bootstrap.experiment.cost import estimate
from cai_bootstrap.experiment.plan import SHARED_DATA, check_base_config, plan_runs, run_config
from cai_bootstrap.files import sha256_file, sha256_path
from cai_bootstrap.models.loading import fingerprint, load_model
from cai_bootstrap.run import Run, RunStateError
from cai_bootstrap.schemas import SFTRecord, load_jsonl
from cai_bootstrap.steps import dpo as dpo_step
from cai_bootstrap.steps import sft_data as sft_data_step

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

TINY = [
    "generation.batch_size=16", "baseline.n_probes=2", "baseline.max_new_tokens=2",
    "instructions.builtin=60", "instructions.test_size=6",
    "sft_data.max_instructions=8", "sft_data.max_new_tokens=4",
    "sft.epochs=1", "sft.batch_size=4", "sft.lora.r=4", "sft.eval_share=0", "sft.learning_rate=0.01",
    "sft.warmup_ratio=0", "pairs.max_new_tokens=4",
    "dpo.max_steps=1", "dpo.batch_size=4", "dpo.lora.r=4", "dpo.learning_rate=0.01", "dpo.warmup_ratio=0",
    "evaluation.max_new_tokens=4", "evaluation.batch_size=16",
]


def tiny_config(folder, *more):
    return load_config(None, [f"model.base={folder}", *TINY, *more])


# --------------------------------------------------------------------------------------------
# the plan


def test_plan_shares_data_across_seeds_and_chains_rounds_per_seed():
    runs = {p.name: p for p in plan_runs(5, seeds=2, rounds=2, data_seeds=False)}
    assert list(runs) == ["round-1/seed-5", "round-1/seed-6", "round-2/seed-5", "round-2/seed-6"]
    assert runs["round-1/seed-5"].adopts == () and runs["round-1/seed-5"].previous is None
    assert runs["round-1/seed-6"].adopt_from == "round-1/seed-5" and runs["round-1/seed-6"].adopts == SHARED_DATA
    assert runs["round-2/seed-6"].previous == "round-1/seed-6"
    assert runs["round-2/seed-6"].adopts == ("baseline", "instructions")  # sft-data: written by the writer
    assert {p.data_seed for p in runs.values()} == {5}
    own = {p.name: p for p in plan_runs(5, seeds=2, rounds=1, data_seeds=True)}
    assert own["round-1/seed-6"].data_seed == 6 and own["round-1/seed-6"].adopts == ()


def test_run_config_sets_seeds_and_round_and_refuses_experiment_keys(tiny_model_folder):
    cfg = tiny_config(tiny_model_folder, "seed=5")
    r2 = run_config(cfg, plan_runs(5, 2, 2, False)[3])
    assert (r2.seed, r2.data_seed, r2.rounds.round, r2.rounds.previous) == (6, 5, 2, "../../round-1/seed-6")
    # the data steps' settings hash alike across training seeds, the training steps' do not
    r1a, r1b = (run_config(cfg, p) for p in plan_runs(5, 2, 1, False))
    assert r1a.data_hash("sft_data") == r1b.data_hash("sft_data")
    assert r1a.section_hash("sft") != r1b.section_hash("sft")
    with pytest.raises(ConfigError, match="set by `experiment`"):
        check_base_config(tiny_config(tiny_model_folder, "rounds.round=2", "rounds.previous=x"))
    with pytest.raises(ConfigError, match="rounds.previous"):
        tiny_config(tiny_model_folder, "rounds.round=2")


# --------------------------------------------------------------------------------------------
# adopting a finished step


def _fake_step(run: Run, name: str, params: str, text: str, inputs=()) -> None:
    with run.step(name, params, list(inputs), [f"data/{name}.txt"]):
        run.path(f"data/{name}.txt").parent.mkdir(parents=True, exist_ok=True)
        run.path(f"data/{name}.txt").write_text(text)


def test_adopt_copies_outputs_with_provenance_and_refuses_mismatches(tmp_path):
    src, dst = Run(tmp_path / "a"), Run(tmp_path / "b")
    _fake_step(src, "instructions", "p1", "pool")
    _fake_step(src, "sft-data", "p2", "answers", inputs=["data/instructions.txt"])
    with pytest.raises(RunStateError, match="does not have as such"):  # its input is not there yet
        dst.adopt(src, "sft-data", "p2")
    assert dst.adopt(src, "instructions", "p1") and dst.adopt(src, "sft-data", "p2")
    assert not dst.adopt(src, "sft-data", "p2")  # already there: nothing to do
    entry = dst.steps()["sft-data"]
    assert entry["outputs"] == src.steps()["sft-data"]["outputs"]
    assert entry["provenance"]["adopted_from"]["run_dir"] == "../a"
    assert dst.is_current("sft-data", "p2", ["data/instructions.txt"])  # the step will be skipped
    with pytest.raises(RunStateError, match="other settings"):
        dst.adopt(src, "instructions", "another")
    src.path("data/sft-data.txt").write_text("edited")
    other = Run(tmp_path / "c")
    other.adopt(src, "instructions", "p1")
    with pytest.raises(RunStateError, match="changed since"):
        other.adopt(src, "sft-data", "p2")
    with pytest.raises(RunStateError, match="not done"):
        dst.adopt(src, "sft", "p3")


# --------------------------------------------------------------------------------------------
# a whole experiment on the tiny model: 2 seeds x 2 rounds, interrupted once


class Interrupt(KeyboardInterrupt):
    pass


@pytest.fixture(scope="module")
def experiment(tiny_model_folder, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    # the random tiny model never writes a response that passes QC: keep its text as it is
    mp.setattr(sft_data_step, "qc_reason", lambda *a: None)
    # ... nor a sample that passes the pair checks: its first two samples are chosen and rejected
    mp.setattr(pairs_data, "choose_pair", lambda item, samples, *a, **k: Choice(0, 1, "verified:stub", (None, "stub")))
    out = tmp_path_factory.mktemp("experiment")
    cfg = tiny_config(tiny_model_folder)
    real_training = dpo_step.train_dpo_here
    calls = {"n": 0}

    def interrupted_once(run, init):  # Ctrl-C in the middle of round 2's last DPO training
        if run.dir.name == "seed-1" and run.dir.parent.name == "round-2" and init == "sft" and not calls["n"]:
            calls["n"] += 1
            raise Interrupt()
        return real_training(run, init)

    mp.setattr(dpo_step, "train_dpo_here", interrupted_once)
    with pytest.raises(Interrupt):
        runner.run_experiment(cfg, out, seeds=2, rounds=2)
    state = json.loads((out / "experiment.json").read_text())
    before = {name: (out / name / "manifest.json").read_bytes() for name in state["runs"]}
    interrupted = json.loads((out / "round-2/seed-1/manifest.json").read_text())["steps"]
    final = runner.run_experiment(cfg, out, seeds=2, rounds=2)
    mp.undo()
    return {"out": out, "state_before": state, "manifests_before": before, "interrupted_steps": interrupted,
            "state": final, "config": cfg}


def test_an_interrupted_experiment_resumes_without_redoing_finished_work(experiment):
    out, before = experiment["out"], experiment["state_before"]
    assert before["runs"]["round-2/seed-1"]["status"] == "interrupted"
    assert [before["runs"][n]["status"] for n in ("round-1/seed-0", "round-1/seed-1", "round-2/seed-0")] == ["done"] * 3
    after = experiment["state"]
    assert all(r["status"] == "done" for r in after["runs"].values())
    for name in ("round-1/seed-0", "round-1/seed-1", "round-2/seed-0"):  # finished runs: not touched at all
        assert (out / name / "manifest.json").read_bytes() == experiment["manifests_before"][name]
    # the interrupted run kept what it had finished: same entries, same times
    resumed = json.loads((out / "round-2/seed-1/manifest.json").read_text())["steps"]
    for name in ("baseline", "instructions", "sft-data", "sft", "pairs"):
        assert resumed[name] == experiment["interrupted_steps"][name], name
    assert experiment["interrupted_steps"]["dpo"]["status"] == "interrupted" and resumed["dpo"]["status"] == "done"


def test_training_seeds_share_the_data_and_train_differently(experiment):
    out = experiment["out"]
    a, b = out / "round-1/seed-0", out / "round-1/seed-1"
    for rel in ("data/instructions.jsonl", "data/test.jsonl", "data/sft.jsonl", "baseline.json"):
        assert sha256_file(a / rel) == sha256_file(b / rel), rel
    steps = json.loads((b / "manifest.json").read_text())["steps"]
    assert steps["sft-data"]["provenance"]["adopted_from"]["run_dir"] == "../seed-0"
    assert sha256_path(a / "models/sft") != sha256_path(b / "models/sft")  # another training seed
    # every round answers the same held-out items
    assert sha256_file(out / "round-2/seed-1/data/test.jsonl") == sha256_file(a / "data/test.jsonl")


def test_round_two_data_is_written_by_round_one_models_checked_by_fingerprint(experiment, tiny_model_folder):
    out = experiment["out"]
    for seed in (0, 1):
        r1, r2 = out / f"round-1/seed-{seed}", out / f"round-2/seed-{seed}"
        dpo_fp = json.loads((r1 / "eval/evaluation.json").read_text())["models"]["dpo"]["fingerprint"]
        # the fingerprint of round 1's dpo, recomputed here from its adapters
        assert fingerprint(load_model(str(tiny_model_folder), adapters=[r1 / "models/sft", r1 / "models/dpo"]).model) == dpo_fp
        records = load_jsonl(r2 / "data/sft.jsonl", SFTRecord)
        assert records and {r.generator.model_fingerprint for r in records} == {dpo_fp}
        steps = json.loads((r2 / "manifest.json").read_text())["steps"]
        writer = steps["sft-data"]["provenance"]["writer"]
        assert writer["fingerprint"] == dpo_fp and writer["model"] == "dpo" and writer["round"] == 1
        assert writer["run_dir"] == f"../../round-1/seed-{seed}"
        assert steps["pairs"]["provenance"]["policy"]["fingerprint"] == dpo_fp
        # round 1's data was written by the base model
        base_fp = json.loads((r1 / "eval/evaluation.json").read_text())["models"]["base"]["fingerprint"]
        assert {r.generator.model_fingerprint for r in load_jsonl(r1 / "data/sft.jsonl", SFTRecord)} == {base_fp}


def test_experiment_report_shows_per_seed_pooled_and_both_rounds(experiment):
    out = experiment["out"]
    results = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    for rnd in results["rounds"]:
        assert rnd["seeds"] == [0, 1]
        ids = {(c["id"], c["aspect"]) for c in rnd["questions"]}
        assert ids == {(q, a) for q in ("Q1", "Q2", "Q3") for a in ("format", "content")}
        for c in rnd["questions"]:
            assert len(c["per_seed"]) == 2 and c["pooled"]["n_strata"] == 2
            assert c["pooled"]["n_pairs"] == sum(s["n"] for s in c["per_seed"])
            assert c["pooled"]["items_repeated"]  # the seeds answer the same items
            assert c["answer"] in ("better", "worse", "equivalent", "cannot tell")
            assert c["pooled"]["p_adjusted"] is not None
    assert {c["model"] for c in results["across_rounds"]} == {"sft", "dpo", "dpo_only"}
    md = (out / "report/experiment.md").read_text()
    for text in ("Pooled answers", "Round 1", "Round 2", "Rounds side by side", "Per seed", "Spread over seeds",
                 "seed 0", "seed 1", "dpo (round 2) vs dpo (round 1)", "](pooled.png)", "](spread.png)"):
        assert text in md, text
    html = (out / "report/experiment.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "src=\"http" not in html
    assert results["provenance"]["round-2/seed-0"]["sft_data_written_by"] == "dpo"


def test_estimate_comes_from_the_first_run_and_counts_adopted_steps_as_free(experiment):
    out, cfg = experiment["out"], experiment["config"]
    planned = plan_runs(cfg.seed, 2, 2, False)
    est = estimate(planned, cfg, out / "round-1/seed-0")
    steps = json.loads((out / "round-1/seed-0/manifest.json").read_text())["steps"]
    full = sum(s["duration_s"] for s in steps.values())
    shared = sum(steps[n]["duration_s"] for n in SHARED_DATA)
    lineage = sum(steps[n]["duration_s"] for n in ("baseline", "instructions"))
    expected = full + (full - shared) + 2 * (full - lineage) + 4 * 10.0
    assert est.total_s == pytest.approx(expected)
    assert est.device == "CPU" and "round-1/seed-0" in est.basis and est.differs == []
    assert "4 runs" in est.line() and "CPU hours" in est.line()
    # the line printed when the interrupted experiment was continued: one run left
    assert experiment["state"]["estimate"]["line"].startswith("4 runs (1 to do); estimated")


def test_an_experiment_folder_refuses_another_config(experiment, tiny_model_folder):
    with pytest.raises(ConfigError, match="other settings"):
        runner.run_experiment(tiny_config(tiny_model_folder, "sft.epochs=2"), experiment["out"], seeds=2, rounds=2)


def test_cli_plan_status_and_report_on_an_experiment_folder(experiment, tmp_path):
    from typer.testing import CliRunner

    from cai_bootstrap.cli import app
    from cai_bootstrap.config import dump_config

    out = experiment["out"]
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(dump_config(experiment["config"]))
    planned = CliRunner().invoke(app, ["plan", str(config_file), "--seeds", "3", "--rounds", "2", "--measured",
                                       str(out), "--json"])
    assert planned.exit_code == 0, planned.output
    cost = json.loads(planned.output)["experiment"]
    assert cost["runs"] == 6 and cost["device"] == "CPU" and cost["estimate_s"] > 0
    assert "round-1/seed-0" in cost["basis"]
    unmeasured = CliRunner().invoke(app, ["plan", str(config_file), "--seeds", "2"])
    assert "2 runs (2 to do); time: not estimated (pass --measured" in " ".join(unmeasured.output.split())
    status = CliRunner().invoke(app, ["status", str(out)])
    assert status.exit_code == 0 and status.output.count("done") >= 4 and "round-2" in status.output
    (out / "results.json").unlink()
    report = CliRunner().invoke(app, ["report", str(out)])
    assert report.exit_code == 0, report.output
    assert json.loads((out / "results.json").read_text())["rounds"][1]["round"] == 2


def test_an_upgrade_that_adds_config_options_does_not_stop_an_experiment():
    before = {"seed": 0, "sft": {"epochs": 2, "batch_size": 8}}
    assert runner.changed_keys(before, {"seed": 0, "sft": {"epochs": 2, "batch_size": 8, "new_option": 1}}) == []
    assert runner.changed_keys(before, {"seed": 0, "sft": {"epochs": 3, "batch_size": 8}}) == ["sft.epochs"]
