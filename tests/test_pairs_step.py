"""The pairs step on the tiny random model: the split of the training pool feeds sft-data and pairs
disjoint prompts; sampling gives N seeded samples per prompt; the step writes pairs, negatives and a
report whose counts add up, with margins scored by the SFT model."""

from __future__ import annotations

import json

from cai_bootstrap.config import load_config
from cai_bootstrap.data.prompt_split import load_split
from cai_bootstrap.data.ranking import Sample, problem
from cai_bootstrap.models.loading import load_model
from cai_bootstrap.run import Run
from cai_bootstrap.schemas import InstructionRecord, PreferencePair, load_jsonl, validate_kind
from cai_bootstrap.steps import pairs as pairs_step
from cai_bootstrap.steps import sft_data as sft_data_step
from cai_bootstrap.steps.common import INSTRUCTIONS, PROMPT_SPLIT, SFT_DIR
from cai_bootstrap.steps.generator import Generator
from cai_bootstrap.steps.instructions import run_instructions


def tiny_config(folder, *overrides):
    return load_config(None, [f"model.base={folder}", "generation.batch_size=8", "instructions.builtin=120",
                              "instructions.test_size=10", "sft_data.max_instructions=12",
                              "sft_data.max_new_tokens=8", "pairs.max_new_tokens=8", *overrides])


def fresh_adapter(model_folder, out):
    from peft import LoraConfig, get_peft_model

    base = load_model(str(model_folder)).model
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")).save_pretrained(out)
    return out


def scripted(gen, config, items):
    """Samples with a known outcome: a right and a wrong answer where there is a reference, else a tie."""
    out = {}
    for it in items:
        if it.reference_answers:
            texts = [it.reference_answers[0], "Certainly not that."]
        else:
            texts = ["One plain answer.", "Another plain answer."]
        out[it.id] = [Sample(t, f" {t}\nEND", "\nEND", "stop") for t in texts]
    return out


def test_split_feeds_sft_data_and_pairs_disjoint_prompts(tmp_path, tiny_model_folder, monkeypatch):
    run = Run(tmp_path, tiny_config(tiny_model_folder, "instructions.dpo_share=0.4", "pairs.synthetic_share=0"))
    assert run_instructions(run)
    pool = load_jsonl(run.path(INSTRUCTIONS), InstructionRecord)
    sft_items, dpo_items = load_split(run.path(PROMPT_SPLIT), pool)
    assert len(dpo_items) == round(0.4 * len(pool)) and len(sft_items) + len(dpo_items) == len(pool)
    metrics = run.steps()["instructions"]["metrics"]
    assert (metrics["sft_prompts"], metrics["dpo_prompts"], metrics["dpo_share"]) == (
        len(sft_items), len(dpo_items), 0.4)
    assert PROMPT_SPLIT in run.steps()["instructions"]["outputs"]

    seen = []
    real_prompts = sft_data_step.sft_prompts
    monkeypatch.setattr(sft_data_step, "sft_prompts", lambda config, items: (seen.extend(items),
                                                                             real_prompts(config, items))[1])
    assert sft_data_step.run_sft_data(run)
    assert len(seen) == 12 and {it.id for it in seen} <= {it.id for it in sft_items}

    fresh_adapter(tiny_model_folder, run.path(SFT_DIR))
    monkeypatch.setattr(pairs_step, "sample_responses", scripted)
    assert pairs_step.run_pairs(run)
    pairs = load_jsonl(run.path("data/pairs.jsonl"), PreferencePair)
    with_refs = [it for it in dpo_items if it.reference_answers]
    assert with_refs and {p.instruction_id for p in pairs} == {it.id for it in with_refs}
    assert not {p.instruction_id for p in pairs} & {it.id for it in sft_items}  # DPO never sees an SFT prompt
    for p in pairs:
        assert p.chosen.endswith("\nEND") and p.rejected == " Certainly not that.\nEND"
        assert isinstance(p.margin, float) and p.confident == (p.margin > 1.0)
    assert validate_kind("negatives", run.path("data/negatives.jsonl")) == (len(pairs), [])

    report = json.loads(run.path("data/pairs_report.json").read_text())
    assert report["prompts"] == report["dpo_prompt_pool"] == len(dpo_items)
    assert report["pairs"] + sum(report["no_pair"].values()) == len(dpo_items)
    # items without a reference tie, unless the plain answers fail their constraints (then nothing is acceptable)
    failing = sum(problem(it, Sample("One plain answer.", "", "\nEND", "stop")) is not None
                  for it in dpo_items if not it.reference_answers)
    no_pair = {"all_tie": len(dpo_items) - len(with_refs) - failing, "no_acceptable_sample": failing}
    assert report["no_pair"] == {k: v for k, v in no_pair.items() if v} and failing
    assert sum(report["basis"].values()) == len(pairs) and report["basis"]["verified:incorrect_answer"]
    assert set(report["basis"]) <= {"verified:incorrect_answer", "verified:constraint_failed"}
    assert report["samples"]["total"] == report["samples"]["wrote_end"] == 2 * len(dpo_items)
    assert sum(report["samples"]["by_problem"].values()) == 2 * len(dpo_items)
    d = report["diagnostics"]
    assert d["pairs"] == len(pairs) and d["sources"]["on_policy"] == len(pairs)
    assert d["surface_separable"]["by_rule"]["missing_end"] == 0 and d["margin"]["n"] == len(pairs)
    step = run.steps()["pairs"]
    assert step["counts"]["kept"] == len(pairs)
    assert step["counts"]["dropped"] == {f"no_pair:{k}": v for k, v in report["no_pair"].items()}
    assert step["metrics"]["surface_separable"] == d["surface_separable"]["share"]
    assert step["metrics"]["rejected_longer"] == d["length"]["rejected_longer"]
    assert not pairs_step.run_pairs(run)  # unchanged: skipped


