"""`sft-data`: the base model answers training instructions from few-shot prompts; QC keeps the good ones."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..config import PipelineConfig
from ..console import console
from ..data.critic import CRITIC_PROMPT_VERSION, best_of_n, calibration_margin, critic_margins
from ..data.prompt_split import load_split
from ..data.sampling import stratified_sample
from ..data.sft_quality import qc_reason
from ..files import atomic_write_json, sha256_path, write_jsonl
from ..formats import choose_shots, few_shot_prompt
from ..generation.engine import Decoding
from ..run import Run
from ..schemas import InstructionRecord, SFTRecord, load_jsonl
from .common import (INSTRUCTIONS, PROMPT_SPLIT, SFT, SFT_QC, TMP, few_shot_pool, generator_provenance,
                     writer_adapters, writer_label)
from .generator import Generator


def sft_prompts(config: PipelineConfig, items: list[InstructionRecord]) -> list[str]:
    """Few-shot prompts: k worked examples drawn by (seed, item id), never the item itself."""
    pool = few_shot_pool()
    return [few_shot_prompt(it.instruction, choose_shots(pool, config.sft_data.few_shot, config.data_seed_value,
                                                         it.id, exclude=it.instruction)) for it in items]


def writer_record(run: Run, adapters: list[str], fingerprint: str) -> dict:
    """Which model wrote a round's data: the round before's run, its model, weights and adapters."""
    r = run.config.rounds
    return {"round": r.round - 1, "run_dir": r.previous, "model": r.writer if adapters else "base",
            "fingerprint": fingerprint, "adapters": {a: sha256_path(a) for a in adapters}}


def step_params(config: PipelineConfig) -> str:
    """What decides the step's output: the data seed (not the training seed) and, after round 1, the
    model that writes."""
    writer = writer_label(config)
    return config.data_hash("sft_data") + (f":writer={writer}" if writer else "")


def run_sft_data(run: Run, force: bool = False, accelerate_config: Path | None = None) -> bool:
    """accelerate_config: generate under `accelerate launch` with this config (several processes/GPUs)."""
    config = run.config
    cfg = config.sft_data
    writer = writer_adapters(run.dir, config)  # round r+1: round r's model writes (its adapters are inputs)
    params = step_params(config)
    inputs = [INSTRUCTIONS, PROMPT_SPLIT, *writer]
    if not force and run.is_current("sft-data", params, inputs):
        console.print("sft-data: up to date, skipped")
        return False
    with run.step("sft-data", params, inputs, [SFT, SFT_QC]) as step:
        # SFT prompts only: the DPO prompts stay unseen by SFT (data/prompt_split.py)
        sft_items, _ = load_split(run.path(PROMPT_SPLIT), load_jsonl(run.path(INSTRUCTIONS), InstructionRecord))
        items = stratified_sample(sft_items, cfg.max_instructions, config.data_seed_value, "sft-data")
        prompts = sft_prompts(config, items)
        with Generator(config, adapters=writer, accelerate_config=accelerate_config,
                       work_dir=run.path(TMP)) as gen:
            decodings = [Decoding(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                  seed=config.data_seed_value + n) for n in range(cfg.best_of_n)]
            rounds = gen.generate_many([(prompts, d) for d in decodings], label="sft-data")
            # per item: (generation, decoding), one per round
            candidates = [[(gens[i], d) for gens, d in zip(rounds, decodings)] for i in range(len(items))]
            dropped: Counter = Counter()
            survivors: list[list[tuple]] = []
            for it, cands in zip(items, candidates):
                ok = []
                for g, d in cands:
                    reason = qc_reason(it, g.text, g.stop_string, g.finish_reason)
                    if reason:
                        dropped[reason] += 1
                    else:
                        ok.append((g, d))
                survivors.append(ok)
            margins: dict[tuple[int, int], float] = {}
            calibration = None
            if cfg.critic.enabled:
                # The critic's label bias (its margin on a content-free pair) is subtracted, so that
                # min_margin = 0 means "judged better than nothing", not "the model likes saying A".
                loaded = gen.scoring_model()
                calibration = calibration_margin(loaded.model, loaded.tokenizer)
                flat = [(i, j) for i, ok in enumerate(survivors) for j in range(len(ok))]
                values = critic_margins(loaded.model, loaded.tokenizer,
                                        [(items[i].instruction, survivors[i][j][0].text) for i, j in flat],
                                        batch_size=config.generation.batch_size, add_bos=config.model.add_bos_token)
                margins = {k: v - calibration for k, v in zip(flat, values)}
            provenance: dict = {}
            kept: list[SFTRecord] = []
            for i, (it, ok) in enumerate(zip(items, survivors)):
                if cfg.critic.enabled:
                    passing = [j for j in range(len(ok)) if margins[(i, j)] >= cfg.critic.min_margin]
                    dropped["critic_low"] += len(ok) - len(passing)
                    if not passing:
                        continue
                    best = passing[best_of_n([ok[j][0].text for j in passing], [margins[(i, j)] for j in passing])]
                    dropped["not_best_of_n"] += len(passing) - 1
                else:
                    if not ok:
                        continue
                    best = 0
                    dropped["not_best_of_n"] += len(ok) - 1
                g, d = ok[best]
                if d.seed not in provenance:
                    provenance[d.seed] = generator_provenance(gen.provenance, config, d, gen.fingerprint)
                kept.append(SFTRecord(
                    id=it.id, instruction=it.instruction, category=it.category, prompt=prompts[i], response=g.text,
                    generator=provenance[d.seed], finish_reason=g.finish_reason, stop_string=g.stop_string,
                    critic_margin=margins.get((i, best)), candidates=len(candidates[i]),
                ))
            stats = gen.stats.as_dict()
            fallback = gen.provenance["full_precision_fallback"]
            writer_info = writer_record(run, writer, gen.fingerprint)
        generated = sum(len(c) for c in candidates)
        dropped = Counter({k: v for k, v in dropped.items() if v})
        assert generated == len(kept) + sum(dropped.values()), "QC counts must add up"
        write_jsonl(run.path(SFT), kept)
        ended = sum(1 for c in candidates for g, _ in c if g.stop_string == "\nEND")
        qc = {"instructions": len(items), "generated": generated, "kept": len(kept), "dropped": dict(dropped),
              "wrote_end": ended, "critic": {"enabled": cfg.critic.enabled, "min_margin": cfg.critic.min_margin,
                                               "prompt_version": CRITIC_PROMPT_VERSION,
                                               "calibration_margin": calibration},
              "generation": stats, "full_precision_fallback": fallback, "writer": writer_info}
        atomic_write_json(run.path(SFT_QC), qc)
        step.kept = len(kept)
        step.dropped.update(dropped)
        step.metrics.update({"generated": generated, "wrote_end": ended, "tokens_per_s": stats["tokens_per_s"]})
        step.provenance["generation"] = gen.runtime
        step.provenance["writer"] = writer_info
    console.print(f"sft-data: generated {generated}, kept {len(kept)}, dropped {dict(dropped)}")
    return True
