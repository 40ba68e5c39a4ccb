#!/usr/bin/env bash
# Issue 16's GPU measurements in one prepared run, sized for a 15-minute device lease
# (estimated at about 7 minutes on one H100; not yet run on one): see docs/performance.md, "On a GPU".
#
#   bash benchmarks/gpu_check.sh            # on a machine with CUDA, from the repo root
#
# 1. the SD 1.5-size UNet (random weights, 860M parameters) in fp16 with SDPA attention,
#    every sampler/estimator at N = 2 (batch 3): the 3%-of-the-step target and the rest;
# 2. the same three quick paths with the math attention (no fused kernel) and, when
#    installed, xformers;
# 3. the quick sd64 cases in float32 (the CPU table's layout, on the GPU);
# 4. benchmarks/step_breakdown.py on three sd64 cases.
# Results go to benchmarks/results/speed/ (labels gpu-*); where the device tool's $OUT is
# set they are also packed into $OUT/gpu_results.tar.gz after every run (the tool returns at
# most 8 files, and what is under $OUT when a command is stopped at its time limit).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${RESULTS_DIR:-benchmarks/results/speed}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
SITE=${SITE:-/tmp/site}
# packages the machine lacks (diffusers, on the lent machines) travel as wheels in .whl
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
fi
# this package itself: pyproject maps pipelines/ to superdiff.pipelines (and ui/, protein/), so
# the source tree on PYTHONPATH is not enough; where it is not installed, it is (no network:
# setuptools from the machine, no dependencies)
# (imports are checked from outside the tree: `python -c` puts the working directory first on
# sys.path, where superdiff/ would shadow the installed package; speed.py itself starts from
# benchmarks/, as it does here)
export PYTHONPATH=$SITE:${PYTHONPATH:-}
pyc() { (cd "${TMPDIR:-/tmp}" && "$PY" -c "$1"); }
if ! pyc "import superdiff.pipelines" 2> /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .
fi
pyc "import torch, diffusers, superdiff.pipelines; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.__version__, diffusers.__version__, torch.cuda.get_device_name())"
# after every run, what exists so far goes into $OUT (a run stopped by the lease's time limit
# still returns the finished runs, and the per-case partial_*.json of the one it stopped in)
pack() {
    local files
    files=$(cd "$DEST" && ls -- *gpu-* 2> /dev/null || true)
    if [ -n "${OUT:-}" ] && [ -n "$files" ]; then
        tar czf "$OUT/gpu_results.tar.gz" -C "$DEST" $files
    fi
}
run() {  # a failed run is reported and the next one goes on
    "$PY" benchmarks/speed.py --device cuda --out "$DEST" "$@" || echo "gpu_check: this run failed: $*" >&2
    pack
}
run --model sd15 --dtype float16 --attention sdpa --steps 6 --reps 2 --label gpu-sd15-fp16-sdpa
run --model sd15 --dtype float16 --attention math --quick --steps 6 --label gpu-sd15-fp16-math
if pyc "import xformers" 2> /dev/null; then
    run --model sd15 --dtype float16 --attention xformers --quick --steps 6 --label gpu-sd15-fp16-xformers
else
    echo "xformers is not installed: its run is skipped (the package's gpu extra, pip install 'superdiff[gpu]', adds it)"
fi
run --quick --steps 4 --label gpu-sd64
# 4. where the step's time goes, part by part (sd64, float32): on a GPU the parts' times are the
#    host's launch work (the network's own time is synchronised by speed.py's timer)
"$PY" benchmarks/step_breakdown.py --device cuda --out "$DEST" --label gpu-sd64 --steps 12 --reps 3 \
    --cases sd64/euler+ode/and/N2,sd64/euler+ode/and/N3,sd64/sde+ito/and/N2 \
    || echo "gpu_check: the breakdown failed" >&2
pack
