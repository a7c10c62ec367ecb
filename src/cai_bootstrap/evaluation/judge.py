"""Optional model judge: the A/B critic applied to saved responses, reported apart from the criteria.

``judge: self`` uses the base model, ``judge: hf:<spec>`` any other model spec. Scores are written
to ``eval/judge.jsonl`` so that the report can be rebuilt without loading a model.
"""

from __future__ import annotations

from pydantic import Field

from ..config import PipelineConfig
from ..data.critic import calibration_margin, critic_margins
from ..formats import END_SUFFIX
from ..models.loading import free, load_model
from ..schemas import EvalResponse, InstructionRecord, Record, Text


class JudgeScore(Record):
    model: Text
    judge: dict[str, float] = Field(default_factory=dict)


def judge_spec(config: PipelineConfig) -> str | None:
    j = config.evaluation.judge
    if j == "none":
        return None
    return config.model.base if j == "self" else j.removeprefix("hf:")


def judge_responses(config: PipelineConfig, items: list[InstructionRecord],
                    responses: dict[str, list[EvalResponse]]) -> list[JudgeScore]:
    """One judge load for every model's responses: calibrated A/B margin and a good/bad call."""
    spec = judge_spec(config)
    if spec is None:
        return []
    by_id = {it.id: it for it in items}
    flat = [r for rs in responses.values() for r in rs]
    loaded = load_model(spec, dtype=config.model.dtype)
    try:
        bias = calibration_margin(loaded.model, loaded.tokenizer)
        # The judge sees the response as the model wrote it up to END; an empty one is judged as such.
        margins = critic_margins(loaded.model, loaded.tokenizer,
                                 [(by_id[r.id].instruction, r.response or END_SUFFIX.strip()) for r in flat],
                                 batch_size=config.evaluation.batch_size, add_bos=config.model.add_bos_token)
    finally:
        free(loaded)
    return [JudgeScore(id=r.id, model=r.model, judge={"margin": round(m - bias, 4), "judged_good": float(m - bias > 0)})
            for r, m in zip(flat, margins)]

