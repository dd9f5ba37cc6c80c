#!/usr/bin/env bash
# The GPU check: dreamsweep's CUDA path run for real, on one H100/H200 machine without network, in under
# 8 minutes. Writes one small report (it/s, ms per step split into render / VAE / UNet / backward, peak
# GPU memory per method, and every error) to $REPORT (default: $OUT/gpu_check_report.md if $OUT is set,
# else docs/gpu_check_report.md).
#
#   bash tests/benchmarks/gpu_check.sh             # on the GPU machine, from the repository root
#   bash tests/benchmarks/gpu_check.sh --download  # beforehand, on a machine with pip access
#
# What it runs, each stage with its own time limit so that one failure still leaves a report (stage
# logs and the benchmarks' JSON go to $OUT/gpu_check_logs.tar.gz):
#   1. installs the packages the GPU image lacks from wheels in $WHEELS (default .whl/), pip --no-index;
#   2. builds nerfacc's CUDA kernels (JIT, for this GPU's architecture only);
#   3. `dreamsweep train tests/benchmarks/gpu_sd21_asd.yaml`: 200 ASD steps, sd21-shaped (SD 2.1-base's
#      architecture, random weights) at 64 px with the occupancy grid;
#   4. tests/benchmarks/bench_real_size.py: SDS / CSD / ASD / VSD at real size, fp16, step split, peak
#      memory per method;
#   5. `dreamsweep train sweeps/configs/reference_cpu.yaml device=cuda`: the reference prior on CUDA,
#      which must finish and write its turntable;
#   6. the amortized trainer on CUDA: the reference benchmark's config, then sd21-shaped at 64 px with 4
#      prompts a step, and `dreamsweep generate` from that run;
#   7. if under 5 minutes were spent: step 4 again for SDS and ASD with the opt-in torch.compile.
# GPU_CHECK_ONLY="install build_sd21_shaped ..." runs only the stages it names;
# GPU_CHECK_TRAIN_OVERRIDES="prior.compile_unet=true" adds key=value words to step 3's run.
#
# The wheels. The GPU image has PyTorch, transformers, peft, numpy, PyYAML, imageio, matplotlib, tqdm,
# rich, safetensors and huggingface_hub; it lacks diffusers, nerfacc and pydantic (and what they need).
# `--download` fetches exactly these for CPython 3.12 on x86-64 Linux into $WHEELS (about 10 MB):
WHEELS_NEEDED=(
  diffusers==0.42.1 nerfacc==0.5.3 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5 typing-extensions==4.16.0 importlib-metadata==9.1.0 zipp==4.1.2
)
# With the device tool of this workplace: `echo /.whl/ >> .git/info/exclude`, run --download here, then
# run this script with `carry: [".whl"]`. dreamsweep's CLI is run as `python -m orchestrator.cli`
# (the same `dreamsweep` entry point, without installing the package there).
set -uo pipefail
cd "$(dirname "$0")/../.."
WHEELS="${WHEELS:-.whl}"
PY="${PYTHON:-python3}"

if [[ "${1:-}" == "--download" ]]; then
  mkdir -p "$WHEELS"
  exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" "${WHEELS_NEEDED[@]}"
fi

if [[ -n "${OUT:-}" ]]; then REPORT="${REPORT:-$OUT/gpu_check_report.md}"; else REPORT="${REPORT:-docs/gpu_check_report.md}"; fi
WORK="$(mktemp -d /tmp/dreamsweep-gpu-check.XXXX)"
export DREAMSWEEP_CACHE="$WORK/cache" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
START=$SECONDS
mkdir -p "$(dirname "$REPORT")"

report() { printf '%s\n' "$@" >>"$REPORT"; }
# stage NAME LIMIT_S COMMAND...: run with a time limit, log to $WORK/NAME.log, report status and time;
# returns the command's status. The limits of stages 1-6 add up to 11 minutes (a normal run takes about
# half of that); stage 7 runs only inside them.
stage() {
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  if [[ -n "${GPU_CHECK_ONLY:-}" && " $GPU_CHECK_ONLY " != *" $name "* ]]; then
    report "- **$name**: skipped (not in GPU_CHECK_ONLY)"
    return 2
  fi
  echo "== $name (limit ${limit}s)" >&2
  timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  local took=$((SECONDS - t0))
  if [[ $rc -eq 0 ]]; then
    report "- **$name**: ok in ${took} s"
  else
    [[ $rc -eq 124 ]] && rc="timed out after ${limit} s"
    report "- **$name**: FAILED ($rc) after ${took} s; last lines of its log:" '```' \
      "$(grep -v 'it/s\]$' "$WORK/$name.log" | tail -n 15)" '```'
  fi
  tail -n 3 "$WORK/$name.log" >&2
  [[ $rc == 0 ]]
}

: >"$REPORT"
report "# GPU check" "" "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" ""
report "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 1)"
report "- $("$PY" -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}")' 2>&1 | tail -n 1)"
report "" "## Stages" ""

# 1. packages
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  stage install 30 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" "$WHEELS"/*.whl
else
  report "- **install**: FAILED: no wheels in $WHEELS (run \`bash $0 --download\` where pip can reach PyPI)"
fi
export PYTHONPATH="$WORK/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 2. nerfacc's CUDA kernels: compiled once (ninja, every core, this GPU's architecture only)
ARCH="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 9.0)"
export TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" TORCH_EXTENSIONS_DIR="$WORK/torch_extensions"
if [[ -z "${CUDA_HOME:-}" ]] && command -v nvcc >/dev/null; then
  CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  export CUDA_HOME
