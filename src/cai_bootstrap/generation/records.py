"""Generation over records: ids in, schema-validated GenerationRecords out, in input order."""

from __future__ import annotations

from collections.abc import Sequence

from ..console import generation_progress
from ..schemas import GenerationRecord, PromptRecord
from .engine import Decoding, Engine


def generate_records(engine: Engine, prompts: Sequence[PromptRecord], decoding: Decoding,
                     label: str = "generate") -> list[GenerationRecord]:
    with generation_progress(len(prompts), label) as progress:
        outs = engine.generate([p.prompt for p in prompts], decoding, progress)
    return [
        GenerationRecord(id=p.id, prompt=p.prompt, text=g.text, raw_text=g.raw_text, stop_string=g.stop_string,
                         finish_reason=g.finish_reason, prompt_tokens=g.prompt_tokens,
                         completion_tokens=g.completion_tokens)
        for p, g in zip(prompts, outs, strict=True)
    ]
