#!/usr/bin/env bash
# The GPU check: on a machine with one CUDA GPU, measure what the CPU cannot -- evaluation end to end
# (DiT-XL/2, DDPM-250, FID-50K projected, as eval.* resolve on the device), training at the paper's
# batch (XL/2, B/2, S/2; attention kernel orders), fp32-vs-bf16 sampling against the bootstrap error,
# and the cuda tests -- and write ONE markdown summary. Budget: under 10 minutes on one H100/H200
# (each stage has its own time limit; the summary says which stage ran out of time).
#
#   bash scripts/gpu-check.sh [OUT_DIR]        # default OUT_DIR: gpu-check/ (or $OUT when set)
#   GPU_CHECK_STAGES="train-s2-graphs precision" bash scripts/gpu-check.sh   # some stages only, in that order
#
# Stages (default: all, in this order -- what the last GPU task left unmeasured first; see the README's
# "Evaluation on GPUs" and issue 23): train-xl2-default, train-b2-graphs, train-s2-graphs, train-b2-autotune,
# train-s2-autotune, precision, cuda-tests, eval-xl2, train-xl2-cudnn, bench-suite (continued from
# $GPU_CHECK_SUITE, a bench-suite.json an earlier call returned, when set).
#
# Python: the project's .venv when it exists, else `python3`. Packages missing from a bare GPU image
# are installed from wheels in .whl/ when that folder exists (build them on a machine with PyPI:
#   pip wheel --no-deps -w .whl fvcore==0.1.5.post20221221 iopath==0.1.10 yacs termcolor submitit \
#       diffusers==0.42.1 torch-fidelity==0.4.0 importlib_metadata
# ), into a private folder put on PYTHONPATH; nothing is downloaded. $VAE and $INCEPTION_WEIGHTS name
# real weight files; without them the architectures run with random weights (same speed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu-check}}"
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.md"
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  SITE="$(mktemp -d)/site"
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export HARNESS_CACHE="${HARNESS_CACHE:-$OUT_DIR/cache}"
start=$SECONDS

BUDGET=${GPU_CHECK_BUDGET_S:-540}   # all stages together; the rest of 10 minutes is start-up and slack
# (the stages' limits add up to ~2,100 s: several calls with GPU_CHECK_STAGES, see CONTRIBUTING)

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit (cut to what is left of BUDGET)
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - start)))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    echo "| $name | skipped: the time budget is spent | 0 s |" >>"$OUT_DIR/stages.md"
    return 0
  fi
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  local verdict="ok"
  [ $rc -eq 124 ] && verdict="TIMED OUT after ${limit}s"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && verdict="FAILED (exit $rc)"
  echo "| $name | $verdict | $((SECONDS - t0)) s |" >>"$OUT_DIR/stages.md"
  echo "gpu-check: $name: $verdict ($((SECONDS - t0)) s)" >&2
  return 0
}

: >"$OUT_DIR/stages.md"
"$PY" - >"$OUT_DIR/device.txt" 2>&1 <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO GPU'}")
EOF

BENCH=("$PY" -m harness bench --precision bf16 --batch 256 --steps 10 --warmup 3)
EVAL_XL2='
import json, logging, os, sys
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
from harness.sampling.bench import bench_eval, format_eval
r = bench_eval("DiT-XL/2", sampling_steps=250, num_samples=50000, measure_steps=(5, 15),
               autoencoder_path=os.environ.get("VAE"), inception_weights=os.environ.get("INCEPTION_WEIGHTS"))
