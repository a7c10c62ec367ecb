#!/usr/bin/env bash
# The GPU paths, checked on one CUDA GPU with the embedded model only (no hub), in about 10 minutes:
#   bf16   the whole pipeline (configs/quick.yaml, smaller counts) with bf16 autocast for SFT and DPO
#   vllm   the five models of that run evaluated again with generation.backend vllm
#          (SKIP when vllm is not installed)
#   zero3  SFT and both DPO runs again under configs/accelerate/deepspeed_zero3.yaml with one process
#          (SKIP when deepspeed is not installed)
# One PASS / FAIL / SKIP line per path; OUT/summary.txt holds the same lines and OUT/summary.json
# the machine, the times and the details. Exit status: 0 nothing failed, 1 a path failed, 2 bad
# arguments, 3 no CUDA GPU (nothing was run).
set -euo pipefail

usage() {
    cat <<'EOF'
usage: scripts/gpu_check.sh [--out DIR] [--only PATHS] [--python PY]

Checks the GPU paths on one CUDA GPU with the embedded model (SmolLM2-135M, no hub access):
  bf16   the pipeline with bf16 autocast (SFT, DPO), the libraries' paths (no CPU backend)
  vllm   evaluation with generation.backend vllm (skipped if vllm is not installed)
  zero3  SFT and DPO under configs/accelerate/deepspeed_zero3.yaml, one process
         (skipped if deepspeed is not installed)

  --out DIR      where the runs, logs and summary go (default: runs/gpu-check; emptied first)
  --only PATHS   comma-separated subset of bf16,vllm,zero3 (vllm and zero3 reuse the bf16 run)
  --python PY    the interpreter with cai_bootstrap installed (default: .venv/bin/python, else python3)
  -h, --help     this text

Refuses (exit 3) on a machine without a CUDA GPU. Uses GPU 0 unless CUDA_VISIBLE_DEVICES says otherwise.
EOF
}

fail_usage() {
    echo "gpu_check: $1" >&2
    echo "run scripts/gpu_check.sh --help for the options" >&2
    exit 2
}

cd "$(dirname "$0")/.."
out=runs/gpu-check
only=bf16,vllm,zero3
py=""
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --out | --only | --python)
            if [ $# -lt 2 ] || [ -z "$2" ]; then fail_usage "$1 needs a value"; fi
            case "$1" in --out) out=$2 ;; --only) only=$2 ;; --python) py=$2 ;; esac
            shift 2 ;;
        --out=* | --only=* | --python=*)
            value=${1#*=}
            [ -n "$value" ] || fail_usage "${1%%=*} needs a value"
            case "$1" in --out=*) out=$value ;; --only=*) only=$value ;; --python=*) py=$value ;; esac
            shift ;;
        *) fail_usage "unknown argument: $1" ;;
    esac
done

selected=()
IFS=, read -r -a wanted <<< "$only"
for path in "${wanted[@]}"; do
    case "$path" in
        "") ;;
        bf16 | vllm | zero3) selected+=("$path") ;;
        *) fail_usage "--only: unknown path '$path' (known: bf16, vllm, zero3)" ;;
    esac
done
[ ${#selected[@]} -gt 0 ] || fail_usage "--only: no path given"
if [ -z "$py" ]; then
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
command -v "$py" > /dev/null || fail_usage "--python: $py is not an executable"
[ "$("$py" -c 'import cai_bootstrap, torch; print("importable")' 2> /dev/null)" = importable ] \
    || fail_usage "$py cannot import cai_bootstrap and torch (make setup, or pass --python)"

export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-0}  # set but empty: no GPU
probe=$("$py" -c 'import torch
print("cuda: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")' 2> /dev/null) || probe=none
gpu=${probe#cuda: }
if [ "$gpu" = "$probe" ]; then  # no "cuda: NAME" answer
    echo "gpu_check: REFUSED: no CUDA GPU here (torch.cuda.is_available() is False for $py, CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES). This check needs one CUDA GPU; nothing was run." >&2
    exit 3
fi

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
config=configs/quick.yaml
small=(--set instructions.builtin=300 --set instructions.self_instruct_rounds=2 --set instructions.test_size=32
       --set sft_data.max_instructions=96
       --set sft.mixed_precision=bf16 --set dpo.mixed_precision=bf16)
cli=("$py" -m cai_bootstrap.cli)
rm -rf "$out"
mkdir -p "$out"
summary_lines=()
details_json=()
failed=0
started=$SECONDS

has() { "$py" -c "import $1" 2> /dev/null; }

record() {  # record STATUS PATH SECONDS DETAIL
    local line="$1 $2 (${3} s): $4"
    echo "$line"
    summary_lines+=("$line")
    details_json+=("$("$py" -c 'import json, sys; print(json.dumps(dict(zip(("status", "path", "seconds", "detail"), sys.argv[1:]))))' "$1" "$2" "$3" "$4")")
    if [ "$1" = FAIL ]; then failed=1; fi
}

run_path() {  # run_path PATH: the commands of one path, logged to OUT/PATH.log; then its check
    local path=$1 t0=$SECONDS log="$out/$1.log" detail status=0
    case "$path" in
        bf16) path_bf16 > "$log" 2>&1 || status=$? ;;
        vllm) path_vllm > "$log" 2>&1 || status=$? ;;
        zero3) path_zero3 > "$log" 2>&1 || status=$? ;;
    esac
    if [ "$status" -ne 0 ]; then
        record FAIL "$path" $((SECONDS - t0)) "a command failed; see $log: $(tail -n 1 "$log")"
        return
    fi
    if detail=$(check "$path" 2>&1); then
        record PASS "$path" $((SECONDS - t0)) "$detail"
    else
        record FAIL "$path" $((SECONDS - t0)) "$detail (log: $log)"
    fi
}

