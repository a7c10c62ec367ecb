"""Pipeline steps on the tiny random model: artifacts, counts, skipping, leakage, isolation, report."""

import json

import pytest

from cai_bootstrap.config import load_config
from cai_bootstrap.data.dedup import near_duplicate_pairs
from cai_bootstrap.data.split import LeakageError
from cai_bootstrap.files import write_jsonl
from cai_bootstrap.models.loading import load_model
from cai_bootstrap.models.precision import resolve_mixed_precision
from cai_bootstrap.run import Run
from cai_bootstrap.schemas import InstructionRecord, load_jsonl, validate_kind
from cai_bootstrap.steps import evaluate as evaluate_step
from cai_bootstrap.steps.baseline import run_baseline
from cai_bootstrap.steps.common import INSTRUCTIONS, TEST, TEST_IN_DISTRIBUTION
from cai_bootstrap.steps.evaluate import IsolationError, ModelUnderTest, evaluate_models, run_evaluate
from cai_bootstrap.steps.instructions import run_instructions
from cai_bootstrap.steps.report import build_report
from cai_bootstrap.steps.sft_data import run_sft_data


def tiny_config(folder, *overrides):
    return load_config(None, [f"model.base={folder}", "generation.batch_size=8", *overrides])


def make_adapter(model_folder, out, seed):
    """A LoRA adapter with non-zero weights, so that it changes the model."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = load_model(str(model_folder)).model
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    peft.save_pretrained(out)
    return out


def test_instructions_step_split_counts_and_skip(tmp_path, tiny_model_folder):
    cfg = tiny_config(tiny_model_folder, "instructions.builtin=300", "instructions.test_size=30",
                      "instructions.self_instruct_rounds=2", "instructions.self_instruct_max_new_tokens=24")
    run = Run(tmp_path, cfg)
    assert run_instructions(run)
    train = load_jsonl(run.path(INSTRUCTIONS), InstructionRecord)
    test = load_jsonl(run.path(TEST), InstructionRecord)
    assert len(test) == 30 and len(train) > 150
    assert not near_duplicate_pairs(train, test, cfg.instructions.dedup_threshold)
    assert {r.category for r in test} == {"qa", "open", "completion", "constrained", "transformation", "format"}
    step = run.steps()["instructions"]
    report = json.loads(run.path("data/instructions_report.json").read_text())
    # template-disjoint by default: the report lists both sides' templates, and they do not meet
    assert report["split_by"] == "template" and report["shared_templates"] == 0
    assert report["test_templates"] == sorted({r.template for r in test})
    assert report["train_templates"] == sorted({r.template for r in train if r.template})
    assert not set(report["train_templates"]) & set(report["test_templates"])
    assert report["categories_without_test"] == []
    # every candidate is accounted for: kept in train/test or dropped by a counted reason
    c = report["candidates"]
    assert c["builtin"] + c["self_instruct"] == len(train) + len(test) + sum(report["dedup_dropped"].values()) \
        + sum(report["self_instruct_dedup_dropped"].values()) + report["leakage_purged_from_train"] \
        + report["test_template_surplus"]
    assert step["counts"]["kept"] == len(train) + len(test)
    assert step["counts"]["dropped"]["test_template_surplus"] == report["test_template_surplus"] > 0
    assert not run_instructions(run)  # unchanged: skipped


def test_self_instruct_is_seeded_from_the_training_side_only(tmp_path, tiny_model_folder, monkeypatch):
    from cai_bootstrap.steps import instructions as step

    seen = []
    real = step.build_prompt

    def spy(seeds, rng):
        seen.extend(seeds)
        return real(seeds, rng)

    monkeypatch.setattr(step, "build_prompt", spy)
    cfg = tiny_config(tiny_model_folder, "instructions.builtin=200", "instructions.test_size=20",
                      "instructions.self_instruct_rounds=2", "instructions.self_instruct_max_new_tokens=8",
                      "instructions.in_distribution_size=10")
    run = Run(tmp_path, cfg)
    run_instructions(run)
    test = load_jsonl(run.path(TEST), InstructionRecord)
    slice_ = load_jsonl(run.path(TEST_IN_DISTRIBUTION), InstructionRecord)
    assert seen and not {r.id for r in seen} & {r.id for r in [*test, *slice_]}
    assert not {r.template for r in seen} & {r.template for r in test}
    report = json.loads(run.path("data/instructions_report.json").read_text())
    assert report["self_instruct_seeds"] == {"from": "training side only", "n": len(seen) // 2}


def test_in_distribution_slice_is_unseen_fillers_of_training_templates(tmp_path, tiny_model_folder):
    cfg = tiny_config(tiny_model_folder, "instructions.builtin=200", "instructions.test_size=20",
                      "instructions.in_distribution_size=12")
    run = Run(tmp_path, cfg)
    run_instructions(run)
    train = load_jsonl(run.path(INSTRUCTIONS), InstructionRecord)
    test = load_jsonl(run.path(TEST), InstructionRecord)
    slice_ = load_jsonl(run.path(TEST_IN_DISTRIBUTION), InstructionRecord)
    assert len(slice_) == 12
    assert {r.template for r in slice_} <= {r.template for r in train}  # training templates ...
    assert not {r.id for r in slice_} & {r.id for r in train}  # ... but fillers never trained on
    assert not near_duplicate_pairs(train, slice_, cfg.instructions.dedup_threshold)
    assert not {r.template for r in slice_} & {r.template for r in test}
    # switched off, the slice file goes: a stale slice must not be evaluated
    run.config = tiny_config(tiny_model_folder, "instructions.builtin=200", "instructions.test_size=20")
    run_instructions(run)
    assert not run.path(TEST_IN_DISTRIBUTION).exists()


def test_item_split_is_an_option_and_says_templates_are_shared(tmp_path, tiny_model_folder):
    cfg = tiny_config(tiny_model_folder, "instructions.builtin=200", "instructions.test_size=20",
                      "instructions.split_by=item")
    run = Run(tmp_path, cfg)
    run_instructions(run)
    report = json.loads(run.path("data/instructions_report.json").read_text())
    assert report["split_by"] == "item" and report["shared_templates"] > 0 and report["test_template_surplus"] == 0
    with pytest.raises(ValueError, match="in_distribution_size needs split_by: template"):
        tiny_config(tiny_model_folder, "instructions.split_by=item", "instructions.in_distribution_size=5")


def test_user_files_are_validated_and_user_leakage_fails_loudly(tmp_path, tiny_model_folder):
    user_train = [InstructionRecord(id="u1", instruction="Describe the smell of fresh rain on a summer street.",
                                    category="open", source="user")]
    user_test = [InstructionRecord(id="t1", instruction="Describe the smell of fresh rain on summer streets.",
                                   category="open", source="user"),
                 InstructionRecord(id="t2", instruction="Name a prime number larger than one hundred.",
                                   category="qa", source="user")]
    write_jsonl(tmp_path / "train.jsonl", user_train)
    write_jsonl(tmp_path / "test.jsonl", user_test)
    cfg = tiny_config(tiny_model_folder, "instructions.builtin=50", f"instructions.train_file={tmp_path}/train.jsonl",
                      f"instructions.test_file={tmp_path}/test.jsonl")
    with pytest.raises(LeakageError, match="t1"):
        run_instructions(Run(tmp_path / "run", cfg))
    (tmp_path / "test.jsonl").write_text('{"id": "t1", "instruction": "", "category": "qa", "source": "user"}\n')
    with pytest.raises(ValueError, match="test.jsonl:1: instruction"):
        run_instructions(Run(tmp_path / "run2", cfg))


def test_a_user_test_set_with_builtin_templates_keeps_them_out_of_training(tmp_path, tiny_model_folder):
    from cai_bootstrap.data.split import TemplateLeakageError

    user_test = [InstructionRecord(id="t1", instruction="What is the capital of Atlantis?", category="qa",
                                   source="user", reference_answers=["Poseidonia"], template="qa-capital")]
    write_jsonl(tmp_path / "test.jsonl", user_test)
    cfg = tiny_config(tiny_model_folder, "instructions.builtin=300", f"instructions.test_file={tmp_path}/test.jsonl")
    run = Run(tmp_path / "run", cfg)
    run_instructions(run)
    train = load_jsonl(run.path(INSTRUCTIONS), InstructionRecord)
    report = json.loads(run.path("data/instructions_report.json").read_text())
    assert report["template_in_test_dropped"] > 0 and "qa-capital" not in {r.template for r in train}
    # the user's own training item of that template is never dropped: the check fails loudly instead
    mine = [InstructionRecord(id="u1", instruction="What is the capital of Lemuria?", category="qa", source="user",
                              reference_answers=["Mu"], template="qa-capital")]
    write_jsonl(tmp_path / "train.jsonl", mine)
    cfg = tiny_config(tiny_model_folder, "instructions.builtin=50", f"instructions.test_file={tmp_path}/test.jsonl",
                      f"instructions.train_file={tmp_path}/train.jsonl")
    with pytest.raises(TemplateLeakageError, match="qa-capital"):
        run_instructions(Run(tmp_path / "run2", cfg))


def test_test_items_like_a_few_shot_example_are_reported_for_q1(tmp_path, tiny_model_folder):
    from cai_bootstrap.steps.report import question_notes

    user_test = [InstructionRecord(id="t1", instruction="What is the capital of Italy?", category="qa",
                                   source="user", reference_answers=["Rome"]),  # a worked example of the prompt
                 InstructionRecord(id="t2", instruction="Name a prime number larger than one hundred.",
                                   category="qa", source="user", reference_answers=["101"])]
    write_jsonl(tmp_path / "test.jsonl", user_test)
    cfg = tiny_config(tiny_model_folder, "instructions.builtin=50", f"instructions.test_file={tmp_path}/test.jsonl")
    run = Run(tmp_path / "run", cfg)
    run_instructions(run)
    report = json.loads(run.path("data/instructions_report.json").read_text())
    assert report["few_shot_near_test"] == [{"test_id": "t1", "shot": "What is the capital of Italy?", "similarity": 1.0}]
    evaluation = {"few_shot": {"k": 3, "seed": 0}, "prompt_forms": {"base_fewshot": "few_shot"}}
    notes = question_notes(run, evaluation, {"few_shot_near_test": report["few_shot_near_test"]})
    assert "1 test item(s) are near-duplicates of a worked example" in notes["Q1"][1] and "t1" in notes["Q1"][1]
    assert len(question_notes(run, evaluation, {"few_shot_near_test": []})["Q1"]) == 1
    # the training budgets go under Q2 and Q3 (evaluation.training_summary.budget_notes)
    from cai_bootstrap.evaluation.training_summary import budget_notes, training_summary

    sft = {"examples": {"train": 106}, "hyperparameters": {"epochs": 2.0, "max_steps": None, "total_steps": 28},
           "tokens": {"tokens": 21000, "supervised_tokens": 4300}}
    dpo = {"pairs_used": 85, "steps": 22, "pairs_seen": 170, "tokens_seen": 40000, "learning_rate": 5e-4,
           "trainer_args": {"num_train_epochs": 2.0, "max_steps": -1},
           "parity": {"checked_against": None, "same": ["steps"], "declared_differences": []}}
    training = training_summary({"sft": sft, "dpo": {**dpo, "init": "sft"}, "dpo_only": {**dpo, "init": "base"}}, None)
    with_budgets = question_notes(run, evaluation, None, training)
    assert set(budget_notes(training)) == {"Q2", "Q3"}
    assert with_budgets == {"Q1": notes["Q1"][:1], **budget_notes(training)}


def test_sft_data_counts_add_up(tmp_path, tiny_model_folder):
    cfg = tiny_config(tiny_model_folder, "instructions.builtin=120", "instructions.test_size=10",
                      "sft_data.max_instructions=12", "sft_data.max_new_tokens=8")
    run = Run(tmp_path, cfg)
    run_instructions(run)
    run_sft_data(run)
    qc = json.loads(run.path("data/sft_qc.json").read_text())
    assert qc["generated"] == 12
    assert qc["generated"] == qc["kept"] + sum(qc["dropped"].values())
    assert validate_kind("sft", run.path("data/sft.jsonl"))[1] == []
    step = run.steps()["sft-data"]
    assert step["counts"]["kept"] == qc["kept"] and step["counts"]["dropped"] == qc["dropped"]


def test_baseline_step_records_forms_prompts_and_sentinels(tmp_path, tiny_model_folder):
    cfg = tiny_config(tiny_model_folder, "baseline.n_probes=6", "baseline.max_new_tokens=6")
    run = Run(tmp_path, cfg)
    run_baseline(run)
    b = json.loads(run.path("baseline.json").read_text())
    assert set(b["forms"]) == {"raw", "wrapper", "few_shot"}
    assert b["n_probes"] == 6 and len(b["prompts"]["wrapper"]) == 6
    assert all(p.startswith("Instruction: ") and p.endswith("\nResponse:") for p in b["prompts"]["wrapper"])
    assert all(p.count("\nEND") == cfg.baseline.few_shot for p in b["prompts"]["few_shot"])
    assert b["sentinels"]["no_special_tokens_in_prompts"] is True
    assert b["sentinels"]["prompts_round_trip_exactly"] is True
    assert set(b["forms"]["wrapper"]) >= {"ends_with_end", "no_rambling", "ifeval_strict"}


@pytest.fixture()
def eval_run(tmp_path, tiny_model_folder):
    cfg = tiny_config(tiny_model_folder, "instructions.builtin=100", "instructions.test_size=8",
                      "evaluation.max_new_tokens=6", "evaluation.batch_size=8")
    run = Run(tmp_path, cfg)
    run_instructions(run)
    make_adapter(tiny_model_folder, run.path("models/sft"), 1)
    make_adapter(tiny_model_folder, run.path("models/dpo"), 2)
    make_adapter(tiny_model_folder, run.path("models/dpo_only"), 3)
    return run


def test_evaluate_writes_responses_fingerprints_and_report_rebuilds(eval_run, monkeypatch):
    run = eval_run
    assert run_evaluate(run)
    record = json.loads(run.path("eval/evaluation.json").read_text())
    assert record["order"] == ["base", "base_fewshot", "sft", "dpo", "dpo_only"]
    fps = {n: m["fingerprint"] for n, m in record["models"].items()}
    assert len(set(fps.values())) == 4  # every model ran its own weights; base_fewshot the base ones
    assert record["isolation"]["base_fingerprint_before"] == record["isolation"]["base_fingerprint_after"] == fps["base"]
    assert fps["base_fewshot"] == fps["base"]
    assert record["prompt_forms"] == {"base": "zero_shot", "base_fewshot": "few_shot", "sft": "zero_shot",
                                      "dpo": "zero_shot", "dpo_only": "zero_shot"}
    # base_fewshot got the prompts that wrote the SFT data, recorded with each response
    from cai_bootstrap.steps.sft_data import sft_prompts

    items = load_jsonl(run.path(TEST), InstructionRecord)
    few = load_jsonl(run.path("eval/responses/base_fewshot.jsonl"), evaluate_step.EvalResponse)
    assert [r.prompt for r in few] == sft_prompts(run.config, items)
    assert all(r.prompt_form == "few_shot" and r.prompt.count("\nEND") == run.config.sft_data.few_shot for r in few)
    zero = load_jsonl(run.path("eval/responses/base.jsonl"), evaluate_step.EvalResponse)
    assert all(r.prompt_form == "zero_shot" and "\nEND" not in r.prompt for r in zero)
    assert all(m["memory"]["rss_peak_mb"] > 0 for m in record["models"].values())
    for name in record["order"]:
        assert validate_kind("responses", run.path(f"eval/responses/{name}.jsonl"))[1] == []

    # the report is rebuilt from saved responses alone: loading a model would fail here
    def no_models(*a, **k):
        raise AssertionError("report must not load a model")

    monkeypatch.setattr(evaluate_step, "load_model", no_models)
    first = build_report(run)["results"]
    second = build_report(run)["results"]
    assert first == second
    assert run.path("report/report.html").is_file() and run.path("report/report.md").is_file()
    md = run.path("report/report.md").read_text()
    for name in ("base", "base_fewshot", "sft", "dpo", "dpo_only"):
        assert name in md
    assert [q["evaluated"] for q in first["questions"]] == [True, True, True]
    assert first["test_set"]["split_by"] == "template"
    assert any("base_fewshot is the base model prompted" in n for n in first["questions"][0]["notes"])


def test_every_model_the_config_accepts_is_one_evaluate_knows():
    from cai_bootstrap.config import EVALUATED_MODELS

    assert tuple(evaluate_step.MODELS) == EVALUATED_MODELS


def test_isolation_check_catches_a_contaminated_model_object(eval_run):
    """A loader that reuses one model object and merges adapters into it in place must be caught."""
    from peft import PeftModel

    run = eval_run
    shared = {}

    def reusing_loader(m, config):
        loaded = shared.get("obj") or load_model(m.spec)
        shared["obj"] = loaded
        for a in m.adapters:  # attaches to the object used before: the bug isolation guards against
            loaded.model = PeftModel.from_pretrained(loaded.model, str(a)).merge_and_unload()
        return type(loaded)(loaded.model, loaded.tokenizer, loaded.resolved, dict(loaded.provenance))

    items = load_jsonl(run.path(TEST), InstructionRecord)[:2]
    models = [ModelUnderTest("base", run.config.model.base, ()),
              ModelUnderTest("sft", run.config.model.base, (run.path("models/sft"),))]
    with pytest.raises(IsolationError, match="base weights changed"):
        evaluate_models(models, items, run.config, loader=reusing_loader)
    # the real loader passes on the same models
    responses, record = evaluate_models(models, items, run.config)
    assert record["isolation"]["verified"] and set(responses) == {"base", "sft"}


def test_sft_data_best_of_n_with_critic_counts_every_candidate(tmp_path, tiny_model_folder, monkeypatch):
    """With best-of-3 and the critic, every candidate is kept once or dropped for a reason, and the
    kept one is the critic's favourite among the survivors."""
    from cai_bootstrap.steps import sft_data as step

    monkeypatch.setattr(step, "qc_reason", lambda *a: None)  # the random tiny model never passes QC
    cfg = tiny_config(tiny_model_folder, "instructions.builtin=120", "instructions.test_size=10",
                      "sft_data.max_instructions=5", "sft_data.max_new_tokens=6", "sft_data.best_of_n=3",
                      "sft_data.critic.enabled=true", "sft_data.critic.min_margin=-1000")
    run = Run(tmp_path, cfg)
    run_instructions(run)
    run_sft_data(run)
    qc = json.loads(run.path("data/sft_qc.json").read_text())
    assert qc["generated"] == 15 and qc["kept"] == 5
    assert qc["dropped"] == {"not_best_of_n": 10}
    assert qc["critic"]["calibration_margin"] is not None
    records = load_jsonl(run.path("data/sft.jsonl"), step.SFTRecord)
    assert all(r.candidates == 3 and r.critic_margin is not None for r in records)


