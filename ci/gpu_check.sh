#!/usr/bin/env bash
# The device check of the GPU backends, on a CUDA machine, results written under $OUT (default gpu-results/)
# as they come, a short summary last. The timings first, on an otherwise idle machine: the hybrid demo model
# end to end (e2e.json), the host case and the GPU benchmarks (bench/{attention,recurrent}.json, their
# tables in bench.txt); then, side by side, the CUDA-graph and torch.compile tests of tests/gpu (gpu-tests.txt)
# and the conformance `full` tier of the triton backend in CHECK_JOBS (default 6) processes of a share of the
# ops each (check.json merged from theirs, check.txt). machine.txt names the card. It stops itself after
# GPU_CHECK_SECONDS (default 300, so that a machine start and a rerun fit in a 15-minute device lease);
# E2E_SECONDS (default 150) and BENCH_SECONDS (default 150) bound the timings; each check process keeps its
# JSON current, so a stopped check leaves what it found (compiling every kernel variant of the full tier
# takes minutes on a fresh machine). GPU_CHECK_OPS (space-separated op names) limits the check to those ops;
# GPU_CHECK_PARTS (space-separated: e2e bench tests check) runs only those parts. Wheels in .whl/
# (flash-linear-attention, the recurrent peers; the machine may have no internet) are installed first.
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
parts=" ${GPU_CHECK_PARTS:-e2e bench tests check} "
left() { local s=$((deadline - SECONDS - ${1:-0})); echo $((s > 1 ? s : 1)); }
upto() { local s; s=$(left); echo $((s < $1 ? s : $1)); }  # upto N: N seconds, or what is left if less
bench() {  # bench NAME SECONDS CASES...: one run of at most SECONDS, kept as bench/NAME.json, its table in bench.txt
  local name=$1 secs=$2 rc; shift 2
  timeout "$(upto "$secs")" "$python" -m portable_attn.cli bench --device cuda --backend triton --case "$@" --no-memory \
    --out "$out/bench-$name" >> "$out/bench.txt" 2>&1
  rc=$?
  mkdir -p "$out/bench"
  [[ -f "$out/bench-$name/bench.json" ]] && mv "$out/bench-$name/bench.json" "$out/bench/$name.json"
  [[ -f "$out/bench-$name/bench.md" ]] && cat "$out/bench-$name/bench.md" >> "$out/bench.txt"
  rm -rf "$out/bench-$name"  # plots: the returned files are few
  return $rc
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$python" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} | tee "$out/machine.txt"

e2e_rc=- recurrent_rc=- attention_rc=- tests_rc=- check_rc=-
if [[ $parts == *" e2e "* ]]; then
  timeout "$(upto "${E2E_SECONDS:-150}")" "$python" -m portable_attn.bench.e2e --device cuda > "$out/e2e.json" 2>> "$out/bench.txt"
  e2e_rc=$?
fi
if [[ $parts == *" bench "* ]]; then
  bench_s="${BENCH_SECONDS:-150}"
  bench attention $((bench_s * 2 / 5)) host gpu_causal gpu_swa gpu_decode_b64
  attention_rc=$?
  bench recurrent $((bench_s * 3 / 5)) gpu_ssd gpu_gdr gpu_gla gpu_ssd_step gpu_gdr_step gpu_gla_step gpu_conv_step
  recurrent_rc=$?
fi
if [[ $parts == *" tests "* ]]; then
  timeout "$(left)" "$python" -m pytest -q -p no:cacheprovider tests/gpu > "$out/gpu-tests.txt" 2>&1 &
  tests_pid=$!
fi
if [[ $parts == *" check "* ]]; then
  # units of work (an op, attention one dtype at a time) dealt to CHECK_JOBS processes, largest first
  units=$("$python" - "${CHECK_JOBS:-6}" ${GPU_CHECK_OPS:-} <<'EOF'
import sys
from portable_attn import optable
from portable_attn.conformance import cases
ops = sys.argv[2:] or optable.NAMES
units = [(len(cases.catalogue("full", [op])) * (1 if op == "attention" else 3), op, dtype)
         for op in ops for dtype in (("float32", "float16", "bfloat16") if op == "attention" else ("",))]
load = [0] * int(sys.argv[1])
for weight, op, dtype in sorted(units, reverse=True):
    job = load.index(min(load))
    load[job] += weight
    print(job, op, dtype)
EOF
)
  pids=()
  for job in $(cut -d' ' -f1 <<< "$units" | sort -u); do
    (rc=0
    while read -r j op dtype; do
      [[ $j == "$job" ]] || continue
      timeout "$(left)" "$python" -m portable_attn.cli check --backend triton --tier full --device cuda --op "$op" \
        ${dtype:+--dtype "$dtype"} --quiet --json "$out/check-$job-$op$dtype.json" >> "$out/check-$job.txt" 2>&1 || rc=$?
    done <<< "$units"; exit $rc) &
    pids+=($!)
  done
  check_rc=0
  [[ -n $units ]] || { echo "no check was started: the ops could not be listed" >> "$out/check.txt"; check_rc=2; }
  for pid in "${pids[@]}"; do wait "$pid" || check_rc=$?; done
  shopt -s nullglob
  "$python" - "$out"/check-[0-9]*.json > "$out/check.json" <<'EOF'
import json, sys  # one JSON of the processes' results (a process stopped before its first case wrote none)
parts = [json.load(open(path)) for path in sys.argv[1:]]
print(json.dumps({"meta": parts[0]["meta"] if parts else {}, "results": [r for p in parts for r in p["results"]]}, indent=1))
EOF
  cat "$out"/check-[0-9]*.txt >> "$out/check.txt"
  rm -f "$out"/check-[0-9]*.json "$out"/check-[0-9]*.txt
fi
[[ -n ${tests_pid:-} ]] && { wait "$tests_pid"; tests_rc=$?; }

for f in check.txt gpu-tests.txt; do [[ -f "$out/$f" ]] && tail -n 3 "$out/$f"; done
[[ -f "$out/e2e.json" ]] && cat "$out/e2e.json"
[[ -f "$out/bench.txt" ]] && grep -v '^ *$' "$out/bench.txt" | tail -n 40
echo "exits: e2e $e2e_rc, bench $attention_rc $recurrent_rc, tests $tests_rc, check $check_rc (-: not run; 124: stopped" \
  "at the ${budget} s budget); results in $out"
for rc in $e2e_rc $attention_rc $recurrent_rc $tests_rc $check_rc; do [[ $rc == - || $rc == 0 ]] || exit 1; done
