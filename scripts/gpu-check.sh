#!/usr/bin/env bash
# The GPU check: on a machine with one CUDA GPU, run the cuda tests, the training benchmark (the
# headline DiT-XL/2 at the paper's batch, the 12 variants, the compiled sizes the targets name),
# the sampling and latent benchmarks, and the smoke sweep on the GPU, and write ONE markdown
# summary. Budget: under 10 minutes on one H100 (each stage has its own time limit and the summary
# says which stage ran out of time).
#
#   bash scripts/gpu-check.sh [OUT_DIR]        # default OUT_DIR: gpu-check/ (or $OUT when set)
#
# Python: the project's .venv when it exists, else `python3`. Packages missing from a bare GPU image
# (fvcore, iopath, yacs, termcolor, submitit, pytest...) are installed from wheels in .whl/ when
# that folder exists (build them on a machine with PyPI:
#   pip wheel --no-deps -w .whl fvcore==0.1.5.post20221221 iopath==0.1.10 yacs termcolor submitit \
#       portalocker tabulate pytest pluggy iniconfig
# ), into a private folder put on PYTHONPATH; nothing is downloaded.
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

BUDGET=${GPU_CHECK_BUDGET_S:-530}   # all stages together; the rest of 10 minutes is start-up and slack

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
# most valuable first: a stage cut short by the budget still leaves the lines it logged
stage bench-xl2-compiled 180 "${BENCH[@]}" --model DiT-XL/2 --out "$OUT_DIR/bench-xl2.json"
stage cuda-tests 70 "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider
stage bench-suite-eager 120 "${BENCH[@]}" --suite paper --compile off --steps 3 --warmup 2 \
  --out "$OUT_DIR/suite-eager.json"
stage bench-suite-compiled 110 "${BENCH[@]}" --suite DiT-S/2,DiT-B/2,DiT-L/2 --out "$OUT_DIR/suite-compiled.json"
# the latent stage's VAE encodes/s and end-to-end sampling images/s (random SD-VAE weights unless $VAE)
stage bench-latents-sampling 40 "$PY" -m harness bench --model DiT-XL/2 --batch 32 --steps 3 --warmup 1 \
  --precision bf16 --compile off --latents --sampling-steps 10 ${VAE:+--autoencoder-path "$VAE"} \
  --out "$OUT_DIR/bench-stages.json"
stage smoke-sweep 40 "$PY" -m harness sweep sweeps/smoke.yaml --launcher debug \
  --results "$OUT_DIR/results" --reports "$OUT_DIR/reports"

{
  echo "# GPU check, $(date -u +%Y-%m-%d)"
  echo
  echo "$(cat "$OUT_DIR/device.txt"), total $((SECONDS - start)) s."
  echo
  echo "| stage | result | time |"
  echo "|---|---|---|"
  cat "$OUT_DIR/stages.md"
  echo
  echo "## cuda tests"
  echo '```'
  tail -n 15 "$OUT_DIR/cuda-tests.log"
  echo '```'
  echo
  echo "## DiT-XL/2, batch 256, bf16, trainer defaults (compile auto, micro-batch auto)"
  echo '```'
  if grep -q "^MFU" "$OUT_DIR/bench-xl2-compiled.log"; then tail -n 14 "$OUT_DIR/bench-xl2-compiled.log"
  else grep -E "micro-batch|training|WARNING|Error" "$OUT_DIR/bench-xl2-compiled.log" | tail -n 8; fi  # cut short
  echo '```'
  for s in suite-eager suite-compiled; do
    echo
    echo "## bench $s"
    if [ -f "$OUT_DIR/$s.md" ]; then cat "$OUT_DIR/$s.md"; else echo '```'; grep -E "training|WARNING|Error" "$OUT_DIR/bench-$s.log" | tail -n 30; echo '```'; fi
  done
  echo
  echo "## latent stage and end-to-end sampling"
  echo '```'
  tail -n 4 "$OUT_DIR/bench-latents-sampling.log"
  echo '```'
  echo
  echo "## smoke sweep on the GPU"
  echo '```'
  tail -n 12 "$OUT_DIR/smoke-sweep.log"
  echo '```'
} >"$SUMMARY"
echo "gpu-check: summary in $SUMMARY ($((SECONDS - start)) s)"
