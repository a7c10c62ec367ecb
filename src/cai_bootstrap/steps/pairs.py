"""`pairs`: on each DPO prompt the SFT model samples several responses; chosen = the best by what can
be verified, rejected = a worse one of the same policy (data/ranking.py), or rule-built for a small
configurable share (data/pairs.py). The prompts are the DPO side of data/prompt_split.json, which
SFT never saw.

The policy samples, (optionally) the base model's critic scores the samples the checks cannot tell
apart, and the policy scores every pair's margin. The policy is this run's SFT model, or in a later
bootstrapping round the previous round's writer model (``rounds``). The diagnostics of the pairs
(data/pair_diagnostics.py) go into data/pairs_report.json and the manifest.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ..config import PipelineConfig
from ..console import console
from ..data.critic import critic_margins
from ..data.pair_diagnostics import diagnose
from ..data.pairs import build_pairs, realised_mix
from ..data.prompt_split import load_split
from ..data.ranking import Sample, choose_pair, critic_candidates
from ..data.sampling import stratified_sample
from ..files import atomic_write_json, write_jsonl
from ..formats import prompt_for
from ..generation.engine import Decoding
from ..models.loading import free, load_model
from ..run import Run
from ..schemas import InstructionRecord, PreferencePair, load_jsonl
from ..training.logprobs import completion_logprobs
from .common import INSTRUCTIONS, NEGATIVES, PAIRS, PAIRS_REPORT, PROMPT_SPLIT, SFT_DIR, TMP, writer_adapters, writer_label
from .generator import Generator


def sample_responses(gen: Generator, config: PipelineConfig,
                     items: list[InstructionRecord]) -> dict[str, list[Sample]]:
    """``pairs.samples_per_prompt`` sampled zero-shot responses per item; sample n uses seed + n."""
    cfg = config.pairs
    prompts = [prompt_for(it.instruction) for it in items]
    decodings = [Decoding(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                          seed=config.seed + n) for n in range(cfg.samples_per_prompt)]
    rounds = gen.generate_many([(prompts, d) for d in decodings], label="pairs: SFT samples")
    return {it.id: [Sample(g.text, g.raw_text, g.stop_string, g.finish_reason) for g in (r[i] for r in rounds)]
            for i, it in enumerate(items)}


def critic_scores(config: PipelineConfig, items: list[InstructionRecord],
                  samples: dict[str, list[Sample]]) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """The base model's critic margins for the prompts whose samples only it can rank, and how often it
    agrees with the checks on the pairs they decided (a measure of whether it can judge at all)."""
    m = config.model
    tie = [it for it in items if critic_candidates(it, samples[it.id])]
    verified = [(it, c) for it in items
                if (c := choose_pair(it, samples[it.id])).paired and samples[it.id][c.rejected].ended]
    texts = [(it.instruction, s.text) for it in tie for s in samples[it.id]]
    texts += [(it.instruction, samples[it.id][k].text) for it, c in verified for k in (c.chosen, c.rejected)]
    loaded = load_model(m.base, quantization=m.generation_quantization, dtype=m.dtype,
                        allow_full_precision_fallback=m.allow_full_precision_fallback)
    try:
        values = critic_margins(loaded.model, loaded.tokenizer, texts, batch_size=config.generation.batch_size,
                                add_bos=m.add_bos_token) if texts else []
    finally:
        free(loaded)
    out: dict[str, list[float]] = {}
    pos = 0
    for it in tie:
        out[it.id] = values[pos:pos + len(samples[it.id])]
        pos += len(samples[it.id])
    agrees = sum(values[pos + 2 * k] > values[pos + 2 * k + 1] for k in range(len(verified)))
    return out, {"prompts_scored": len(tie), "verified_pairs_checked": len(verified), "agrees_with_checks": agrees}


def with_margins(config: PipelineConfig, loaded, pairs: list[PreferencePair]) -> list[PreferencePair]:
    """Length-normalised log-probability margin of chosen over rejected under the SFT model."""
    if not pairs:
        return pairs
    kwargs = dict(batch_size=config.generation.batch_size, add_bos=config.model.add_bos_token)
    chosen = completion_logprobs(loaded.model, loaded.tokenizer, [p.prompt for p in pairs], [p.chosen for p in pairs],
                                 **kwargs)
    rejected = completion_logprobs(loaded.model, loaded.tokenizer, [p.prompt for p in pairs],
                                   [p.rejected for p in pairs], **kwargs)
    out = []
    for p, (lc, nc), (lr, nr) in zip(pairs, chosen, rejected):
        margin = lc / max(nc, 1) - lr / max(nr, 1)
        out.append(p.model_copy(update={"margin": round(margin, 6),
                                        "confident": margin > config.pairs.confident_margin}))
    return out


def run_pairs(run: Run, force: bool = False, accelerate_config: Path | None = None) -> bool:
    """accelerate_config: generate under `accelerate launch` with this config (several processes/GPUs)."""
    config = run.config
    cfg = config.pairs
    # the policy: this run's SFT model, or in round r+1 round r's writer model
    writer = writer_label(config)
    policy = writer_adapters(run.dir, config) or [SFT_DIR]
    params = config.section_hash("pairs") + (f":policy={writer}" if writer else "")
    inputs = [INSTRUCTIONS, PROMPT_SPLIT, *policy]
    if not force and run.is_current("pairs", params, inputs):
        console.print("pairs: up to date, skipped")
        return False
    with run.step("pairs", params, inputs, [PAIRS, NEGATIVES, PAIRS_REPORT]) as step:
        _, dpo_items = load_split(run.path(PROMPT_SPLIT), load_jsonl(run.path(INSTRUCTIONS), InstructionRecord))
        items = stratified_sample(dpo_items, cfg.max_prompts, config.data_seed_value, "pairs")
        with Generator(config, adapters=[a if writer else run.path(a) for a in policy],
                       accelerate_config=accelerate_config, work_dir=run.path(TMP)) as gen:
            samples = sample_responses(gen, config, items)
            critic, critic_report = critic_scores(config, items, samples) if cfg.critic.enabled else (None, None)
            built = build_pairs(items, samples, weights=cfg.negative_weights, synthetic_share=cfg.synthetic_share,
                                seed=config.seed, critic=critic, min_gap=cfg.critic.min_gap)
            pairs = with_margins(config, gen.scoring_model(), built.pairs)
            stats = gen.stats.as_dict()
            policy_fingerprint = gen.fingerprint
        write_jsonl(run.path(PAIRS), pairs)
        write_jsonl(run.path(NEGATIVES), built.negatives)
        every = [s for it in items for s in samples[it.id]]
        problems = Counter(p or "acceptable" for c in built.choices.values() for p in c.problems)
        diagnostics = diagnose(pairs, cfg.confident_margin)
        report = {
            "dpo_prompt_pool": len(dpo_items), "prompts": len(items), "samples_per_prompt": cfg.samples_per_prompt,
            "pairs": len(pairs), "mix": realised_mix(pairs),
            "no_pair": dict(sorted(built.no_pair.items())), "basis": dict(sorted(built.basis.items())),
            "samples": {"total": len(every), "wrote_end": sum(s.ended for s in every),
                        "by_problem": dict(sorted(problems.items()))},
            "synthetic": {"share": cfg.synthetic_share, "prompts": sum(built.plan.counts.values()),
                          "targets": built.plan.targets, "shortfall": built.plan.shortfall},
            "critic": {"enabled": cfg.critic.enabled, "min_gap": cfg.critic.min_gap, **(critic_report or {})},
            "diagnostics": diagnostics,
            "generation": stats,
        }
        atomic_write_json(run.path(PAIRS_REPORT), report)
        step.kept = len(pairs)
        step.provenance["generation"] = gen.runtime
        step.provenance["policy"] = {"adapters": policy, "fingerprint": policy_fingerprint}
        step.dropped.update({f"no_pair:{k}": v for k, v in built.no_pair.items()})
        step.metrics.update({
            "mix": report["mix"], "basis": report["basis"],
            "surface_separable": diagnostics["surface_separable"]["share"],
            "rejected_longer": diagnostics["length"]["rejected_longer"],
            "already_ranked": diagnostics["margin"]["already_ranked"],
            "confident": diagnostics["margin"]["confident"],
            "samples_wrote_end": report["samples"]["wrote_end"],
        })
    d = diagnostics
    console.print(f"pairs: {len(pairs)} pairs from {len(items)} prompts (no pair: {report['no_pair']}); "
                  f"surface-separable {d['surface_separable']['share']}, rejected longer "
                  f"{d['length']['rejected_longer']}, already ranked by the SFT model {d['margin']['already_ranked']}")
    return True
