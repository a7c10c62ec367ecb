"""The command line: one command per pipeline step, plus `run`, `validate`, `status`, `models`.

Every error ends as one line (``error: …``) and exit status 1; ``--debug`` or ``CAI_BOOTSTRAP_DEBUG=1``
shows the traceback instead (docs/errors.md).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from collections.abc import Callable
from typing import Annotated, Optional, get_args

import click
import typer
from rich.table import Table
from typer.core import TyperGroup

from .config import DType, PipelineConfig
from .console import console
from .errors import UserError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
DEBUG_ENV = "CAI_BOOTSTRAP_DEBUG"


def describe_error(e: Exception) -> str:
    """One line for the user: our own errors say what and where; a system error names its file."""
    from .run import StepFailed

    if isinstance(e, (UserError, StepFailed)):
        return str(e)
    if isinstance(e, OSError) and e.filename is not None:
        target = f" -> {e.filename2}" if e.filename2 is not None else ""
        return f"{e.filename}{target}: {e.strerror or e}"
    return f"{type(e).__name__}: {e} (unexpected: `cai-bootstrap --debug …` or {DEBUG_ENV}=1 shows the traceback)"


class GuardedGroup(TyperGroup):
    """Turns any exception of a command into one message and exit status 1, unless debugging."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            # the step in progress stays recorded as running (`status` shows it interrupted); its
            # outputs are written atomically, so the same command resumes from the finished steps
            fail("interrupted: finished steps are kept, the step in progress was not recorded as done; "
                 "run the same command again to resume (`cai-bootstrap status RUN_DIR` shows where it stopped)",
                 code=130)
        except Exception as e:
            if ctx.params.get("debug") or os.environ.get(DEBUG_ENV, "0") not in ("", "0"):
                raise
            fail(describe_error(e))


