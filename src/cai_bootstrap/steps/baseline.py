"""`baseline`: what the base model already does, in three prompt forms, before any training.

Forms: the raw instruction, the ``Instruction: …\\nResponse:`` wrapper, and the wrapper with the
few-shot prefix. Sentinels check that prompts reach the model as plain text (no chat template).
"""

from __future__ import annotations

import re

from ..config import PipelineConfig
from ..console import console
from ..data.pool import builtin_pool
from ..data.sampling import stratified_sample
from ..evaluation.criteria import CRITERIA, score, score_checks
from ..files import atomic_write_json
from ..formats import choose_shots, few_shot_prompt, prompt_for
from ..generation.engine import Decoding, encode_prompts
from ..run import Run
from ..schemas import EvalResponse, InstructionRecord
from .common import BASELINE, TMP, few_shot_pool
from .generator import Generator

PROBE_SEED = 0  # fixed: the probe set is the same for every run, so baselines compare across runs
FORMS = ("raw", "wrapper", "few_shot")

# Plain-text continuations a base model completes predictably. Under a leaked chat template the
# model answers as an assistant instead ("Sure! ..."), and the expected continuation is missing.
SENTINELS: tuple[tuple[str, str], ...] = (
    ("Monday, Tuesday, Wednesday,", r"^\s*Thursday"),
    ("1, 2, 3, 4, 5,", r"^\s*6"),
    ("A, B, C, D,", r"^\s*E"),
)


def probes(n: int) -> list[InstructionRecord]:
    return stratified_sample(builtin_pool(), n, PROBE_SEED, "baseline-probes")


def form_prompts(form: str, items: list[InstructionRecord], config: PipelineConfig) -> list[str]:
    if form == "raw":
        return [it.instruction + "\n" for it in items]
    if form == "wrapper":
        return [prompt_for(it.instruction) for it in items]
    pool = few_shot_pool()
    return [few_shot_prompt(it.instruction, choose_shots(pool, config.baseline.few_shot, PROBE_SEED, it.id,
                                                         exclude=it.instruction)) for it in items]


def template_sentinels(tokenizer, prompts: list[str], add_bos: bool) -> dict[str, bool]:
    """Token-level checks: no special token inside any prompt, and ids decode back to the exact string."""
    ids = encode_prompts(tokenizer, prompts, add_bos)
    special = set(tokenizer.all_special_ids)
    body = [seq[1:] if add_bos else seq for seq in ids]
    return {
        "no_special_tokens_in_prompts": not any(t in special for seq in body for t in seq),
        "prompts_round_trip_exactly": all(tokenizer.decode(seq) == p for seq, p in zip(body, prompts)),
        "bos_as_configured": all((seq[:1] == [tokenizer.bos_token_id]) == add_bos for seq in ids),
    }


def step_params(config) -> str:
    """What decides the step's output (a data step: the data seed, not the training seed)."""
    return config.data_hash("baseline")


def run_baseline(run: Run, force: bool = False) -> bool:
    config = run.config
    params = step_params(config)
    if not force and run.is_current("baseline", params, []):
        console.print("baseline: up to date, skipped")
        return False
    with run.step("baseline", params, [], [BASELINE]) as step:
        items = probes(config.baseline.n_probes)
        prompts = {f: form_prompts(f, items, config) for f in FORMS}
        decoding = Decoding(max_new_tokens=config.baseline.max_new_tokens)
        flat = [p for f in FORMS for p in prompts[f]]
        sentinel_prompts = [s for s, _ in SENTINELS]
        with Generator(config, work_dir=run.path(TMP)) as gen:
            outs = gen.generate(flat + sentinel_prompts, decoding, label="baseline")
            token_checks = template_sentinels(gen.tokenizer, flat + sentinel_prompts, config.model.add_bos_token)
        forms: dict[str, dict[str, float | None]] = {}
        examples: dict[str, list[dict]] = {}
        for k, form in enumerate(FORMS):
            gens = outs[k * len(items):(k + 1) * len(items)]
            rows = []
            for it, p, g in zip(items, prompts[form], gens):
                r = EvalResponse(id=it.id, model="base", prompt=p, raw_text=g.raw_text, response=g.text,
                                 stop_string=g.stop_string, finish_reason=g.finish_reason,
                                 prompt_tokens=g.prompt_tokens, completion_tokens=g.completion_tokens,
                                 max_new_tokens=decoding.max_new_tokens)
                s = score(it, r)
                s["ifeval_strict"], s["ifeval_loose"] = score_checks(it, r)
                rows.append(s)
            forms[form] = {c: _rate([row[c] for row in rows]) for c in (*CRITERIA, "ifeval_strict", "ifeval_loose")}
            examples[form] = [{"id": it.id, "prompt": p, "response": g.text, "finish_reason": g.finish_reason}
                              for it, p, g in list(zip(items, prompts[form], gens))[:3]]
        behaviour = {s: bool(re.search(pat, g.raw_text)) for (s, pat), g in zip(SENTINELS, outs[len(flat):])}
        result = {
            "n_probes": len(items),
            "probe_ids": [it.id for it in items],
            "forms": forms,
            "sentinels": {**token_checks, "plain_continuations": behaviour,
                          "chat_template_leak_suspected": not all(token_checks.values()) or not any(behaviour.values())},
            "prompts": prompts,
            "sentinel_outputs": {s: g.raw_text for (s, _), g in zip(SENTINELS, outs[len(flat):])},
            "examples": examples,
            "decoding": decoding.as_dict(),
        }
        atomic_write_json(run.path(BASELINE), result)
        step.kept = len(items)
        step.metrics.update({f"{f}.{c}": forms[f][c] for f in FORMS for c in ("ends_with_end", "no_rambling",
                                                                                "ifeval_strict")})
    print_baseline(result)
    return True


def _rate(values: list[bool | None]) -> float | None:
    applicable = [v for v in values if v is not None]
    return round(sum(applicable) / len(applicable), 4) if applicable else None


def print_baseline(result: dict) -> None:
    from rich.table import Table

    table = Table(title=f"capability baseline ({result['n_probes']} probes)")
    table.add_column("criterion")
    for f in FORMS:
        table.add_column(f, justify="right")
    for c in result["forms"][FORMS[0]]:
        table.add_row(c, *("-" if result["forms"][f][c] is None else f"{result['forms'][f][c]:.0%}" for f in FORMS))
    console.print(table)
    leak = result["sentinels"]["chat_template_leak_suspected"]
    console.print("sentinels: " + ("[red]chat-template leak suspected[/]" if leak else "[green]plain-text prompting confirmed[/]"))
