#!/usr/bin/env bash
# The device check of the GPU backends, on a CUDA machine: the conformance `full` tier, then the GPU
# benchmarks (the recurrent ops, then attention), results written under $OUT (default gpu-results/) as
# they come, a short table last: machine.txt, check.{json,txt}, bench.txt, bench/{attention,recurrent}.{json,md}.
# It stops itself after GPU_CHECK_SECONDS (default 300, so that a machine start and a rerun fit in a
# 15-minute device lease; 480 runs everything on an H100) and the benchmarks keep up to BENCH_SECONDS
# (default 150) of it; check.json is kept current, so a stopped check leaves what it found (compiling
# every kernel variant of the full tier takes minutes on a fresh machine). GPU_CHECK_OPS (space-separated op
# names) limits the check to those ops. Wheels in .whl/ (flash-linear-attention, the
# recurrent peers; the machine may have no internet) are installed first when present.
#
#   OUT=/some/dir bash ci/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
budget="${GPU_CHECK_SECONDS:-300}"
python="${PYTHON:-python}"
mkdir -p "$out"

if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "ci/gpu_check.sh needs a CUDA GPU: torch.cuda.is_available() is False here, so nothing was run." >&2
  exit 2
fi
"$python" -c 'import portable_attn.backends.triton' 2>/dev/null || "$python" -m pip install -q --no-build-isolation --no-deps -e .
if compgen -G ".whl/*.whl" > /dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # jax may be installed: never let it take the GPU's memory
deadline=$((SECONDS + budget))
reserve="${BENCH_SECONDS:-150}"
((reserve > budget / 2)) && reserve=$((budget / 2))
left() { local s=$((deadline - SECONDS - ${1:-0})); echo $((s > 1 ? s : 1)); }
bench() {  # bench NAME KEEP CASES...: one run that leaves KEEP s for what follows, kept as bench/NAME.{json,md}
  local name=$1 keep=$2 rc; shift 2
  timeout "$(left "$keep")" "$python" -m portable_attn.cli bench --device cuda --backend triton --case "$@" --no-memory \
    --out "$out/bench-$name" >> "$out/bench.txt" 2>&1
  rc=$?
  mkdir -p "$out/bench"
  for ext in json md; do
    [[ -f "$out/bench-$name/bench.$ext" ]] && mv "$out/bench-$name/bench.$ext" "$out/bench/$name.$ext"
  done
  rm -rf "$out/bench-$name"  # plots: the returned files are few
  return $rc
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$python" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} | tee "$out/machine.txt"

ops=()
for op in ${GPU_CHECK_OPS:-}; do ops+=(--op "$op"); done
timeout "$(left "$reserve")" "$python" -m portable_attn.cli check --backend triton --tier full --device cuda \
  "${ops[@]}" --quiet --json "$out/check.json" > "$out/check.txt" 2>&1
check_rc=$?
bench recurrent $((reserve * 2 / 5)) gpu_ssd gpu_gdr gpu_gla gpu_ssd_step gpu_gdr_step gpu_gla_step gpu_conv_step
recurrent_rc=$?
bench attention 0 gpu_causal gpu_swa gpu_decode_b64
attention_rc=$?

tail -n 3 "$out/check.txt"
for name in recurrent attention; do
  [[ -f "$out/bench/$name.md" ]] && cat "$out/bench/$name.md"
done
[[ -f "$out/bench/recurrent.md" ]] || tail -n 20 "$out/bench.txt"
echo "check exit $check_rc (its limit: $((budget - reserve)) s), bench exits $recurrent_rc $attention_rc (124: stopped at" \
  "the ${budget} s budget); results in $out"
((check_rc == 0 && attention_rc == 0 && recurrent_rc == 0))
