#!/usr/bin/env bash
# The one script that runs `python -m benchmarks.accelerator` on a lent GPU machine.
#
# That machine (an H200 image with python3 3.12, jax[cuda], torch, optax, chex, numpy, tifffile,
# pillow, tqdm) reaches no package registry and lacks one thing the benchmarks import beyond
# those: imagecodecs (LZW/deflate GeoTIFFs of the raster section; the benchmarks need no Hydra,
# their tables come from epilsr.cli.tables). epilsr itself runs from src/ (PYTHONPATH), so
# nothing is built there.
#
# 1. Here, once, in the repository root (downloads that wheel for CPython 3.12 x86-64 into
#    .whl/ and keeps the folder out of git):
#        bash benchmarks/device_run.sh --prepare
# 2. On the GPU machine, the working tree copied there with .whl carried (run from the root):
#        EPILSR_COMMIT=<git rev-parse HEAD> bash benchmarks/device_run.sh
#    It installs the wheels into /tmp/site if any are there, checks the imports and the GPU,
#    runs the benchmark with --append-results under a timeout, and leaves in $OUT (default
#    benchmarks/results/device/): accelerator.log, accelerator.json, accelerator.md (the
#    appended section alone: append it to benchmarks/RESULTS.md here) and RESULTS.md.
#
# Time: ACCEL_BUDGET_S (default 400 s) is the benchmark's own budget (sections that no longer
# fit are skipped with a printed reason); ACCEL_TIMEOUT_S (default 450 s) kills it regardless.
# Give the machine's command a limit of ~480 s: with a minute or two to start the machine that
# leaves room for a rerun (ACCEL_BUDGET_S=150 ACCEL_ARGS="--sections lsr,raster") within a
# 15-minute lease. ACCEL_ARGS adds arguments (e.g. "--rounds 3").
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

if [[ "${1:-}" == "--prepare" ]]; then
  dest=${2:-.whl}
  mkdir -p "$dest" || exit 1
  if [[ "$dest" != /* ]] && exclude=$(git rev-parse --git-path info/exclude 2>/dev/null); then
    grep -qx "/$dest/" "$exclude" 2>/dev/null || echo "/$dest/" >>"$exclude"
  fi
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dest" \
    "imagecodecs==2025.3.30" || exit 1
  ls -l "$dest"
  exit 0
fi

OUT=${OUT:-benchmarks/results/device}
mkdir -p "$OUT" || exit 1
site=
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  site=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1  # jax and torch share the GPU
export EPILSR_COMMIT=${EPILSR_COMMIT:-}
# Compiled programs persist across the sections' processes and a rerun on the same machine.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$OUT/accelerator.log"
python3 - <<'EOF' 2>&1 | tee -a "$OUT/accelerator.log"
import importlib, sys
missing = []
for name in ("jax", "optax", "chex", "numpy", "tifffile", "imagecodecs", "torch",
             "epilsr"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')}")
    except ImportError as e:
        missing.append(f"{name} ({e})")
if missing:
    sys.exit("missing: " + ", ".join(missing) + " -- run `bash benchmarks/device_run.sh "
             "--prepare` where pip works and carry .whl")
import jax
print("jax devices:", jax.devices())
EOF
[[ ${PIPESTATUS[0]} -eq 0 ]] || exit 1

# shellcheck disable=SC2086  # ACCEL_ARGS is a list of arguments
timeout -k 10 "${ACCEL_TIMEOUT_S:-450}" python3 -m benchmarks.accelerator --append-results \
  --budget-s "${ACCEL_BUDGET_S:-400}" --out "$OUT/accelerator.json" ${ACCEL_ARGS:-} 2>&1 |
  tee -a "$OUT/accelerator.log"
rc=${PIPESTATUS[0]}
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
echo "exit $rc; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$rc"
