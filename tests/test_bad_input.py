"""Bad input through the command line: every case ends in exit status 1 and one `error:` line that
names what is wrong, without a traceback, and leaves the run directory byte for byte as it was.

The cases are the ones a new user hit (issue 19): run directories and manifests that are not what
they should be, configs that are not text, not YAML or not sensible, files of the wrong kind, and
single-step commands on runs whose earlier steps are not done. No model is loaded: every case is
refused before one would be.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

from cai_bootstrap.cli import app
from cai_bootstrap.config import load_config
from cai_bootstrap.files import atomic_write_text, sha256_file, write_jsonl
from cai_bootstrap.run import Run
from cai_bootstrap.schemas import EvalResponse, InstructionRecord

runner = CliRunner()


def tree(root: Path) -> dict[str, str] | None:
    """sha256 of every file under root by relative path; None when root does not exist."""
    if not root.exists():
        return None
    if root.is_file():
        return {".": sha256_file(root)}
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def error_line(output: str) -> str:
    """The one `error:` line of a failed command (and no traceback)."""
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    return lines[0]


def items(n: int, prefix: str = "i") -> list[InstructionRecord]:
    topics = ["rivers", "volcanoes", "bridges", "owls", "glaciers", "lighthouses", "deserts", "comets"]
    return [InstructionRecord(id=f"{prefix}{k}", instruction=f"Write two sentences about {topics[k % len(topics)]} "
                              f"for reader number {k}.", category="open", source="user") for k in range(n)]


def finished_run(root: Path, steps: tuple[str, ...] = ("instructions", "dpo", "evaluate")) -> Path:
    """A run whose ``steps`` are done, their artifacts written by hand (every case here is refused
    before a model would load). Returns the config file."""
    cfg_file = root / "cfg.yaml"
    cfg_file.write_text("evaluation:\n  models: [base, dpo]\n")
    run = Run(root / "run", load_config(cfg_file), config_path=cfg_file)
    if "instructions" in steps:
        with run.step("instructions", "p", [], ["data/instructions.jsonl", "data/test.jsonl"]):
            write_jsonl(run.path("data/instructions.jsonl"), items(4))
            write_jsonl(run.path("data/test.jsonl"), items(2, "t"))
    if "dpo" in steps:
        with run.step("dpo", "p", [], ["models/dpo"]):
            atomic_write_text(run.path("models/dpo/adapter_config.json"), "{}")
            atomic_write_text(run.path("models/dpo/adapter_model.safetensors"), "x" * 4096)
    if "evaluate" in steps:
        outputs = ["eval/responses/base.jsonl", "eval/responses/dpo.jsonl", "eval/evaluation.json"]
        with run.step("evaluate", "p", ["data/test.jsonl", "models/dpo"], outputs):
            for m in ("base", "dpo"):
                write_jsonl(run.path(f"eval/responses/{m}.jsonl"), [EvalResponse(
                    id=it.id, model=m, prompt="Instruction: x\nResponse:", raw_text=" y\nEND", response="y",
                    stop_string="\nEND", finish_reason="stop", prompt_tokens=4, completion_tokens=3,
                    max_new_tokens=8) for it in items(2, "t")])
            atomic_write_text(run.path("eval/evaluation.json"), json.dumps({"order": ["base", "dpo"]}))
    return cfg_file


@dataclass
class Case:
    """``setup(tmp)`` prepares files and returns the arguments; ``watch`` is the folder that must not change."""

    id: str
    setup: Callable[[Path], list[str]]
    message: str  # in the error line
    watch: str = "run"


def _cfg(tmp: Path, text: str = "instructions: {builtin: 40, test_size: 4}\n") -> str:
    (tmp / "cfg.yaml").write_text(text)
    return str(tmp / "cfg.yaml")


def _manifest(text: str):
    def setup(tmp: Path) -> Path:
        (tmp / "run").mkdir()
        (tmp / "run" / "manifest.json").write_text(text)
        return tmp / "run"
    return setup


TRUNCATED = _manifest('{"steps": {"instructions": {"status": "do')
EMPTY = _manifest("")


def _file(tmp: Path, name: str, data: bytes | str) -> str:
    path = tmp / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


def _prompts(tmp: Path) -> str:
    return _file(tmp, "prompts.jsonl", json.dumps({"id": "a", "prompt": "Instruction: hi\nResponse:"}) + "\n")


def _leaking_user_files(tmp: Path) -> list[str]:
    write_jsonl(tmp / "train.jsonl", [InstructionRecord(
        id="u1", instruction="Describe the smell of fresh rain on a summer street.", category="open", source="user")])
    write_jsonl(tmp / "test.jsonl", [InstructionRecord(
        id="t1", instruction="Describe the smell of fresh rain on summer streets.", category="open", source="user")])
    return ["instructions", _cfg(tmp, f"instructions: {{builtin: 0, train_file: {tmp}/train.jsonl, "
                                      f"test_file: {tmp}/test.jsonl}}\n"), "--run-dir", str(tmp / "run")]


def _megabyte_instruction(tmp: Path) -> str:
    return _file(tmp, "train.jsonl", json.dumps({"id": "big", "instruction": "x" * 2**20, "category": "open",
                                                 "source": "user"}) + "\n")


def _report_before_evaluate(tmp: Path) -> list[str]:
    finished_run(tmp, steps=("instructions", "dpo"))
    return ["report", str(tmp / "run")]


def _report_without_a_responses_file(tmp: Path) -> list[str]:
    finished_run(tmp)
    (tmp / "run/eval/responses/dpo.jsonl").unlink()
    return ["report", str(tmp / "run")]


def _evaluate_after_truncated_adapter(tmp: Path) -> list[str]:
    cfg = finished_run(tmp)
    adapter = tmp / "run/models/dpo/adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    return ["evaluate", str(cfg), "--run-dir", str(tmp / "run")]


CASES = [
    # manifests that are not one
    Case("status-truncated-manifest", lambda t: ["status", str(TRUNCATED(t))], "manifest.json:1: corrupt manifest"),
    Case("status-empty-manifest", lambda t: ["status", str(EMPTY(t))], "manifest.json: the manifest is empty"),
    Case("run-truncated-manifest", lambda t: ["run", _cfg(t), "--run-dir", str(TRUNCATED(t))], "corrupt manifest"),
    Case("run-empty-manifest", lambda t: ["run", _cfg(t), "--run-dir", str(EMPTY(t))], "the manifest is empty"),
    Case("report-truncated-manifest", lambda t: ["report", str(TRUNCATED(t))], "corrupt manifest"),
    Case("report-empty-manifest", lambda t: ["report", str(EMPTY(t))], "the manifest is empty"),
    # run directories that cannot be one
    Case("run-dir-is-a-file", lambda t: ["instructions", _cfg(t), "--run-dir", _file(t, "run", "x")],
         "is a file, not a directory"),
    Case("run-dir-under-a-file", lambda t: ["instructions", _cfg(t), "--run-dir", _file(t, "run", "x") + "/sub"],
         "is a file, so no directory can be made under it"),
    # configs that are not text, not YAML, or not sensible
    Case("config-not-utf8", lambda t: ["instructions", _file(t, "c.yaml", b"seed: 1\n# caf\xe9\n"), "--run-dir",
                                       str(t / "run")], "c.yaml:2: not UTF-8 text"),
    Case("config-is-a-directory", lambda t: ["instructions", str(t), "--run-dir", str(t / "run")],
         "is a directory, not a config file"),
    Case("set-not-yaml", lambda t: ["instructions", _cfg(t), "--run-dir", str(t / "run"), "--set", "seed=[1"],
         "--set 'seed=[1': the value is not valid YAML"),
    Case("test-size-1e30", lambda t: ["instructions", _cfg(t), "--run-dir", str(t / "run"),
                                      "--set", "instructions.test_size=1e30"],
         "--set instructions.test_size=1e30: instructions.test_size: Input should be less than or equal to 1000000"),
    Case("seed-10**25", lambda t: ["instructions", _cfg(t, "seed: 10000000000000000000000000\n"),
                                   "--run-dir", str(t / "run")], "cfg.yaml:1: seed: Input should be less than"),
    Case("unknown-evaluation-model", lambda t: ["evaluate", str(finished_run(t)), "--run-dir", str(t / "run"),
                                                "--set", "evaluation.models=[base, nosuch]"],
         "evaluation.models: unknown model(s) ['nosuch']"),
    Case("evaluate-model-nosuch", lambda t: ["evaluate", _cfg(t), "--run-dir", str(t / "run"), "--model", "nosuch"],
         "--model nosuch: not among the models this config evaluates (base, base_fewshot, sft, dpo, dpo_only)"),
    Case("until-nosuch", lambda t: ["run", _cfg(t), "--run-dir", str(t / "run"), "--until", "nosuch"],
         "--until nosuch: not a step"),
    Case("train-file-is-a-directory", lambda t: ["instructions", _cfg(t, f"instructions: {{train_file: {t}}}\n"),
                                                 "--run-dir", str(t / "run")], f"{{t}}: is a directory"),
    Case("user-train-item-leaks-into-user-test", _leaking_user_files, "1 test item(s) leak from the training set"),
    # silently accepted before, changing results
    Case("duplicate-yaml-key", lambda t: ["instructions", _cfg(t, "sft:\n  learning_rate: 0.001\nseed: 1\nsft:\n"
                                                                  "  epochs: 3\n"), "--run-dir", str(t / "run")],
         "cfg.yaml:4: sft: duplicate key (first at line 1)"),
    Case("duplicate-key-in-set", lambda t: ["instructions", _cfg(t), "--run-dir", str(t / "run"),
                                            "--set", "pairs.negative_weights={refusal: 1, refusal: 2}"],
         "duplicate key"),
    Case("empty-config", lambda t: ["instructions", _cfg(t, "# nothing yet\n"), "--run-dir", str(t / "run")],
         "cfg.yaml: the config is empty"),
    Case("empty-test-file", lambda t: ["instructions", _cfg(t, f"instructions: {{builtin: 40, test_file: "
                                                              f"{_file(t, 'test.jsonl', '')}}}\n"),
                                       "--run-dir", str(t / "run")], "no records (instructions.test_file is empty)"),
    Case("generate-empty-stop", lambda t: ["generate", "--model", "smollm2-135m", "--prompts", _prompts(t),
                                           "--out", str(t / "o.jsonl"), "--stop", ""],
         "--stop '': an empty stop string would end every completion", watch="."),
    Case("builtin-1e20", lambda t: ["instructions", _cfg(t, f"instructions: {{builtin: {10**20}}}\n"), "--run-dir",
                                    str(t / "run")],
         f"cfg.yaml:1: instructions.builtin: Input should be less than or equal to 1000000 (got {10**20})"),
    Case("one-megabyte-instruction", lambda t: ["instructions", _cfg(t, f"instructions: {{builtin: 40, train_file: "
                                                                       f"{_megabyte_instruction(t)}}}\n"),
                                                "--run-dir", str(t / "run")],
         "train.jsonl:1: instruction: Value error, 1,048,576 characters; at most 20,000"),
    # files of the wrong kind
    Case("validate-a-directory", lambda t: ["validate", "prompts", str(t)], "is a directory, not a JSONL file",
         watch="."),
    Case("generate-empty-prompts", lambda t: ["generate", "--model", "smollm2-135m", "--prompts",
                                              _file(t, "p.jsonl", ""), "--out", str(t / "o.jsonl")],
         "p.jsonl: no prompt records", watch="."),
    Case("generate-stop-bad-escape", lambda t: ["generate", "--model", "smollm2-135m", "--prompts", _prompts(t),
                                                "--out", str(t / "o.jsonl"), "--stop", "\\x"],
         "--stop '\\x': unknown escape \\x", watch="."),
    Case("generate-dtype-float64", lambda t: ["generate", "--model", "smollm2-135m", "--prompts", _prompts(t),
                                              "--out", str(t / "o.jsonl"), "--dtype", "float64"],
         "--dtype must be float32, bfloat16, float16, auto, not 'float64'", watch="."),
    Case("generate-out-is-a-directory", lambda t: ["generate", "--model", "smollm2-135m", "--prompts", _prompts(t),
                                                   "--out", str(t)], "is a directory; give a file name", watch="."),
    Case("inspect-masks-missing-file", lambda t: ["inspect-masks", str(t / "nope.jsonl")],
         "nope.jsonl: No such file or directory", watch="."),
    # single-step commands on runs that are not ready
    Case("sft-data-before-instructions", lambda t: ["sft-data", _cfg(t), "--run-dir", str(t / "run")],
         f"sft-data needs {{t}}/run/data/instructions.jsonl, which step instructions writes and has not written "
         f"here: run `cai-bootstrap instructions {{t}}/cfg.yaml --run-dir {{t}}/run` first"),
    Case("report-on-an-incomplete-run", _report_before_evaluate, "no responses to report on"),
    Case("report-missing-responses-file", _report_without_a_responses_file,
         "eval/responses/dpo.jsonl, which step evaluate wrote but is gone"),
    Case("evaluate-after-truncated-adapter", _evaluate_after_truncated_adapter, "models/dpo (sha256"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, tmp_path):
    args = case.setup(tmp_path)
    watched = tmp_path / case.watch
    before = tree(watched)
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    line = error_line(result.output)
    assert case.message.replace("{t}", str(tmp_path)) in line, line
    assert tree(watched) == before


def test_the_truncated_adapter_message_says_how_to_go_on(tmp_path):
    args = _evaluate_after_truncated_adapter(tmp_path)
    line = error_line(runner.invoke(app, args).output)
    assert "changed after step dpo wrote it" in line and "--keep-edits" in line
    assert f"cai-bootstrap dpo {tmp_path / 'cfg.yaml'} --run-dir {tmp_path / 'run'} --init sft --force" in line


def test_a_failed_config_rewrites_neither_config_nor_manifest(tmp_path):
    """validate first, write after: a refused evaluate leaves config.yaml and the manifest's config alone."""
    cfg = finished_run(tmp_path)
    before = tree(tmp_path / "run")
    cfg.write_text("evaluation:\n  models: [base, dpo]\n  max_new_tokens: 0\n")
    line = error_line(runner.invoke(app, ["evaluate", str(cfg), "--run-dir", str(tmp_path / "run")]).output)
    assert f"{cfg}:3: evaluation.max_new_tokens: Input should be greater than or equal to 1" in line
    assert tree(tmp_path / "run") == before


