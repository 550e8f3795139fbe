#!/usr/bin/env bash
# GPU check of nonn: correctness of the torch CUDA backend against the CPU
# path on a small set, then KNNN fit / score times at N = 1M, D = 512 on one
# GPU (benchmarks/gpu_check.py). Meant to finish within ~5 minutes on an H200.
#
#   bash benchmarks/gpu_check.sh            # from anywhere; results to $OUT or ./gpu_results
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#   GPU_CHECK_SECONDS=280 bash benchmarks/gpu_check.sh --n 500000   # args go to gpu_check.py
#
# Set-up: uses $PYTHON, else the repo's .venv if its torch sees CUDA, else
# python3. Keeps an installed CUDA torch (never reinstalls it); installs torch
# only when none sees the GPU. Installs nonn from this repository
# (pip install -e . into a venv that sees the system packages, so the system's
# CUDA torch stays in use), falling back to PYTHONPATH=src when pip cannot
# (offline). Exit status: 0 = passed, or no CUDA device (skipped);
# 1 = a correctness check failed; 3 = set-up failed on a GPU machine;
# 124 = the time limit was hit (what was measured is in the JSON / .md).
#
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh
# runs the whole script on the CPU at a small size, without installing
# anything (checks the script itself on a machine without a GPU).
set -u
START=$(date +%s)
LIMIT=${GPU_CHECK_SECONDS:-285}
cd "$(dirname "$0")/.." || exit 3
REPO=$PWD

log() { echo "[gpu_check.sh $(( $(date +%s) - START )) s] $*"; }

has_gpu_device() {
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then return 0; fi
    ls /dev/nvidia[0-9]* >/dev/null 2>&1
}

cuda_torch() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; }

DRY=${GPU_CHECK_DRY_RUN:-0}
if [ "$DRY" = 1 ]; then
    PY=${PYTHON:-python3}
    [ -x "$REPO/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && PY=$REPO/.venv/bin/python
    export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
    log "DRY RUN with $PY on the CPU at a small size (no installs): checks the script only"
    timeout --signal=INT --kill-after=10 $(( LIMIT + 5 )) "$PY" "$REPO/benchmarks/gpu_check.py" \
        --device cpu --n 20000 --d 64 --queries 1000 --n-small 2000 \
        --d-small 32 --out "${OUT:-$REPO/gpu_results}" "$@"
    exit $?
fi

if ! has_gpu_device; then
    PY=${PYTHON:-python3}
    [ -x "$REPO/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && PY=$REPO/.venv/bin/python
    if ! cuda_torch "$PY"; then
        log "SKIPPED: no NVIDIA GPU on this machine (no nvidia-smi device, no /dev/nvidia*, and torch sees no CUDA)."
        exit 0
    fi
fi
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# ---- python with a CUDA torch ------------------------------------------------
PY=""
for cand in ${PYTHON:-} "$REPO/.venv/bin/python" python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && cuda_torch "$cand"; then PY=$cand; break; fi
done
if [ -z "$PY" ]; then
    PY=${PYTHON:-python3}
    log "no python here has a torch that sees CUDA; installing torch (the default Linux wheel is a CUDA build)"
    "$PY" -m pip install -q --retries 1 torch \
        || "$PY" -m pip install -q --retries 1 --break-system-packages torch
    if ! cuda_torch "$PY"; then
        log "ERROR: a GPU is present but torch with CUDA could not be installed for $PY"
        exit 3
    fi
fi
log "python: $PY ($("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'))"

# ---- nonn from this repository ----------------------------------------------
VENV=${GPU_CHECK_VENV:-/tmp/nonn-gpu-venv}
if [ "$PY" != "$REPO/.venv/bin/python" ]; then
    if [ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV" >/dev/null 2>&1; then
        if cuda_torch "$VENV/bin/python"; then PY=$VENV/bin/python; fi
    fi
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=${PIP_DEFAULT_TIMEOUT:-10}
DEPS="import numpy, scipy, sklearn, numba, tqdm"
if "$PY" -c "$DEPS" >/dev/null 2>&1; then
    # dependencies present: an editable install of nonn alone, no network needed
    "$PY" -m pip install -q --retries 0 --no-deps --no-build-isolation -e "$REPO" \
        >/tmp/nonn-gpu-pip.log 2>&1 \
        || log "pip install -e . did not work here; using PYTHONPATH=src (see /tmp/nonn-gpu-pip.log)"
else
    log "installing nonn with its dependencies (pip install -e .)"
    "$PY" -m pip install -q --retries 1 -e "$REPO" >/tmp/nonn-gpu-pip.log 2>&1 \
        || "$PY" -m pip install -q --retries 1 numpy scipy scikit-learn numba tqdm \
            >>/tmp/nonn-gpu-pip.log 2>&1
fi
# the repository's own code first, whatever pip managed
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import nonn; $DEPS" 2>/tmp/nonn-gpu-import.log; then
    log "ERROR: nonn or its dependencies cannot be imported with $PY (offline and missing?)"
    cat /tmp/nonn-gpu-import.log /tmp/nonn-gpu-pip.log 2>/dev/null | tail -20
    exit 3
fi
log "nonn: $("$PY" -c 'import nonn; print(nonn.__version__, nonn.__file__)')"

# ---- the check, inside the time limit ---------------------------------------
DEADLINE=$(( START + LIMIT ))
LEFT=$(( DEADLINE - $(date +%s) ))
log "running benchmarks/gpu_check.py (deadline in ${LEFT} s)"
timeout --signal=INT --kill-after=10 $(( LEFT + 5 )) \
    "$PY" "$REPO/benchmarks/gpu_check.py" "$@"
RC=$?
if [ $RC -eq 124 ] || [ $RC -eq 130 ]; then
    log "TIME LIMIT hit; partial results are in the JSON"
    exit 124
fi
log "done, exit status $RC (0 = correct, 1 = correctness failure)"
exit $RC