app = typer.Typer(
    help="Bootstrap instruction following from a base model's own outputs, and prove whether it helped.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=GuardedGroup,
)
models_app = typer.Typer(help="Embedded and local models: list, prepare.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@app.callback()
def _quiet_libraries(
    debug: Annotated[bool, typer.Option("--debug", help=f"Show the traceback of an error (also: {DEBUG_ENV}=1).")] = False,
) -> None:
    """Library progress bars and advisory warnings would drown our own progress display."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    # On AVX-512 BF16 CPUs bitsandbytes looks for a 4-bit kernel on the hub (package `kernels`) and
    # warns when it cannot; there is no hub here, and its own torch fallback is what runs anyway.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def fail(message: str, code: int = 1) -> None:
    from rich.markup import escape

    # escaped: messages hold literal brackets, e.g. pip install '.[vllm]'
    console.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


# ---------------------------------------------------------------- models

@models_app.command("list")
def models_list() -> None:
    """Show the embedded models and whether each is converted in the cache."""
    from .models.embedded import EMBEDDED, cached_folder, is_prepared

    table = Table(title="embedded models")
    for col in ("name", "package", "cached", "folder", "description"):
        table.add_column(col)
    for m in EMBEDDED.values():
        table.add_row(m.name, m.package, "yes" if is_prepared(m.name) else "no", str(cached_folder(m.name)),
                      m.description)
    console.print(table)


@models_app.command("prepare")
def models_prepare(
    name: Annotated[str, typer.Argument(help="Embedded model name, e.g. smollm2-135m.")],
    force: Annotated[bool, typer.Option(help="Convert again even if cached.")] = False,
) -> None:
    """Convert an embedded GGUF once into a cached safetensors folder ($CAI_BOOTSTRAP_CACHE)."""
    from .models.embedded import prepare

    folder, converted = prepare(name, force=force)  # ModelNotAvailable: one line, from the guard
    console.print(("converted" if converted else "already prepared") + f": {folder}")
    print(folder)


# ---------------------------------------------------------------- generate

STOP_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def parse_stop(text: str) -> str:
    """A --stop value as given, except the documented escapes; anything else after a backslash is an
    error rather than a guess (``unicode_escape`` garbled non-ASCII text: é became Ã©)."""
    import re

    if not text:
        fail("--stop '': an empty stop string would end every completion after its first token")
    for m in re.finditer(r"\\(.?)", text, flags=re.S):
        if m.group(1) not in STOP_ESCAPES:
            fail(f"--stop '{text}': unknown escape {m.group(0)} at character {m.start() + 1}; "
                 f"the escapes are \\n (newline), \\t (tab) and \\\\ (a backslash)")
    return re.sub(r"\\(.)", lambda m: STOP_ESCAPES[m.group(1)], text, flags=re.S)


@app.command()
def generate(
    model: Annotated[str, typer.Option(help="Model spec: embedded name, local folder or hub id.")],
    prompts: Annotated[Path, typer.Option(help="JSONL of {id, prompt} records.")],
    out: Annotated[Path, typer.Option(help="Where to write the generation records (JSONL).")],
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per batch.")] = 16,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Token limit per completion.")] = 96,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop string, taken as given (repeatable; default: END and runaway markers). Escapes: \\n newline, \\t tab, \\\\ backslash.")] = None,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    quantization: Annotated[str, typer.Option(help="none | 8bit | 4bit (bitsandbytes).")] = "none",
    allow_full_precision_fallback: Annotated[bool, typer.Option(help="Load full precision if quantized loading is impossible (recorded).")] = False,
    add_bos: Annotated[bool, typer.Option(help="Prepend the BOS token to each prompt.")] = False,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16 | auto.")] = "float32",
    cpu_backend: Annotated[str, typer.Option(help="auto: our decode loop on a CPU, transformers' generate elsewhere; off: generate everywhere.")] = "auto",
) -> None:
    """Batched generation: one record per prompt, in input order, with finish reasons and token counts."""
    from .files import atomic_write_json, write_jsonl
    from .formats import STOP_STRINGS
    from .generation.engine import Decoding, Engine
    from .generation.records import generate_records
    from .models.loading import load_model
    from .schemas import PromptRecord, load_jsonl

    if quantization not in ("none", "8bit", "4bit"):
        fail(f"--quantization must be none, 8bit or 4bit, not {quantization!r}")
    if cpu_backend not in ("auto", "off"):
        fail(f"--cpu-backend must be auto or off, not {cpu_backend!r}")
    if dtype not in get_args(DType):
        fail(f"--dtype must be {', '.join(get_args(DType))}, not {dtype!r}")
    if out.is_dir():
        fail(f"--out {out} is a directory; give a file name, e.g. {out / 'generations.jsonl'}")
    stops = tuple(parse_stop(s) for s in stop) if stop else STOP_STRINGS
    records = load_jsonl(prompts, PromptRecord)
    if not records:
        fail(f"{prompts}: no prompt records (the file is empty)")
    loaded = load_model(model, quantization=quantization, dtype=dtype,
                        allow_full_precision_fallback=allow_full_precision_fallback)
    decoding = Decoding(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                        stop_strings=stops)
    engine = Engine(loaded.model, loaded.tokenizer, batch_size=batch_size, add_bos=add_bos, cpu_backend=cpu_backend)
    results = generate_records(engine, records, decoding)
    write_jsonl(out, results)
    provenance = {**loaded.provenance, "add_bos_token": add_bos, "decoding": decoding.as_dict(),
                  "cpu_backend": engine.backend.as_dict(),
                  "batch_size": batch_size, "stats": engine.stats.as_dict()}
    atomic_write_json(Path(f"{out}.provenance.json"), provenance)
    console.print(f"wrote {len(results)} records to {out} ({engine.stats.tokens_per_s:.1f} tok/s)"
                  + (" [yellow](full-precision fallback)[/]" if provenance["full_precision_fallback"] else ""))


# ---------------------------------------------------------------- validate / status

@app.command()
def validate(
    kind: Annotated[str, typer.Argument(help="Artifact kind: instructions, test, prompts, generations, sft, negatives, pairs, responses, scores.")],
    file: Annotated[Path, typer.Argument(help="The JSONL file to check.")],
) -> None:
    """Check an artifact against its schema; print file:line: field: problem for each problem."""
    from .schemas import KINDS, validate_kind

    if kind not in KINDS:
        fail(f"unknown kind {kind!r}; known: {', '.join(KINDS)}", code=2)
    if not file.is_file():
        fail(f"{file}: {'is a directory, not a JSONL file' if file.is_dir() else 'file not found'}")
    n, problems = validate_kind(kind, file)
    for p in problems:
        print(p)
    if problems:
        console.print(f"[red]{file}: {len(problems)} problem(s), {n} valid record(s)[/]")
        raise typer.Exit(1)
    console.print(f"[green]{file}: {n} valid {kind} record(s)[/]")


def experiment_status(out: Path) -> None:
    """The runs of an experiment folder; a run recorded running whose command is gone was interrupted."""
    from .experiment.runner import EXPERIMENT_JSON
    from .locking import describe, lock_holder

    state = json.loads((out / EXPERIMENT_JSON).read_text(encoding="utf-8"))
    holder = lock_holder(out)
    table = Table(title=f"{out}: {state['seeds']} seed(s) x {state['rounds']} round(s)")
    for col in ("run", "status", "data seed", "adopted", "duration", "ended"):
        table.add_column(col)
    colors = {"done": "green", "failed": "red", "running": "yellow", "interrupted": "red"}
    for name, r in state["runs"].items():
        status = "interrupted" if r["status"] == "running" and holder is None else r["status"]
        adopted = r.get("adopted") or {}
        table.add_row(name, f"[{colors.get(status, 'white')}]{status}[/]", str(r.get("data_seed")),
                      f"{', '.join(adopted.get('steps', []))} from {adopted['from']}" if adopted else "",
                      f"{r['duration_s']:.0f}s" if r.get("duration_s") is not None else "", r.get("ended", ""))
    console.print(table)
    if holder is not None:
        console.print(f"in use by {describe(holder)}")
    if state.get("estimate"):
        console.print(state["estimate"]["line"], highlight=False, soft_wrap=True)


@app.command()
def status(run_dir: Annotated[Path, typer.Argument(help="A run directory, or an experiment folder.")]) -> None:
    """Show the steps of a run with their state, counts and times; a step whose process is gone shows as
    interrupted (an experiment folder: its runs)."""
    from .locking import describe, lock_holder
    from .run import Run

    if (run_dir / "experiment.json").is_file():
        experiment_status(run_dir)
        return
    run = Run.open_existing(run_dir)
    table = Table(title=str(run_dir))
    for col in ("step", "status", "kept", "dropped", "duration", "ended"):
        table.add_column(col)
    colors = {"done": "green", "failed": "red", "running": "yellow", "interrupted": "red"}
    interrupted = []
    for name, s in run.steps().items():
        state = run.state(name)
        interrupted += [name] if state == "interrupted" else []
        counts = s.get("counts", {})
        dropped = counts.get("dropped") or {}
        table.add_row(
            name, f"[{colors.get(state, 'white')}]{state}[/]",
            "" if counts.get("kept") is None else str(counts["kept"]),
            ", ".join(f"{k}={v}" for k, v in dropped.items()) or ("" if state != "done" else "0"),
            f"{s.get('duration_s', 0):.1f}s" if "duration_s" in s else "", s.get("ended", ""),
        )
    console.print(table)
    holder = lock_holder(run_dir)
    if holder is not None:
        console.print(f"in use by {describe(holder)}")
    for name in interrupted:
        console.print(f"{name} was interrupted (its process is gone); run it again: `{run.command(name)}`",
                      highlight=False, soft_wrap=True)


# ---------------------------------------------------------------- pipeline steps

ConfigArg = Annotated[Path, typer.Argument(help="Pipeline config (YAML), e.g. configs/quick.yaml.")]
RunDirOpt = Annotated[Path, typer.Option("--run-dir", help="The run directory (created if missing).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key: a.b=value (repeatable).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Re-run even if inputs and config are unchanged (rebuilds outputs you edited).")]
KeepEditsOpt = Annotated[bool, typer.Option("--keep-edits", help="Use outputs changed by hand since their step wrote them, instead of stopping (docs/errors.md).")]

LauncherOpt = Annotated[str, typer.Option(help="none: run in this process; accelerate: `accelerate launch` the training (sft, dpo) and the generation of sft-data, pairs and evaluate.")]
AccelerateConfigOpt = Annotated[Optional[Path], typer.Option(help="accelerate config for --launcher accelerate, e.g. configs/accelerate/ddp.yaml.")]


def _accelerate_config(launcher: str, accelerate_config: Path | None) -> Path | None:
    if launcher not in ("none", "accelerate"):
        fail("--launcher must be none or accelerate")
    if launcher == "accelerate" and accelerate_config is None:
        fail("--launcher accelerate needs --accelerate-config FILE (see configs/accelerate/)")
    if launcher == "accelerate" and not accelerate_config.is_file():
        fail(f"--accelerate-config {accelerate_config}: no such file (see configs/accelerate/)")
    return accelerate_config if launcher == "accelerate" else None




def _step(fn, config: Path, run_dir: Path, overrides, *, command: str, keep_edits: bool = False,
          check: Callable[[PipelineConfig], None] | None = None, **kwargs) -> None:
    """Validate the config (and ``check`` the command's options against it) before anything is
    written; then run ``fn`` with the run directory locked."""
    from .config import load_config
    from .run import open_run

    cfg = load_config(config, overrides)
    if check is not None:
        check(cfg)
    with open_run(run_dir, cfg, command=command, config_path=config, keep_edits=keep_edits) as run:
        fn(run, **kwargs)


@app.command()
def baseline(config: ConfigArg, run_dir: RunDirOpt, set_: SetOpt = None, force: ForceOpt = False,
             keep_edits: KeepEditsOpt = False) -> None:
    """Score the base model on a fixed probe set in three prompt forms (raw, wrapper, few-shot)."""
    from .steps.baseline import run_baseline

    _step(run_baseline, config, run_dir, set_, command="baseline", keep_edits=keep_edits, force=force)


@app.command()
def instructions(config: ConfigArg, run_dir: RunDirOpt, set_: SetOpt = None, force: ForceOpt = False,
                 keep_edits: KeepEditsOpt = False) -> None:
    """Build the de-duplicated instruction pool and the held-out test set (leak-checked)."""
    from .steps.instructions import run_instructions

    _step(run_instructions, config, run_dir, set_, command="instructions", keep_edits=keep_edits, force=force)


@app.command("sft-data")
def sft_data(config: ConfigArg, run_dir: RunDirOpt, set_: SetOpt = None, force: ForceOpt = False,
             keep_edits: KeepEditsOpt = False, launcher: LauncherOpt = "none", accelerate_config: AccelerateConfigOpt = None) -> None:
    """Generate SFT responses with the base model (few-shot), clean, filter and critique them."""
    from .steps.sft_data import run_sft_data

    _step(run_sft_data, config, run_dir, set_, command="sft-data", keep_edits=keep_edits, force=force,
          accelerate_config=_accelerate_config(launcher, accelerate_config))


@app.command()
def sft(config: ConfigArg, run_dir: RunDirOpt, set_: SetOpt = None, force: ForceOpt = False,
        keep_edits: KeepEditsOpt = False,
        resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint.")] = False,
        launcher: Annotated[str, typer.Option(help="none | accelerate (several processes/GPUs).")] = "none",
        accelerate_config: AccelerateConfigOpt = None) -> None:
    """LoRA SFT with response-only loss; saves the adapter to models/sft/."""
    from .steps.sft import run_sft

    _step(run_sft, config, run_dir, set_, command="sft", keep_edits=keep_edits, force=force, resume=resume,
          accelerate_config=_accelerate_config(launcher, accelerate_config))


@app.command()
def pairs(config: ConfigArg, run_dir: RunDirOpt, set_: SetOpt = None, force: ForceOpt = False,
          keep_edits: KeepEditsOpt = False, launcher: LauncherOpt = "none", accelerate_config: AccelerateConfigOpt = None) -> None:
    """Build preference pairs: the SFT model's responses vs five kinds of negatives plus on-policy ones."""
    from .steps.pairs import run_pairs

    _step(run_pairs, config, run_dir, set_, command="pairs", keep_edits=keep_edits, force=force,
          accelerate_config=_accelerate_config(launcher, accelerate_config))


@app.command()
def dpo(config: ConfigArg, run_dir: RunDirOpt,
        init: Annotated[str, typer.Option(help="sft: DPO from the SFT model; base: the DPO-only baseline.")] = "sft",
        set_: SetOpt = None, force: ForceOpt = False, keep_edits: KeepEditsOpt = False,
        launcher: LauncherOpt = "none", accelerate_config: AccelerateConfigOpt = None) -> None:
    """DPO with TRL from the SFT model (models/dpo) or from base (models/dpo_only); one shared dpo: block."""
    from .steps.dpo import run_dpo

    if init not in ("sft", "base"):
        fail("--init must be sft or base")
    _step(run_dpo, config, run_dir, set_, command=f"dpo --init {init}", keep_edits=keep_edits, init=init, force=force,
          accelerate_config=_accelerate_config(launcher, accelerate_config))


@app.command()
def evaluate(config: ConfigArg, run_dir: RunDirOpt, set_: SetOpt = None, force: ForceOpt = False,
             keep_edits: KeepEditsOpt = False,
             model: Annotated[Optional[list[str]], typer.Option(help="Evaluate only these models (repeatable).")] = None,
             launcher: LauncherOpt = "none", accelerate_config: AccelerateConfigOpt = None) -> None:
    """Evaluate base / sft / dpo / dpo_only one at a time on the held-out set, with isolation checks."""
    from .steps.evaluate import run_evaluate

    def known_models(cfg: PipelineConfig) -> None:
        known = [*cfg.evaluation.models, *cfg.evaluation.extra_models]
        unknown = [m for m in model or [] if m not in known]
        if unknown:
            fail(f"--model {', '.join(unknown)}: not among the models this config evaluates ({', '.join(known)})")

    _step(run_evaluate, config, run_dir, set_, command="evaluate", keep_edits=keep_edits, check=known_models,
          force=force, only=model, accelerate_config=_accelerate_config(launcher, accelerate_config))


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run directory with saved responses, or an experiment folder.")]) -> None:
    """Rebuild scores, statistics and the report from saved responses, without loading any model
    (an experiment folder: the experiment report from its finished runs)."""
    from .run import open_run
    from .steps.report import report_inputs, run_report

    if (run_dir / "experiment.json").is_file():
        from .experiment.runner import rebuild_report

        paths = rebuild_report(run_dir)
        console.print(f"experiment report: {paths['markdown']} (and {paths['html']})")
        return
    with open_run(run_dir, None, command="report") as run:
        run.check_inputs_ready("report", report_inputs(run))
        run.remove_orphans()
        run_report(run)


@app.command()
def run(config: ConfigArg, run_dir: RunDirOpt, set_: SetOpt = None, force: ForceOpt = False,
        keep_edits: KeepEditsOpt = False,
        until: Annotated[Optional[str], typer.Option(help="Stop after this step.")] = None,
        launcher: LauncherOpt = "none", accelerate_config: AccelerateConfigOpt = None) -> None:
    """Run every step in order, skipping completed ones, then write the report."""
    from .steps.pipeline import STEPS, run_pipeline

    names = [n for n, _ in STEPS]
    if until is not None and until not in names:
        fail(f"--until {until}: not a step; the steps are {', '.join(names)}")
    _step(run_pipeline, config, run_dir, set_, command="run", keep_edits=keep_edits, force=force, until=until,
          accelerate_config=_accelerate_config(launcher, accelerate_config))


@app.command()
def experiment(
    config: ConfigArg,
    out: Annotated[Path, typer.Option("--out", help="The experiment folder: one run directory per round and seed.")],
    seeds: Annotated[int, typer.Option(min=1, help="Training seeds: the config's seed, seed+1, ...")] = 1,
    rounds: Annotated[int, typer.Option(min=1, help="Bootstrapping rounds: round r+1's data is written by round r's rounds.writer model.")] = 1,
    data_seeds: Annotated[bool, typer.Option("--data-seeds", help="Give each training seed its own data seed (split, SFT data) instead of sharing one.")] = False,
    set_: SetOpt = None,
    launcher: LauncherOpt = "none", accelerate_config: AccelerateConfigOpt = None,
) -> None:
    """Run the pipeline over training seeds (and rounds), resumably, then report per seed and pooled."""
    from .config import load_config
    from .experiment.runner import run_experiment

    acc = _accelerate_config(launcher, accelerate_config)
    state = run_experiment(load_config(config, set_), out, seeds=seeds, rounds=rounds, data_seeds=data_seeds,
                           accelerate_config=acc, config_path=config)
    console.print(f"experiment report: {state['report']['markdown']} (and {state['report']['html']})")


@app.command()
def plan(
    config: ConfigArg,
    gpus: Annotated[int, typer.Option(min=1, help="GPUs the run will use.")] = 1,
    strategy: Annotated[str, typer.Option(help="single | ddp | fsdp | zero3 (how training state is spread).")] = "single",
    gpu_memory_gib: Annotated[Optional[float], typer.Option(help="Memory per GPU, to say whether each step fits.")] = 80.0,
    activation_checkpointing: Annotated[bool, typer.Option(help="Estimate with activation checkpointing on.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    seeds: Annotated[int, typer.Option(min=1, help="Training seeds of an experiment (counts its runs).")] = 1,
    rounds: Annotated[int, typer.Option(min=1, help="Bootstrapping rounds of an experiment.")] = 1,
    data_seeds: Annotated[bool, typer.Option("--data-seeds", help="Each training seed its own data (as `experiment --data-seeds`).")] = False,
    measured: Annotated[Optional[Path], typer.Option(help="A finished run (or experiment folder) whose step times give the time estimate.")] = None,
    set_: SetOpt = None,
) -> None:
    """Estimate memory per GPU for every step (weights, LoRA, optimizer, activations, KV cache) before a
    run, and the runs and time of an experiment (--seeds/--rounds; time from --measured)."""
    from .config import ConfigError, load_config
    from .experiment.cost import estimate, find_measured
    from .experiment.plan import plan_runs
    from .models.embedded import ModelNotAvailable
    from .planning import format_plan, plan as make_plan

    if strategy not in ("single", "ddp", "fsdp", "zero3"):
        fail("--strategy must be single, ddp, fsdp or zero3")
    try:
        cfg = load_config(config, set_)
        p = make_plan(cfg, gpus, strategy, activation_checkpointing=activation_checkpointing,
                      gpu_memory_gib=gpu_memory_gib)
    except (ConfigError, ModelNotAvailable, ValueError) as e:
        fail(str(e))
    run = find_measured(measured) if measured else None
    if measured and run is None:
        fail(f"{measured}: neither a finished run directory nor an experiment folder with a finished run")
    cost = estimate(plan_runs(cfg.seed, seeds, rounds, data_seeds), cfg, run,
                    unmeasured="pass --measured with a finished run of this config")
    p["experiment"] = {"seeds": seeds, "rounds": rounds, "data_seeds": data_seeds, "runs": cost.runs,
                       "estimate_s": cost.total_s, "device": cost.device, "gpus": cost.gpus, "basis": cost.basis,
                       "config_differs_in": cost.differs, "line": cost.line()}
    print(json.dumps(p, indent=2) if json_out else format_plan(p) + f"\nexperiment: {cost.line()}")


@app.command()
def score(
    responses: Annotated[Path, typer.Argument(help="EvalResponse JSONL (eval/responses/<model>.jsonl), or IFEval's "
                                                   "response format: {prompt, response} per line, matched by prompt.")],
    tests: Annotated[Path, typer.Option(help="The test set: data/test.jsonl, or IFEval's input_data.jsonl.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON score record per line.")] = False,
) -> None:
    """Score saved responses against the test set with no model loaded (IFEval: Google's official checks)."""
    from .evaluation import ifeval
    from .evaluation.criteria import CRITERIA
    from .evaluation.analysis import score_all
    from .schemas import ArtifactError, load_kind

    try:
        items = ifeval.load_test_items(tests)
        if ifeval.is_response_file(responses):
            models = [responses.stem]
            scores = ifeval.score_responses(items, ifeval.load_responses(responses, items), model=responses.stem)
        else:
            by_model: dict[str, list] = {}
            for r in load_kind("responses", responses):
                by_model.setdefault(r.model, []).append(r)
            models = list(by_model)
            scores = score_all(items, by_model)
    except (ArtifactError, ValueError) as e:
        fail(str(e))
    if json_out:
        for s in scores:
            print(s.model_dump_json())
        return
    table = Table(title=f"scores: {responses}")
    table.add_column("criterion")
    for m in models:
        table.add_column(m, justify="right")
    flat = [(s.model, {**s.criteria, "ifeval_strict": s.checks_strict, "ifeval_loose": s.checks_loose})
            for s in scores]
    for c in (*CRITERIA, "ifeval_strict", "ifeval_loose"):
        row = []
        for m in models:
            vals = [v[c] for model, v in flat if model == m and v.get(c) is not None]
            row.append(f"{sum(vals)}/{len(vals)}" if vals else "-")
        if any(cell != "-" for cell in row):
            table.add_row(c, *row)
    for level, mode in (("inst_level", "strict"), ("inst_level", "loose")):
        row = []
        for m in models:
            metric = ifeval.model_metrics([s for s in scores if s.model == m])[f"{level}_{mode}"]
            row.append(f"{metric['k']}/{metric['n']}" if metric["n"] else "-")
        table.add_row(f"ifeval_{level}_{mode}", *row)
    console.print(table)


@app.command("inspect-masks")
def inspect_masks(
    data: Annotated[Path, typer.Argument(help="JSONL with prompt+response records (e.g. data/sft.jsonl) or raw `text` records.")],
    model: Annotated[str, typer.Option(help="Model spec whose tokenizer to use.")] = "smollm2-135m",
    n: Annotated[int, typer.Option(min=1, help="How many examples to show.")] = 5,
    max_length: Annotated[int, typer.Option(help="Token limit (truncation applies as in training).")] = 256,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per example instead of the view.")] = False,
) -> None:
    """Show which tokens are supervised: the response, END and EOS only, never the prompt."""
    from .formats import prompt_for
    from .models.loading import load_tokenizer, resolve
    from .training.masking import inspect_masks as inspect, render_masks

    records = []
    for k, line in enumerate(data.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            fail(f"{data}:{k}: (json): {e.msg}")
        if not isinstance(obj, dict) or "id" not in obj:
            fail(f"{data}:{k}: id: a record with an id is required")
        if "text" not in obj:
            if "instruction" in obj and "response" in obj:  # SFT records: train on the zero-shot prompt
                obj = {"id": obj["id"], "prompt": prompt_for(obj["instruction"]), "response": obj["response"]}
            elif not {"prompt", "response"} <= set(obj):
                fail(f"{data}:{k}: text: need `text`, or `prompt` and `response`")
        records.append(obj)
        if len(records) >= n:
            break
    tok = load_tokenizer(resolve(model).path)  # ModelNotAvailable: one line, from the guard
    if json_out:
        for row in inspect(tok, records, n, max_length=max_length):
            print(json.dumps(row, ensure_ascii=False))
    else:
        render_masks(tok, records, n, console=console, max_length=max_length)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