fi
ESTIMATOR=occgrid
if ! stage nerfacc_build 140 "$PY" -c 'import nerfacc.cuda._backend as b; assert b._C is not None, "no nerfacc CUDA build"'; then
  ESTIMATOR=uniform  # still measure the prior; the report says the grid did not run
  report "  (without nerfacc's kernels the runs below use renderer.estimator=uniform: the occupancy grid is NOT measured)"
fi
report "- tinycudann: $("$PY" -c 'import tinycudann; print("imports")' 2>/dev/null || echo 'not installed (the pure-PyTorch hash grid is used)')"

# 3. 200 ASD steps at real size with the occupancy grid (the random weights are built first, once)
stage build_sd21_shaped 80 "$PY" -c "from trainers.priors.sd21_shaped import build_sd21_shaped as b; b('$DREAMSWEEP_CACHE/sd21-shaped')"
# shellcheck disable=SC2086  # GPU_CHECK_TRAIN_OVERRIDES: more key=value words for this run
stage train_asd_sd21 150 "$PY" -m orchestrator.cli train tests/benchmarks/gpu_sd21_asd.yaml \
  renderer.estimator=$ESTIMATOR output_dir="$WORK/asd_sd21" ${GPU_CHECK_TRAIN_OVERRIDES:-}

# 4. the four methods side by side at real size
stage bench_real_size 90 "$PY" tests/benchmarks/bench_real_size.py --steps 20 --warmup 5 \
  --json "$WORK/bench.json" device=cuda renderer.estimator=$ESTIMATOR renderer.num_samples_per_ray=512 \
  prior.cache_dir="$DREAMSWEEP_CACHE"

# 5. the reference prior on CUDA: finishes and writes its turntable
stage train_reference 50 "$PY" -m orchestrator.cli train sweeps/configs/reference_cpu.yaml device=cuda \
  max_steps=50 output_dir="$WORK/reference"

# 6. the amortized trainer (one process, no Ray): on the reference benchmark, then with sd21-shaped at
#    64 px, 4 prompts a step, and one `dreamsweep generate` for an unseen prompt
stage train_amortized_reference 60 "$PY" -m orchestrator.cli train sweeps/configs/amortized_reference_cpu.yaml \
  device=cuda output_dir="$WORK/amortized_reference"
stage train_amortized_sd21 90 "$PY" -m orchestrator.cli train sweeps/configs/amortized_tiny_cpu.yaml device=cuda \
  prior.name=sd21-shaped resolution=64 batch_size=4 max_steps=100 renderer.num_samples_per_ray=64 \
  logging.log_every=25 logging.checkpoint_every=0 output_dir="$WORK/amortized_sd21" &&
  stage generate_sd21 30 "$PY" -m orchestrator.cli generate "$WORK/amortized_sd21" "a red apple on a table"

# 7. only when the stages above left time: the opt-in torch.compile of the UNet, SDS and ASD (the first
#    steps compile; each UNet batch shape compiles once, so VSD's LoRA switching is left out)
if (( SECONDS - START < 330 )); then
  stage bench_compiled 150 "$PY" tests/benchmarks/bench_real_size.py --steps 20 --warmup 5 --methods sds,asd \
    --json "$WORK/bench_compiled.json" device=cuda renderer.estimator=$ESTIMATOR \
    renderer.num_samples_per_ray=512 prior.cache_dir="$DREAMSWEEP_CACHE" prior.compile_unet=true
else
  report "- **bench_compiled**: skipped (over 330 s were spent)"
fi

report "" "## Results" ""
if [[ -f "$WORK/asd_sd21/metrics.yaml" ]]; then
  report "200 ASD steps, sd21-shaped, 64 px, renderer.estimator=$ESTIMATOR ${GPU_CHECK_TRAIN_OVERRIDES:+$GPU_CHECK_TRAIN_OVERRIDES }(metrics.yaml; it/s over the last 50 steps):" '```' \
    "$(grep -E 'it_per_s|loss_guidance|opacity' "$WORK/asd_sd21/metrics.yaml")" '```'
fi
if [[ -f "$WORK/bench.json" ]]; then
  report "bench_real_size.py --steps 20 --warmup 5 (ms per step, medians; peak GPU memory allocated per method):" '```' \
    "$(sed -n '/^prior=/,$p' "$WORK/bench_real_size.log")" '```'
fi
if [[ -f "$WORK/bench_compiled.json" ]]; then
  report "The same with prior.compile_unet=true, SDS and ASD:" '```' \
    "$(sed -n '/^prior=/,$p' "$WORK/bench_compiled.log")" '```'
fi
for run in amortized_reference amortized_sd21; do
  if [[ -f "$WORK/$run/metrics.yaml" ]]; then
    report "$run (metrics.yaml):" '```' "$(grep -E 'it_per_s|eval/' "$WORK/$run/metrics.yaml")" '```'
  fi
done
for run in asd_sd21 reference; do
  [[ -d "$WORK/$run" ]] || continue  # its stage did not run (GPU_CHECK_ONLY)
  turntable="$(ls "$WORK/$run"/turntable.* 2>/dev/null | head -n 1)"
  if [[ -n "$turntable" ]]; then
    report "- $run turntable: written ($(stat -c %s "$turntable") bytes)"
  else
    report "- $run turntable: MISSING"
  fi
done
report "" "Total: $((SECONDS - START)) s. Peak GPU memory is torch's max_memory_allocated (the caching allocator reserves more)."
# Every stage's whole log and the benchmarks' JSON come back beside the report (one file).
if [[ -n "${OUT:-}" ]]; then
  tar -czf "$OUT/gpu_check_logs.tar.gz" -C "$WORK" $(cd "$WORK" && ls *.log *.json 2>/dev/null)
fi
echo "report: $REPORT" >&2
cat "$REPORT"