json.dump(r, open(sys.argv[1], "w"), indent=2)
print(format_eval(r))
'
run_stage() {  # one named stage with its own time limit
  case $1 in
    # training at the paper's batch: XL/2 in PyTorch's kernel order (its 2026-12-04 stage ran out of time)
    train-xl2-default) stage "$1" 150 "${BENCH[@]}" --model DiT-XL/2 --out "$OUT_DIR/$1.json" ;;
    # CUDA graphs (no launch overhead) and the kernel search, for the small models whose MFU is lowest
    train-b2-graphs) stage "$1" 90 "${BENCH[@]}" --model DiT-B/2 --compile-mode reduce-overhead --out "$OUT_DIR/$1.json" ;;
    train-s2-graphs) stage "$1" 80 "${BENCH[@]}" --model DiT-S/2 --compile-mode reduce-overhead --out "$OUT_DIR/$1.json" ;;
    train-b2-autotune) stage "$1" 200 "${BENCH[@]}" --model DiT-B/2 --compile-mode max-autotune-no-cudagraphs \
                         --out "$OUT_DIR/$1.json" ;;
    train-s2-autotune) stage "$1" 160 "${BENCH[@]}" --model DiT-S/2 --compile-mode max-autotune-no-cudagraphs \
                         --out "$OUT_DIR/$1.json" ;;
    # fp32 eager vs bf16 compiled sampling: the FID difference against the combined bootstrap error (its fp32
    # decodes and 2,048-d bootstraps took more than 170 s on an H200, 2026-12-04)
    precision) stage "$1" 280 env GPU_CHECK_OUT="$OUT_DIR" "$PY" -m pytest -q -s -m cuda tests/test_eval_precision.py \
                 -p no:cacheprovider ;;
    cuda-tests) stage "$1" 150 "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider ;;
    # evaluation end to end: DiT-XL/2, DDPM-250 projected to FID-50K, eval.* defaults (bf16, compiled, batch auto),
    # SD-VAE decode and Inception features (random weights unless $VAE/$INCEPTION_WEIGHTS); 1.78 h on 2026-12-04
    eval-xl2) stage "$1" 230 "$PY" -c "$EVAL_XL2" "$OUT_DIR/$1.json" ;;
    # cuDNN attention first (the H100 baseline: 0.153 ms vs flash 0.258; the whole step lost 2.5% on 2026-12-04)
    train-xl2-cudnn) stage "$1" 150 env HARNESS_ATTENTION=cudnn "${BENCH[@]}" --model DiT-XL/2 --out "$OUT_DIR/$1.json" ;;
    # what `harness plan --throughput-from` reads: all 12 models' training and evaluation end to end (DDPM-250),
    # the MFU targets' models first; rewritten after each model and continued from $GPU_CHECK_SUITE (the
    # bench-suite.json an earlier call returned), so a suite cut by its limit goes on in the next call
    bench-suite)
      [ -f "${GPU_CHECK_SUITE:-}" ] && cp "$GPU_CHECK_SUITE" "$OUT_DIR/bench-suite.json"
      stage "$1" 600 "${BENCH[@]}" --suite "$SUITE_MODELS" --sampling-steps 250 --out "$OUT_DIR/bench-suite.json" ;;
    *) echo "| $1 | unknown stage | 0 s |" >>"$OUT_DIR/stages.md" ;;
  esac
}
SUITE_MODELS="DiT-XL/2,DiT-B/2,DiT-S/2,DiT-L/2,DiT-XL/4,DiT-L/4,DiT-B/4,DiT-XL/8,DiT-L/8,DiT-S/4,DiT-B/8,DiT-S/8"
TRAIN_STAGES="train-xl2-default train-b2-graphs train-s2-graphs train-b2-autotune train-s2-autotune"
STAGES=${GPU_CHECK_STAGES:-"$TRAIN_STAGES precision cuda-tests eval-xl2 train-xl2-cudnn bench-suite"}
for s in $STAGES; do run_stage "$s"; done

{
  echo "# GPU check, $(date -u +%Y-%m-%d)"
  echo
  echo "$(cat "$OUT_DIR/device.txt"), total $((SECONDS - start)) s."
  echo
  echo "| stage | result | time |"
  echo "|---|---|---|"
  cat "$OUT_DIR/stages.md"
  echo
  echo "## evaluation end to end, DiT-XL/2, DDPM-250, FID-50K projected"
  echo '```'
  grep -E "sampling batch|decode and features|compiled|evaluation|torch.compile|Error|error" "$OUT_DIR/eval-xl2.log" 2>/dev/null | tail -n 14
  echo '```'
  echo
  echo "## fp32 vs bf16 compiled sampling (FID, bootstrap error)"
  echo '```'
  grep -E "precision check|passed|failed|Error" "$OUT_DIR/precision.log" 2>/dev/null | tail -n 6
  echo '```'
  for t in $TRAIN_STAGES train-xl2-cudnn; do
    [ -f "$OUT_DIR/$t.log" ] || continue
    echo
    echo "## $t"
    echo '```'
    if grep -q "^MFU" "$OUT_DIR/$t.log" 2>/dev/null; then grep -E "^(model|input|training|MFU|peak|attention|compile)" "$OUT_DIR/$t.log"
    else grep -E "micro-batch|training|WARNING|Error" "$OUT_DIR/$t.log" 2>/dev/null | tail -n 6; fi
    echo '```'
  done
  if [ -f "$OUT_DIR/bench-suite.md" ]; then
    echo
    echo "## bench suite (bench-suite.json: pass it back as GPU_CHECK_SUITE to continue it)"
    echo
    cat "$OUT_DIR/bench-suite.md"
    echo
    echo '```'
    "$PY" -m harness plan sweeps/gflops.yaml --throughput-from "$OUT_DIR/bench-suite.json" 2>&1 | tail -n 30
    echo '```'
  fi
  echo
  echo "## cuda tests"
  echo '```'
  tail -n 6 "$OUT_DIR/cuda-tests.log" 2>/dev/null
  echo '```'
} >"$SUMMARY"
echo "gpu-check: summary in $SUMMARY ($((SECONDS - start)) s)"
