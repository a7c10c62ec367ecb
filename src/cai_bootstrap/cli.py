"""The command line: one command per pipeline step, plus `run`, `validate`, `status`, `models`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .console import console

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(
    help="Bootstrap instruction following from a base model's own outputs, and prove whether it helped.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Embedded and local models: list, prepare.", no_args_is_help=True)
app.add_typer(models_app, name="models")


def fail(message: str, code: int = 1) -> None:
    console.print(f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True)
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
    from .models.embedded import ModelNotAvailable, prepare

    try:
        folder, converted = prepare(name, force=force)
    except ModelNotAvailable as e:
        fail(str(e))
    console.print(("converted" if converted else "already prepared") + f": {folder}")
    print(folder)


# ---------------------------------------------------------------- generate

@app.command()
def generate(
    model: Annotated[str, typer.Option(help="Model spec: embedded name, local folder or hub id.")],
    prompts: Annotated[Path, typer.Option(help="JSONL of {id, prompt} records.")],
    out: Annotated[Path, typer.Option(help="Where to write the generation records (JSONL).")],
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per batch.")] = 16,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Token limit per completion.")] = 96,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop string (repeatable; default: END and runaway markers). Use \\n for a newline.")] = None,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    quantization: Annotated[str, typer.Option(help="none | 8bit | 4bit (bitsandbytes).")] = "none",
    allow_full_precision_fallback: Annotated[bool, typer.Option(help="Load full precision if quantized loading is impossible (recorded).")] = False,
    add_bos: Annotated[bool, typer.Option(help="Prepend the BOS token to each prompt.")] = False,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16 | auto.")] = "float32",
) -> None:
    """Batched generation: one record per prompt, in input order, with finish reasons and token counts."""
    from .files import atomic_write_json, write_jsonl
    from .formats import STOP_STRINGS
    from .generation.engine import Decoding, Engine
    from .generation.records import generate_records
    from .models.embedded import ModelNotAvailable
    from .models.loading import QuantizationUnavailable, load_model
    from .schemas import ArtifactError, PromptRecord, load_jsonl

    if quantization not in ("none", "8bit", "4bit"):
        fail(f"--quantization must be none, 8bit or 4bit, not {quantization!r}")
    try:
        records = load_jsonl(prompts, PromptRecord)
    except ArtifactError as e:
        fail(str(e))
    stops = tuple(s.encode().decode("unicode_escape") for s in stop) if stop else STOP_STRINGS
    try:
        loaded = load_model(model, quantization=quantization, dtype=dtype,
                            allow_full_precision_fallback=allow_full_precision_fallback)
    except (ModelNotAvailable, QuantizationUnavailable) as e:
        fail(str(e))
    decoding = Decoding(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                        stop_strings=stops)
    engine = Engine(loaded.model, loaded.tokenizer, batch_size=batch_size, add_bos=add_bos)
    results = generate_records(engine, records, decoding)
    write_jsonl(out, results)
    provenance = {**loaded.provenance, "add_bos_token": add_bos, "decoding": decoding.as_dict(),
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
    n, problems = validate_kind(kind, file)
    for p in problems:
        print(p)
    if problems:
        console.print(f"[red]{file}: {len(problems)} problem(s), {n} valid record(s)[/]")
        raise typer.Exit(1)
    console.print(f"[green]{file}: {n} valid {kind} record(s)[/]")


@app.command()
def status(run_dir: Annotated[Path, typer.Argument(help="A run directory.")]) -> None:
    """Show the steps of a run with their state, counts and times."""
    manifest = run_dir / "manifest.json"
    if not manifest.is_file():
        fail(f"{manifest} not found: not a run directory")
    steps = json.loads(manifest.read_text())["steps"]
    table = Table(title=str(run_dir))
    for col in ("step", "status", "kept", "dropped", "duration", "ended"):
        table.add_column(col)
    colors = {"done": "green", "failed": "red", "running": "yellow"}
    for name, s in steps.items():
        counts = s.get("counts", {})
        dropped = counts.get("dropped") or {}
        table.add_row(
            name, f"[{colors.get(s['status'], 'white')}]{s['status']}[/]",
            "" if counts.get("kept") is None else str(counts["kept"]),
            ", ".join(f"{k}={v}" for k, v in dropped.items()) or ("" if s["status"] != "done" else "0"),
            f"{s.get('duration_s', 0):.1f}s" if "duration_s" in s else "", s.get("ended", ""),
        )
    console.print(table)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