def test_sampling_gives_n_seeded_samples_per_prompt(tiny_model_folder):
    config = tiny_config(tiny_model_folder, "pairs.samples_per_prompt=3", "pairs.temperature=1.0",
                         "pairs.max_new_tokens=6")
    items = [InstructionRecord(id=f"i{k}", instruction=f"Say something about number {k}.", category="open",
                               source="user") for k in range(5)]
    with Generator(config) as gen:
        first = pairs_step.sample_responses(gen, config, items)
        again = pairs_step.sample_responses(gen, config, items)
    assert first == again  # seeded
    assert list(first) == [it.id for it in items] and all(len(v) == 3 for v in first.values())
    # three seeds, three draws: the random model's samples of one prompt differ
    assert sum(len({x.raw_text for x in v}) > 1 for v in first.values()) >= 4


def test_critic_ranks_only_the_ties_and_is_checked_against_the_verified_pairs(tmp_path, tiny_model_folder,
                                                                            monkeypatch):
    run = Run(tmp_path, tiny_config(tiny_model_folder, "instructions.dpo_share=0.4", "pairs.synthetic_share=0",
                                    "pairs.critic.enabled=true", "pairs.critic.min_gap=0"))
    run_instructions(run)
    _, dpo_items = load_split(run.path(PROMPT_SPLIT), load_jsonl(run.path(INSTRUCTIONS), InstructionRecord))
    fresh_adapter(tiny_model_folder, run.path(SFT_DIR))
    monkeypatch.setattr(pairs_step, "sample_responses", scripted)
    assert pairs_step.run_pairs(run)
    report = json.loads(run.path("data/pairs_report.json").read_text())
    ok = Sample("One plain answer.", "", "\nEND", "stop")
    ties = sum(not it.reference_answers and problem(it, ok) is None for it in dpo_items)
    verified = report["basis"].get("verified:incorrect_answer", 0) + report["basis"].get("verified:constraint_failed", 0)
    assert ties and verified
    assert report["critic"]["enabled"] is True and report["critic"]["prompts_scored"] == ties
    assert report["critic"]["verified_pairs_checked"] == verified  # both sides end with END
    assert 0 <= report["critic"]["agrees_with_checks"] <= verified
    # with no minimum gap every tie becomes a critic pair (the random model's margins are never equal)
    assert report["basis"]["critic"] == ties and "all_tie" not in report["no_pair"]
    pairs = load_jsonl(run.path("data/pairs.jsonl"), PreferencePair)
    critic_pairs = [p for p in pairs if p.rejected in (" One plain answer.\nEND", " Another plain answer.\nEND")]
    assert len(critic_pairs) == ties and all(p.chosen != p.rejected for p in critic_pairs)