check() {
    case "$1" in
        vllm) "$py" scripts/gpu_check_verify.py vllm "$out/vllm" --hf-run "$out/bf16" ;;
        *) "$py" scripts/gpu_check_verify.py "$1" "$out/$1" ;;
    esac
}

bf16_ready() { "$py" scripts/gpu_check_verify.py bf16 "$out/bf16" > /dev/null 2>&1; }

# Each command of a path stops it on failure (`|| return`: errexit does not hold inside `f || ...`).
path_bf16() {
    "${cli[@]}" run "$config" --run-dir "$out/bf16" --force "${small[@]}"
}

path_vllm() {
    cp -r "$out/bf16" "$out/vllm" || return
    "${cli[@]}" evaluate "$config" --run-dir "$out/vllm" --force "${small[@]}" --set generation.backend=vllm
}

path_zero3() {
    local one="$out/deepspeed_zero3_1proc.yaml"
    sed 's/^num_processes: .*/num_processes: 1/' configs/accelerate/deepspeed_zero3.yaml > "$one" || return
    cp -r "$out/bf16" "$out/zero3" || return
    rm -rf "$out/zero3/models/sft" "$out/zero3/models/dpo" "$out/zero3/models/dpo_only" || return
    local launch=(--launcher accelerate --accelerate-config "$one" --force "${small[@]}"
                  --set sft.gradient_accumulation_steps=1)
    "${cli[@]}" sft "$config" --run-dir "$out/zero3" "${launch[@]}" || return
    "${cli[@]}" dpo "$config" --run-dir "$out/zero3" --init sft "${launch[@]}" || return
    "${cli[@]}" dpo "$config" --run-dir "$out/zero3" --init base "${launch[@]}"
}

echo "gpu_check: $gpu; runs, logs and summary in $out"
for path in "${selected[@]}"; do
    case "$path" in
        vllm) has vllm || { record SKIP vllm 0 "vllm is not installed (make setup-vllm)"; continue; } ;;
        zero3) has deepspeed || { record SKIP zero3 0 "deepspeed is not installed (pip install deepspeed)"; continue; } ;;
    esac
    if [ "$path" != bf16 ] && ! bf16_ready; then
        if [[ " ${selected[*]} " == *" bf16 "* ]]; then
            record FAIL "$path" 0 "needs the bf16 run, which did not pass"
            continue
        fi
        run_path bf16 > /dev/null || true  # --only without bf16: make its run first, quietly
        bf16_ready || { record FAIL "$path" 0 "needs the bf16 run, which did not pass (log: $out/bf16.log)"; continue; }
    fi
    run_path "$path"
done

total=$((SECONDS - started))
over=""
if [ "$total" -gt 600 ]; then over=" (over the 10-minute budget)"; fi
echo "gpu_check: ${total} s in all${over}"
printf '%s\n' "${summary_lines[@]}" "total ${total} s${over}" > "$out/summary.txt"
"$py" - "$out/summary.json" "$gpu" "$total" "${details_json[@]}" <<'EOF'
import json, platform, sys

import torch

path, gpu, total, *paths = sys.argv[1:]
summary = {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "total_seconds": int(total), "paths": [json.loads(p) for p in paths]}
with open(path, "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
EOF
exit "$failed"
