"""The whole pipeline on the real embedded 135M model with tiny counts: artifacts, manifest, report."""

import json

import pytest
from typer.testing import CliRunner

from cai_bootstrap.cli import app
from cai_bootstrap.schemas import validate_kind

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def _all_threads():
    import os

    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(before)

TINY_COUNTS = [
    "baseline.n_probes=6", "baseline.max_new_tokens=16",
    "instructions.builtin=160", "instructions.test_size=10", "instructions.self_instruct_rounds=1",
    "instructions.self_instruct_max_new_tokens=48",
    "sft_data.max_instructions=24", "sft_data.max_new_tokens=32",
    "sft.epochs=2", "sft.batch_size=4", "sft.save_steps=1000",
    "pairs.max_new_tokens=24", "pairs.max_prompts=32",
    "dpo.max_steps=2", "dpo.batch_size=4",
    "evaluation.max_new_tokens=24",
]


def test_run_whole_pipeline_on_the_embedded_model(tmp_path):
    run_dir = tmp_path / "run"
    args = ["run", "configs/quick.yaml", "--run-dir", str(run_dir)]
    for s in TINY_COUNTS:
        args += ["--set", s]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)

    manifest = json.loads((run_dir / "manifest.json").read_text())
    steps = manifest["steps"]
    for name in ("baseline", "instructions", "sft-data", "sft", "pairs", "dpo", "dpo_only", "evaluate"):
        assert steps[name]["status"] == "done", name
        assert steps[name]["outputs"], name
    for kind, rel in [("instructions", "data/instructions.jsonl"), ("test", "data/test.jsonl"),
                      ("sft", "data/sft.jsonl"), ("pairs", "data/pairs.jsonl"), ("negatives", "data/negatives.jsonl"),
                      ("responses", "eval/responses/dpo.jsonl"), ("scores", "eval/scores.jsonl")]:
        n, problems = validate_kind(kind, run_dir / rel)
        assert problems == [] and n > 0, (kind, problems)

    # newlines in pairs are real newlines: no literal backslash-n survives JSON decoding
    pairs = [json.loads(line) for line in (run_dir / "data/pairs.jsonl").read_text().splitlines()]
    assert all("\\n" not in p[k] for p in pairs for k in ("prompt", "chosen", "rejected"))
    assert all(p["chosen"].endswith("\nEND") for p in pairs)

    qc = json.loads((run_dir / "data/sft_qc.json").read_text())
    assert qc["generated"] == qc["kept"] + sum(qc["dropped"].values())
    # the parity check ran: the second DPO run compared its arguments with the first's
    assert steps["dpo_only"]["provenance"]["parity_checked_against"] == "dpo"

    results = json.loads((run_dir / "eval/results.json").read_text())
    assert results["models"] == ["base", "base_fewshot", "sft", "dpo", "dpo_only"]
    assert results["n_items"] == 10
    assert results["test_set"]["split_by"] == "template" and results["test_set"]["shared_templates"] == 0
    # the three questions, each answered on format and on content, whatever the answers are
    answers = {(q["id"], aspect): a["answer"] for q in results["questions"] for aspect, a in q["aspects"].items()}
    assert set(answers) == {(q, a) for q in ("Q1", "Q2", "Q3") for a in ("format", "content")}
    assert set(answers.values()) <= {"better", "worse", "equivalent", "cannot tell"}
    assert len({(c["a"], c["b"]) for c in results["exploratory"]["comparisons"]}) == 10
    md = (run_dir / "report/report.md").read_text()
    html = (run_dir / "report/report.html").read_text()
    assert "data:image/png;base64," in html and "src=\"http" not in html
    for name in ("base_fewshot", "dpo_only", "ends_with_end", "McNemar", "What this run can and cannot conclude"):
        assert name in md, name
    for (q, aspect), answer in answers.items():
        assert f"{aspect} — {answer}" in md

    # everything is skipped the second time: inputs and config unchanged
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0
    assert again.output.count("skipped") >= 8
