"""`pairs`: chosen = the SFT model's own cleaned response; rejected = five rule-built kinds + on-policy.

The base model generates first (its raw completions are the on-policy negatives) and is freed, then
the policy generates the chosen responses and scores every pair's margin. The policy is this run's
SFT model, or in a later bootstrapping round the previous round's writer model (``rounds``).
"""

from __future__ import annotations

from pathlib import Path

from ..config import PipelineConfig
from ..console import console
from ..data.pairs import build_pairs, realised_mix
from ..data.sampling import stratified_sample
from ..data.sft_quality import qc_reason
from ..files import atomic_write_json, write_jsonl
from ..formats import prompt_for
from ..generation.engine import Decoding, Generation
from ..run import Run
from ..schemas import InstructionRecord, PreferencePair, SFTRecord, load_jsonl
from ..training.logprobs import completion_logprobs
from .common import INSTRUCTIONS, NEGATIVES, PAIRS, SFT, SFT_DIR, TMP, writer_adapters, writer_label
from .generator import Generator

PAIRS_REPORT = "data/pairs_report.json"


def greedy_responses(gen: Generator, config: PipelineConfig, items: list[InstructionRecord],
                     label: str) -> list[Generation]:
    """Greedy zero-shot generations of the generator's model."""
    decoding = Decoding(max_new_tokens=config.pairs.max_new_tokens)
    return gen.generate([prompt_for(it.instruction) for it in items], decoding, label=label)


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
    params = config.section_hash("pairs", "sft_data") + (f":policy={writer}" if writer else "")
    inputs = [INSTRUCTIONS, SFT, *policy]
    if not force and run.is_current("pairs", params, inputs):
        console.print("pairs: up to date, skipped")
        return False
    with run.step("pairs", params, inputs, [PAIRS, NEGATIVES, PAIRS_REPORT]) as step:
        # The same training items the SFT data was drawn for.
        items = stratified_sample(load_jsonl(run.path(INSTRUCTIONS), InstructionRecord),
                                  config.sft_data.max_instructions, config.data_seed_value, "sft-data")
        sft_data = {r.id: r.response for r in load_jsonl(run.path(SFT), SFTRecord)}
        with Generator(config, accelerate_config=accelerate_config, work_dir=run.path(TMP)) as gen:
            base_gens = greedy_responses(gen, config, items, "pairs: base")
        base_raw = {it.id: g.raw_text for it, g in zip(items, base_gens)}
        with Generator(config, adapters=[a if writer else run.path(a) for a in policy], accelerate_config=accelerate_config,
                       work_dir=run.path(TMP)) as gen:
            sft_gens = greedy_responses(gen, config, items, "pairs: sft")
            chosen: dict[str, tuple[str, str]] = {}
            chosen_drops: dict[str, int] = {}
            for it, g in zip(items, sft_gens):
                reason = qc_reason(it, g.text, g.stop_string, g.finish_reason)
                if reason is None:
                    chosen[it.id] = (g.text, "sft_model")
                elif cfg.fallback_to_sft_data and it.id in sft_data:
                    chosen[it.id] = (sft_data[it.id], "sft_data")
                else:
                    key = f"chosen_{reason}"
                    chosen_drops[key] = chosen_drops.get(key, 0) + 1
            built = build_pairs(items, chosen, base_raw, cfg.negative_weights, cfg.on_policy_share, config.seed)
            pairs, negatives, dropped = built
            pairs = with_margins(config, gen.scoring_model(), pairs)
            policy_fingerprint = gen.fingerprint
        write_jsonl(run.path(PAIRS), pairs)
        write_jsonl(run.path(NEGATIVES), negatives)
        sft_wrote_end = sum(1 for g in sft_gens if g.stop_string == "\nEND")
        base_wrote_end = sum(1 for g in base_gens if g.stop_string == "\nEND")
        report = {
            "items": len(items), "pairs": len(pairs), "mix": realised_mix(pairs),
            "chosen_source": {s: sum(1 for p in pairs if p.chosen_source == s) for s in ("sft_model", "sft_data")},
            "dropped": {**chosen_drops, **dict(dropped)},
            "targets": built.plan.targets, "shortfall": built.plan.shortfall, "notes": dict(built.notes),
            "confident": sum(1 for p in pairs if p.confident),
            "mean_margin": round(sum(p.margin for p in pairs) / len(pairs), 4) if pairs else None,
            "sft_model_wrote_end": sft_wrote_end, "base_model_wrote_end": base_wrote_end,
        }
        atomic_write_json(run.path(PAIRS_REPORT), report)
        step.kept = len(pairs)
        step.provenance["generation"] = gen.runtime
        step.provenance["policy"] = {"adapters": policy, "fingerprint": policy_fingerprint}
        step.dropped.update(report["dropped"])
        step.metrics.update({k: report[k] for k in ("mix", "chosen_source", "confident", "mean_margin",
                                                    "sft_model_wrote_end", "base_model_wrote_end")})
    console.print(f"pairs: {len(pairs)} pairs, mix {report['mix']}; on the training items the SFT model wrote END "
                  f"{sft_wrote_end}/{len(items)} times, the base model {base_wrote_end}/{len(items)}")
    return True
