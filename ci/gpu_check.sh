#!/usr/bin/env bash
# The device check of the GPU backends, on a CUDA machine: the conformance `full` tier, then the GPU
# benchmarks, results written under $OUT (default gpu-results/) as they come, a short table last.
# It stops itself after GPU_CHECK_SECONDS (default 300) so that a machine start and a rerun fit.
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
"$python" -c 'import portable_attn' 2>/dev/null || "$python" -m pip install -q --no-build-isolation --no-deps -e .
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # jax may be installed: never let it take the GPU's memory
deadline=$((SECONDS + budget))
left() { local s=$((deadline - SECONDS)); echo $((s > 1 ? s : 1)); }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$python" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} | tee "$out/machine.txt"

timeout "$(left)" "$python" -m portable_attn.cli check --backend triton --tier full --device cuda --quiet \
  --json "$out/check.json" --junit "$out/check.xml" --markdown "$out/check.md" > "$out/check.txt" 2>&1
check_rc=$?
timeout "$(left)" "$python" -m portable_attn.cli bench --device cuda --backend triton \
  --case gpu_causal gpu_swa gpu_decode_b64 --no-memory --out "$out/bench" > "$out/bench.txt" 2>&1
bench_rc=$?

tail -n 3 "$out/check.txt"
[[ -f "$out/bench/bench.md" ]] && cat "$out/bench/bench.md" || tail -n 20 "$out/bench.txt"
echo "check exit $check_rc, bench exit $bench_rc (124: stopped at the ${budget} s budget); results in $out"
((check_rc == 0 && bench_rc == 0))
