"""`instructions`: built-in pool + user files -> split -> self-instruct from the training side ->
de-duplicated, leak-checked train pool and held-out test set."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from ..config import PipelineConfig
from ..console import console
from ..data.dedup import deduplicate, near_duplicate_pairs
from ..data.pool import builtin_pool
from ..data.prompt_split import split_prompts
from ..data.sampling import stratified_sample
from ..data.self_instruct import build_prompt, parse_numbered_list
from ..data.split import check_leakage, check_template_leakage, purge_leaks, shared_templates, split, split_by_template
from ..files import atomic_write_json, write_jsonl
from ..formats import RUNAWAY_MARKERS
from ..generation.engine import Decoding
from ..run import Run
from ..evaluation.ifeval import is_input_file, load_test_items
from ..schemas import CATEGORIES, ArtifactError, InstructionRecord
from .common import INSTRUCTIONS, INSTRUCTIONS_REPORT, PROMPT_SPLIT, TEST, TEST_IN_DISTRIBUTION, few_shot_pool
from .generator import Generator


def self_instruct(config: PipelineConfig, seeds: list[InstructionRecord]) -> tuple[list[InstructionRecord], Counter]:
    """The base model continues numbered lists of seed instructions; parsed lines become new items."""
    cfg = config.instructions
    dropped: Counter = Counter()
    if cfg.self_instruct_rounds == 0:
        return [], dropped
    rng = random.Random(f"self-instruct:{config.data_seed_value}")
    prompts, starts = [], []
    for _ in range(cfg.self_instruct_rounds):
        prompt, start = build_prompt(seeds, rng)
        prompts.append(prompt)
        starts.append(start)
    decoding = Decoding(max_new_tokens=cfg.self_instruct_max_new_tokens, temperature=cfg.self_instruct_temperature,
                        top_p=0.95, seed=config.data_seed_value, stop_strings=("\n\n", *RUNAWAY_MARKERS))
    with Generator(config) as gen:
        outs = gen.generate(prompts, decoding, label="self-instruct")
    new: list[InstructionRecord] = []
    seen = [s.instruction for s in seeds]
    for k, (g, start) in enumerate(zip(outs, starts)):
        kept, rejected = parse_numbered_list(g.raw_text, start, complete=g.finish_reason != "length", exclude=seen)
        for reason in (r for _, r in rejected):
            dropped[f"self_instruct_{reason}"] += 1
        for j, text in enumerate(kept):
            new.append(InstructionRecord(id=f"si-{k}-{j}", instruction=text, category="open", source="self_instruct"))
            seen.append(text)
    return new, dropped


def in_distribution_slice(train: list[InstructionRecord], n: int, seed: int) -> list[InstructionRecord]:
    """n unseen fillers of training templates, stratified by category (never a user's own item).
    The first item of every template stays in training, so each slice item's template is trained on."""
    first: set[str] = set()
    candidates = []
    for r in train:
        if r.template and r.source == "builtin":
            if r.template in first:
                candidates.append(r)
            first.add(r.template)
    if n > len(candidates) // 2:
        raise ValueError(f"instructions.in_distribution_size: {n} is more than half of the {len(candidates)} "
                         f"training items that come from a template")
    return stratified_sample(candidates, n, seed, "in-distribution")


def _load_user(path: str | None, key: str) -> list[InstructionRecord]:
    """InstructionRecord JSONL, or IFEval's input_data.jsonl (evaluation.ifeval.load_inputs)."""
    records = load_test_items(Path(path)) if path else []
    if path and not records:  # an empty file must not quietly mean "draw from the pool instead"
        raise ArtifactError(Path(path), [f"{path}: no records (instructions.{key} is empty)"])
    return records


def step_params(config: PipelineConfig) -> str:
    """What decides the step's output (a data step: the data seed, not the training seed)."""
    return config.data_hash("instructions")


def _templates(records: list[InstructionRecord]) -> list[str]:
    return sorted({r.template for r in records if r.template})


def few_shot_near(held_out: list[InstructionRecord], threshold: float) -> list[dict]:
    """Held-out items that are near-duplicates of a worked example of the few-shot prompt (which
    base_fewshot and sft-data see): worth knowing when reading Q1, never dropped."""
    shots = [InstructionRecord(id=f"shot-{k}", instruction=e.instruction, category="open", source="builtin")
             for k, e in enumerate(few_shot_pool())]
    text = {r.id: r.instruction for r in shots}
    return [{"test_id": b, "shot": text[a], "similarity": round(s, 3)}
            for a, b, s in near_duplicate_pairs(shots, held_out, threshold)]


def run_instructions(run: Run, force: bool = False) -> bool:
    config = run.config
    cfg = config.instructions
    # The user's files are inputs like any other: their hashes decide whether the step re-runs.
    user_inputs = [str(Path(p).resolve()) for p in (cfg.train_file, cfg.test_file) if p]
    params = step_params(config)
    if not force and run.is_current("instructions", params, user_inputs):
        console.print("instructions: up to date, skipped")
        return False
    outputs = [INSTRUCTIONS, TEST, INSTRUCTIONS_REPORT, PROMPT_SPLIT]
    outputs += [TEST_IN_DISTRIBUTION] if cfg.in_distribution_size else []
    with run.step("instructions", params, user_inputs, outputs) as step:
        user_train, user_test = _load_user(cfg.train_file, "train_file"), _load_user(cfg.test_file, "test_file")
        pool = builtin_pool()
        if cfg.builtin is not None and cfg.builtin > len(pool):
            console.print(f"[yellow]instructions.builtin is {cfg.builtin}, the built-in pool has {len(pool)}: "
                          f"using all {len(pool)}[/]")
        builtin = stratified_sample(pool, cfg.builtin, config.data_seed_value, "builtin")
        # Order is priority for de-duplication: the user's items, then built-in.
        dedup = deduplicate([*user_train, *builtin], threshold=cfg.dedup_threshold)
        surplus: list[InstructionRecord] = []
        template_in_test: list[InstructionRecord] = []
        if user_test and is_input_file(cfg.test_file):
            # A benchmark is its prompts: IFEval's file is kept whole, never de-duplicated.
            train, test, test_dropped = dedup.kept, user_test, {}
        elif user_test:
            test_dedup = deduplicate(user_test, threshold=cfg.dedup_threshold)
            train, test = dedup.kept, test_dedup.kept
            test_dropped = test_dedup.counts
        else:
            size = int(cfg.test_size) if cfg.test_size >= 1 else cfg.test_size
            if cfg.split_by == "template":
                train, test, surplus = split_by_template(dedup.kept, size, config.data_seed_value)
            else:
                train, test = split(dedup.kept, size, config.data_seed_value)
            test_dropped = {}
        if user_test and cfg.split_by == "template":
            # Built-in items of a template the user's test set uses go; the user's own stay (and
            # fail the template check below if they share one).
            held = {r.template for r in test if r.template}
            template_in_test = [r for r in train if r.source == "builtin" and r.template in held]
            train = [r for r in train if not (r.source == "builtin" and r.template in held)]
        in_dist = (in_distribution_slice(train, cfg.in_distribution_size, config.data_seed_value)
                   if cfg.in_distribution_size else [])
        sliced = {r.id for r in in_dist}
        train = [r for r in train if r.id not in sliced]
        held_out = [*test, *in_dist]

        # Self-instruct is seeded from the training side only: no test item ever seeds generation.
        seeds = list(train)
        generated, si_dropped = self_instruct(config, seeds) if cfg.self_instruct_rounds else ([], Counter())
        si_dedup_dropped: Counter = Counter()
        if generated:
            mine = {r.id for r in generated}
            result = deduplicate([*train, *held_out, *generated], threshold=cfg.dedup_threshold)
            survivors = {r.id for r in result.kept}
            si_dedup_dropped = Counter(d.reason for d in result.dropped if d.record.id in mine)
            generated = [r for r in generated if r.id in survivors]
        train = [*train, *generated]

        # Generated items (built-in, self-instruct) that resemble a held-out item are purged and counted;
        # the user's own training items are never dropped: if one leaks, the checks below fail loudly.
        users = [r for r in train if r.source == "user"]
        generated_train, leaks = purge_leaks([r for r in train if r.source != "user"], held_out, cfg.dedup_threshold)
        train = [*users, *generated_train]
        check_leakage(train, held_out, cfg.dedup_threshold)
        if cfg.split_by == "template":
            check_template_leakage(train, test)
        write_jsonl(run.path(INSTRUCTIONS), train)
        write_jsonl(run.path(TEST), test)
        prompt_split = split_prompts(train, cfg.dpo_share, config.data_seed_value)
        atomic_write_json(run.path(PROMPT_SPLIT), prompt_split.model_dump())
        if cfg.in_distribution_size:
            write_jsonl(run.path(TEST_IN_DISTRIBUTION), in_dist)
        elif run.path(TEST_IN_DISTRIBUTION).exists():
            run.path(TEST_IN_DISTRIBUTION).unlink()  # a stale slice must not be evaluated or reported
        report = {
            "split_by": cfg.split_by,
            "candidates": {"user_train": len(user_train), "builtin": len(builtin), "self_instruct": len(generated)
                           + sum(si_dedup_dropped.values()), "user_test": len(user_test)},
            "dedup_dropped": dedup.counts,
            "test_dedup_dropped": test_dropped,
            "self_instruct_dropped": dict(si_dropped),
            "self_instruct_dedup_dropped": dict(si_dedup_dropped),
            "self_instruct_seeds": {"from": "training side only", "n": len(seeds) if cfg.self_instruct_rounds else 0},
            "leakage_purged_from_train": len(leaks),
            "test_template_surplus": len(surplus),
            "template_in_test_dropped": len(template_in_test),
            "train": len(train),
            "test": len(test),
            "in_distribution": len(in_dist),
            "train_by_category": dict(Counter(r.category for r in train)),
            "test_by_category": dict(Counter(r.category for r in test)),
            "categories_without_test": [c for c in CATEGORIES if any(r.category == c for r in train)
                                        and not any(r.category == c for r in test)],
            "train_templates": _templates(train),
            "test_templates": _templates(test),
            "in_distribution_templates": _templates(in_dist),
            "shared_templates": len(shared_templates(train, test)),
            "few_shot_near_test": few_shot_near(held_out, cfg.dedup_threshold),
            "dropped_examples": [
                {"id": d.record.id, "instruction": d.record.instruction, "reason": d.reason,
                 "duplicate_of": d.duplicate_of, "similarity": round(d.similarity, 3)} for d in dedup.dropped[:200]
            ],
        }
        atomic_write_json(run.path(INSTRUCTIONS_REPORT), report)
        step.kept = len(train) + len(test) + len(in_dist)
        for reason, n in dedup.counts.items():
            step.drop(f"dedup_{reason}", n)
        for reason, n in test_dropped.items():
            step.drop(f"test_dedup_{reason}", n)
        for reason, n in si_dropped.items():
            step.drop(reason, n)
        for reason, n in si_dedup_dropped.items():
            step.drop(f"self_instruct_dedup_{reason}", n)
        step.drop("leaks_into_test", len(leaks))
        step.drop("test_template_surplus", len(surplus))
        step.drop("template_in_test", len(template_in_test))
        step.metrics.update({"train": len(train), "test": len(test), "in_distribution": len(in_dist),
                             "self_instruct_kept": len(generated), "split_by": cfg.split_by,
                             "test_templates": len(report["test_templates"]),
                             "sft_prompts": len(prompt_split.sft), "dpo_prompts": len(prompt_split.dpo),
                             "dpo_share": cfg.dpo_share})
    console.print(f"instructions: train {len(train)}, test {len(test)} ({cfg.split_by} split, "
                  f"{len(report['test_templates'])} test templates); dropped {dict(step.dropped)}")
    return True