def test_read_only_run_dir(tmp_path):
    """Root writes anywhere, so as root the command runs without CAP_DAC_OVERRIDE (setpriv)."""
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a directory read-only")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
                  "-dac_override,-dac_read_search"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("x")
    cfg = _cfg(tmp_path)
    before = tree(run_dir)
    run_dir.chmod(0o555)
    try:
        proc = subprocess.run([*prefix, sys.executable, "-m", "cai_bootstrap.cli", "instructions", cfg, "--run-dir",
                               str(run_dir)], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    finally:
        run_dir.chmod(0o755)
    assert proc.returncode == 1, proc.stderr
    assert f"--run-dir {run_dir} is not writable" in error_line(proc.stderr)
    assert tree(run_dir) == before


def test_stop_strings_are_taken_as_given(tmp_path, tiny_model_folder):
    """`--stop é` used to become 'Ã©' (unicode_escape on UTF-8 bytes) and never match."""
    out = tmp_path / "o.jsonl"
    result = runner.invoke(app, ["generate", "--model", str(tiny_model_folder), "--prompts", _prompts(tmp_path),
                                 "--out", str(out), "--max-new-tokens", "2", "--stop", "é", "--stop", "\\nEND",
                                 "--stop", "a\\\\n"])
    assert result.exit_code == 0, result.output
    provenance = json.loads(Path(f"{out}.provenance.json").read_text())
    assert provenance["decoding"]["stop_strings"] == ["é", "\nEND", "a\\n"]


def test_more_builtin_instructions_than_the_pool_is_said(tmp_path, monkeypatch):
    from cai_bootstrap.steps import instructions as step

    monkeypatch.setattr(step, "builtin_pool", lambda: items(30))
    cfg = _cfg(tmp_path, "instructions: {builtin: 500, test_size: 3}\n")
    result = runner.invoke(app, ["instructions", cfg, "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "instructions.builtin is 500, the built-in pool has 30: using all 30" in result.output


def test_ctrl_c_says_how_to_resume(tmp_path, monkeypatch):
    """Ctrl-C is one line that says the finished steps are kept and how to resume, exit status 130
    (the shell's for SIGINT), not click's bare "Aborted!"."""
    from cai_bootstrap import run as run_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module.Run, "open_existing", interrupted)
    result = runner.invoke(app, ["status", str(tmp_path)])
    assert result.exit_code == 130, result.output
    line = error_line(result.output)
    assert "interrupted" in line and "run the same command again to resume" in line