def test_judge_scores_are_saved_and_reported_apart(eval_run):
    run = eval_run
    run.config = run.config.model_copy(update={"evaluation": run.config.evaluation.model_copy(
        update={"judge": "self", "models": ["base", "sft"]})})
    run_evaluate(run)
    judged = [json.loads(line) for line in run.path("eval/judge.jsonl").read_text().splitlines()]
    assert len(judged) == 2 * 8 and {j["model"] for j in judged} == {"base", "sft"}
    results = build_report(run)["results"]
    assert results["judge"] is not None
    assert "margin" in json.dumps(results["judge"])
    assert "judge" not in results["rates"]["base"]


def test_score_command_scores_saved_responses(eval_run):
    from typer.testing import CliRunner

    from cai_bootstrap.cli import app

    run = eval_run
    run_evaluate(run)
    r = CliRunner().invoke(app, ["score", str(run.path("eval/responses/sft.jsonl")), "--tests", str(run.path(TEST)),
                                 "--json"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.output.splitlines() if line.startswith("{")]
    assert len(rows) == 8 and all(row["model"] == "sft" for row in rows)
    assert set(rows[0]["criteria"]) >= {"ends_with_end", "no_rambling", "coherent"}


@pytest.mark.distributed
def test_sft_step_under_accelerate_launch_trains_on_two_processes(tmp_path, tiny_model_folder):
    from pathlib import Path

    from cai_bootstrap.schemas import GeneratorProvenance, SFTRecord
    from cai_bootstrap.steps.sft import run_sft

    cfg = tiny_config(tiny_model_folder, "sft.batch_size=2", "sft.epochs=1", "sft.eval_share=0", "sft.lora.r=4")
    run = Run(tmp_path, cfg)
    gen = GeneratorProvenance(model="tiny", quantization="none", quantization_requested="none",
                              full_precision_fallback=False, dtype="float32", add_bos_token=False, decoding={}, seed=0)
    records = [SFTRecord(id=f"s{i}", instruction=f"Name animal number {i}.", category="qa",
                         prompt=f"Instruction: Name animal number {i}.\nResponse:", response=f"Animal {i} is a cat.",
                         generator=gen, finish_reason="stop", stop_string="\nEND") for i in range(8)]
    write_jsonl(run.path("data/sft.jsonl"), records)
    config_file = Path(__file__).resolve().parent.parent / "configs/accelerate/cpu_2proc.yaml"
    assert run_sft(run, accelerate_config=config_file)
    step = run.steps()["sft"]
    assert step["status"] == "done" and step["counts"]["kept"] == 8
    assert step["metrics"]["num_processes"] == 2
    assert step["metrics"]["total_steps"] == 2  # 8 examples / (2 per process x 2 processes)
    # the run config decides the autocast in the launched processes, not the accelerate config's 'no'
    assert step["metrics"]["mixed_precision"] == resolve_mixed_precision(run.config.sft.mixed_precision, "cpu")[0]
    assert run.path("models/sft/adapter_config.json").is_file()
    assert step["provenance"]["launcher"]["accelerate_config"] == str(config_file)


def test_the_prompt_split_follows_the_data_seed_not_the_training_seed(tmp_path, tiny_model_folder):
    """The instructions step is a data step (its skip hash holds the data seed): two training seeds
    with one data seed write the same SFT/DPO prompt split, another data seed a different one."""
    def split_for(name, *seeds):
        cfg = tiny_config(tiny_model_folder, "instructions.builtin=200", "instructions.test_size=20",
                          "instructions.self_instruct_rounds=0", *seeds)
        run = Run(tmp_path / name, cfg)
        run_instructions(run)
        return run.path("data/prompt_split.json").read_text()

    assert split_for("a", "seed=1", "data_seed=7") == split_for("b", "seed=2", "data_seed=7")
    assert split_for("a", "seed=1", "data_seed=7") != split_for("c", "seed=1", "data_seed=8")
