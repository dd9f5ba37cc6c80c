#!/usr/bin/env bash
# The GPU check: dreamsweep's CUDA path run for real, on one H100/H200 machine without network, in under
# 8 minutes. Writes one small report (it/s, ms per step split into render / VAE / UNet / backward, peak
# GPU memory per method, and every error) to $REPORT (default: $OUT/gpu_check_report.md if $OUT is set,
# else docs/gpu_check_report.md).
#
#   bash tests/benchmarks/gpu_check.sh             # on the GPU machine, from the repository root
#   bash tests/benchmarks/gpu_check.sh --download  # beforehand, on a machine with pip access
#   bash tests/benchmarks/gpu_check.sh --stash     # on the GPU machine: keep the carried wheels/parts
#   bash tests/benchmarks/gpu_check.sh --join      # on the GPU machine: check, join, install the parts
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
# and the stages of a whole sweep on the GPU (docs/gpu_sweeps.md), in the order time should go to them:
#   throughput        tests/benchmarks/bench_pack_throughput.py: trial-steps/s of K = 1..16 packed trials
#                     (eager) beside N = 1, 2, 4 processes sharing the GPU (and MPS where it exists);
#   sweep_gpu:packed  tests/benchmarks/sweep_gpu_check.py: `dreamsweep submit`, 8 trials x 200 steps,
#                     pack: 8, kill -9 of the driver at step 110, `dreamsweep resume`; every trial
#                     COMPLETE with one MLflow run, metrics and a turntable; GPU memory at trial ends;
#   sweep_gpu:pack1   the same sweep with pack: 1 (4 Tune actors on fractional GPUs), not killed;
#   cuda_graph_tests  tests/test_cuda_graph.py on CUDA: the graphed prior call gives the eager eps;
#   throughput_graph  the packed rows again, eager beside the CUDA-graph prior call;
#   compile_cache     tests/benchmarks/compile_cache_check.py: two workers start together with the
#                     compiled prior call and one Inductor cache on local disk, then one more.
# GPU_CHECK_ONLY="install build_sd21_shaped ..." runs only the stages it names ("sweep_gpu" names both
# sweep_gpu stages); GPU_CHECK_BUDGET_S=N skips or shortens stages so the script ends within N seconds;
# GPU_CHECK_TRAIN_OVERRIDES="prior.compile_unet=true" adds key=value words to step 3's run.
#
# The wheels. The GPU image has PyTorch, transformers, peft, numpy, PyYAML, imageio, matplotlib, tqdm,
# rich, safetensors and huggingface_hub; it lacks diffusers, nerfacc and pydantic (and what they need).
# `--download` fetches exactly these for CPython 3.12 on x86-64 Linux into $WHEELS (about 10 MB):
WHEELS_NEEDED=(
  diffusers==0.42.1 nerfacc==0.5.3 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5 typing-extensions==4.16.0 importlib-metadata==9.1.0 zipp==4.1.2
)
# The sweep stages also need Ray, Optuna and MLflow and what they need that the image lacks (about 108
# MiB with Ray's 76 MiB wheel: more than one call of the device tool carries, 64 MiB with the working
# tree). `--download` puts them into one tar of wheels split into parts of $PART_MIB (37) MiB,
# .whl-sweep/1/ .. .whl-sweep/3/, each with a MANIFEST (sha256 of the whole tar and of every part).
# Each part travels in its own call; `--stash` copies what a call carried to $PERSIST, which outlives
# the call on a warm machine; the install stage (or `--join`) checks that every part is there and the
# whole tar's sha256, joins, untars and installs. docs/gpu_sweeps.md has the sequence of calls.
WHEELS_SWEEP=(
  ray==2.60.0 optuna==5.1.0 cmaes==0.13.1 colorlog==6.12.0 alembic==1.20.1 mako==1.4.3 sqlalchemy==2.1.9
  mlflow==3.17.2 mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 flask==3.1.3 flask-cors==6.0.5
  blinker==1.9.0 itsdangerous==2.2.0 graphene==3.4.3 graphql-core==3.2.14 graphql-relay==3.2.0
  gunicorn==26.2.0 huey==3.5.4 docker==7.2.0 databricks-sdk==0.167.0 google-auth==2.63.1 pyasn1==0.6.5
  pyasn1-modules==0.4.2 cachetools==7.3.3 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 gitpython==3.2.1 gitdb==4.0.12 smmap==5.0.3
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
  opentelemetry-semantic-conventions==0.66b2 prettytable==3.19.0 wcwidth==0.9.5 python-dotenv==1.2.4
  skops==0.16.0 sqlparse==0.6.1 truststore==0.10.5 httpx2==2.17.0 httpcore2==2.17.0 jsonschema==4.26.0
  jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 tensorboardx==2.6.5
)
# With the device tool of this workplace: `printf '/.whl/\n/.whl-sweep/\n' >> .git/info/exclude`, run
# --download here, then follow docs/gpu_sweeps.md (`.whl` and one `.whl-sweep/N` per call in `carry`).
# dreamsweep's CLI is run as `python -m orchestrator.cli` (the same `dreamsweep` entry point, without
# installing the package there).
set -uo pipefail
cd "$(dirname "$0")/../.."
WHEELS="${WHEELS:-.whl}"
PY="${PYTHON:-python3}"

SWEEP_PARTS="${SWEEP_PARTS:-.whl-sweep}"
PART_MIB="${PART_MIB:-37}"
# What a call carried and `--stash` kept, the packages installed, nerfacc's build and the sd21-shaped
# weights: on the machine's disk, so the next call on the same warm machine finds them.
PERSIST="${GPU_CHECK_PERSIST:-/tmp/dreamsweep-gpu-check}"
SITE="$PERSIST/site"

download() {
  local platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  local pip=("$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}")
  mkdir -p "$WHEELS" && "${pip[@]}" -d "$WHEELS" "${WHEELS_NEEDED[@]}" || return
  local tmp
  tmp="$(mktemp -d)" && "${pip[@]}" -d "$tmp/wheels" "${WHEELS_SWEEP[@]}" || return
  (cd "$tmp/wheels" && tar -cf ../sweep-wheels.tar ./*.whl) || return
  (cd "$tmp" && split -b "${PART_MIB}M" -d -a 1 --numeric-suffixes=1 sweep-wheels.tar sweep-wheels.tar.part-) || return
  rm -rf "$SWEEP_PARTS" && local count
  count=$(ls "$tmp"/sweep-wheels.tar.part-* | wc -l)
  for part in "$tmp"/sweep-wheels.tar.part-*; do
    local n=${part##*-}
    mkdir -p "$SWEEP_PARTS/$n" && mv "$part" "$SWEEP_PARTS/$n/"
  done
  {
    echo "parts $count"
    echo "whole $(sha256sum "$tmp/sweep-wheels.tar" | cut -d' ' -f1) sweep-wheels.tar $(stat -c %s "$tmp/sweep-wheels.tar")"
    for n in $(seq 1 "$count"); do
      echo "part $n $(sha256sum "$SWEEP_PARTS/$n/sweep-wheels.tar.part-$n" | cut -d' ' -f1)"
    done
    (cd "$tmp/wheels" && ls ./*.whl | sed 's|^./|wheel |')
  } >"$tmp/MANIFEST"
  for n in $(seq 1 "$count"); do cp "$tmp/MANIFEST" "$SWEEP_PARTS/$n/"; done
  rm -rf "$tmp"
  du -sh "$WHEELS" "$SWEEP_PARTS"/* >&2
}

# stash: keep what this call carried (.whl, any .whl-sweep/N) under $PERSIST/carry for later calls.
stash() {
  mkdir -p "$PERSIST/carry"
  compgen -G "$WHEELS/*.whl" >/dev/null && cp "$WHEELS"/*.whl "$PERSIST/carry/"
  for folder in "$SWEEP_PARTS"/*/; do
    [[ -d "$folder" ]] && cp "$folder"/* "$PERSIST/carry/"
  done
  parts_status
  return 0
}

# parts_status: which parts of the sweep wheels are here (the repository's .whl-sweep/N or the stash).
# Returns 0 when every part is here with its sha256.
PARTS_MISSING=""
parts_status() {
  local manifest
  manifest="$(ls "$SWEEP_PARTS"/*/MANIFEST "$PERSIST/carry/MANIFEST" 2>/dev/null | head -n 1)"
  if [[ -z "$manifest" ]]; then
    PARTS_MISSING="all (no MANIFEST: no part was carried or stashed)"
    echo "sweep wheels: $PARTS_MISSING" >&2
    return 1
  fi
  PARTS_MISSING=""
  local count n sum file
  count=$(awk '$1 == "parts" {print $2}' "$manifest")
  for n in $(seq 1 "$count"); do
    sum=$(awk -v n="$n" '$1 == "part" && $2 == n {print $3}' "$manifest")
    file="$(ls "$SWEEP_PARTS/$n/sweep-wheels.tar.part-$n" "$PERSIST/carry/sweep-wheels.tar.part-$n" 2>/dev/null | head -n 1)"
    if [[ -z "$file" ]]; then
      PARTS_MISSING+="$n "
    elif [[ "$(sha256sum "$file" | cut -d' ' -f1)" != "$sum" ]]; then
      PARTS_MISSING+="$n(sha256) "
    fi
  done
  echo "sweep wheels: $count parts, missing: ${PARTS_MISSING:-none}" >&2
  [[ -z "$PARTS_MISSING" ]]
}

# join_parts: every part here -> the tar (its sha256 checked) -> wheels in $PERSIST/sweep-wheels.
join_parts() {
  parts_status || return 3
  local manifest count whole tar="$PERSIST/sweep-wheels.tar"
  manifest="$(ls "$SWEEP_PARTS"/*/MANIFEST "$PERSIST/carry/MANIFEST" 2>/dev/null | head -n 1)"
  count=$(awk '$1 == "parts" {print $2}' "$manifest")
  whole=$(awk '$1 == "whole" {print $2}' "$manifest")
  : >"$tar"
  for n in $(seq 1 "$count"); do
    cat "$(ls "$SWEEP_PARTS/$n/sweep-wheels.tar.part-$n" "$PERSIST/carry/sweep-wheels.tar.part-$n" 2>/dev/null | head -n 1)" >>"$tar"
  done
  if [[ "$(sha256sum "$tar" | cut -d' ' -f1)" != "$whole" ]]; then
    echo "sweep wheels: the joined tar's sha256 is not the MANIFEST's" >&2
    return 4
  fi
  rm -rf "$PERSIST/sweep-wheels" && mkdir -p "$PERSIST/sweep-wheels" && tar -xf "$tar" -C "$PERSIST/sweep-wheels" && rm -f "$tar"
  echo "sweep wheels: joined, sha256 ok, $(ls "$PERSIST/sweep-wheels" | wc -l) wheels" >&2
}

# install_wheels: the training wheels (carried or stashed) and, when joined, the sweep wheels.
install_wheels() {
  local wheels=()
  if compgen -G "$WHEELS/*.whl" >/dev/null; then wheels+=("$WHEELS"/*.whl)
  elif compgen -G "$PERSIST/carry/*.whl" >/dev/null; then wheels+=("$PERSIST"/carry/*.whl)
  fi
  compgen -G "$PERSIST/sweep-wheels/*.whl" >/dev/null && wheels+=("$PERSIST"/sweep-wheels/*.whl)
  if [[ ${#wheels[@]} -eq 0 ]]; then
    echo "no wheels in $WHEELS or $PERSIST/carry (run \`bash $0 --download\` where pip can reach PyPI)" >&2
    return 1
  fi
  rm -rf "$SITE" && mkdir -p "$SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
}

case "${1:-}" in
  --download) download; exit ;;
  --stash) stash; exit ;;
  --join) join_parts && install_wheels && echo "installed into $SITE" >&2; exit ;;
esac

if [[ -n "${OUT:-}" ]]; then REPORT="${REPORT:-$OUT/gpu_check_report.md}"; else REPORT="${REPORT:-docs/gpu_check_report.md}"; fi
WORK="$(mktemp -d /tmp/dreamsweep-gpu-check-run.XXXX)"
export DREAMSWEEP_CACHE="$PERSIST/cache" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
START=$SECONDS
mkdir -p "$(dirname "$REPORT")"

report() { printf '%s\n' "$@" >>"$REPORT"; }
# stage NAME LIMIT_S COMMAND...: run with a time limit, log to $WORK/NAME.log, report status and time;
# returns the command's status. The limits of stages 1-6 add up to 11 minutes (a normal run takes about
# half of that); stage 7 runs only inside them.
stage() {
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  if [[ -n "${GPU_CHECK_ONLY:-}" && " $GPU_CHECK_ONLY " != *" $name "* && " $GPU_CHECK_ONLY " != *" ${name%%:*} "* ]]; then
    report "- **$name**: skipped (not in GPU_CHECK_ONLY)"
    return 2
  fi
  if [[ " ${NO_CUDA_SKIP:-} " == *" $name "* ]]; then
    report "- **$name**: skipped: no CUDA here"
    return 2
  fi
  if [[ -n "${GPU_CHECK_BUDGET_S:-}" ]]; then  # end within the budget: shorten the stage, or skip it
    local left=$((GPU_CHECK_BUDGET_S - (SECONDS - START) - 15))
    if ((left < 30)); then
      report "- **$name**: skipped (GPU_CHECK_BUDGET_S=$GPU_CHECK_BUDGET_S spent)"
      return 2
    fi
    ((left < limit)) && limit=$left
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
CUDA="$("$PY" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null)"
report "" "## Stages" ""

# 1. packages: the training wheels, and the sweep wheels when all their parts are here
SWEEP_WHEELS=ok
if ! join_parts 2>"$WORK/join.log"; then
  SWEEP_WHEELS="not installed: parts missing: ${PARTS_MISSING:-see join.log}"
fi
export WHEELS PERSIST SITE PY
export -f install_wheels
stage install 60 bash -c install_wheels
report "  (Ray, Optuna, MLflow: $SWEEP_WHEELS)"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 2. nerfacc's CUDA kernels: compiled once (ninja, every core, this GPU's architecture only)
ARCH="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 9.0)"
export TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" TORCH_EXTENSIONS_DIR="$PERSIST/torch_extensions"
if [[ -z "${CUDA_HOME:-}" ]] && command -v nvcc >/dev/null; then
  CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  export CUDA_HOME
fi
ESTIMATOR=occgrid
# nerfacc's JIT build needs a GPU (and would run nvcc for minutes on a CPU machine that has it)
[[ "$CUDA" != True ]] && NO_CUDA_SKIP="nerfacc_build"
# (through the project's own entry point: one build per node, the other workers wait for it)
if ! stage nerfacc_build 140 "$PY" -c 'from trainers.nerfacc_cuda import ensure_nerfacc_cuda as e; assert e() is not None, "no nerfacc CUDA build"'; then
  ESTIMATOR=uniform  # still measure the prior; the report says the grid did not run
  report "  (without nerfacc's kernels the runs below use renderer.estimator=uniform: the occupancy grid is NOT measured)"
fi
report "- tinycudann: $("$PY" -c 'import tinycudann; print("imports")' 2>/dev/null || echo 'not installed (the pure-PyTorch hash grid is used)')"

# 3. 200 ASD steps at real size with the occupancy grid (the random weights are built first, once)
stage build_sd21_shaped 80 "$PY" -c "from trainers.priors.sd21_shaped import build_sd21_shaped as b; b('$DREAMSWEEP_CACHE/sd21-shaped')"

# The sweep stages, in the order time should go to them (docs/gpu_sweeps.md). Each writes its table
# into the report as soon as it ends, so a call cut short still brings back what ran.
# result FILE TITLE: the lines of FILE from its table's first line (a line starting with FROM) on.
result() {
  local file=$1 from=$2 title=$3
  [[ -f "$file" ]] && report "" "$title" '```' "$(sed -n "/^$from/,\$p" "$file")" '```' ""
}
SD21=(device=cuda "renderer.estimator=$ESTIMATOR" prior.cache_dir="$DREAMSWEEP_CACHE")
KS=1,2,4,8,16 PROCS=1,2,4 STEPS=(--steps 10 --warmup 3 --split-steps 3)
SWEEP_SIZE=(--trials 8 --steps 200 --checkpoint-every 100 --timeout 400) PACKED=(--pack 8 --kill-at-step 110)
if [[ "$CUDA" != True ]]; then
  # A rehearsal on a machine without CUDA: the same stages and code paths at toy sizes on the CPU
  # (tiny-sd, 32 px); the CUDA-only stages skip themselves. The numbers mean nothing.
  report "- rehearsal: no CUDA here, so the sweep stages run at toy sizes on the CPU (tiny-sd, 32 px)"
  SD21=(device=cpu prior.name=tiny-sd resolution=32 renderer.estimator=uniform renderer.num_samples_per_ray=16
    prior.cache_dir="$DREAMSWEEP_CACHE")
  KS=1,2 PROCS=1,2 STEPS=(--steps 2 --warmup 1 --split-steps 1)
  SWEEP_SIZE=(--cpu --trials 3 --steps 12 --checkpoint-every 4 --timeout 600 --per-gpu 2)
  PACKED=(--pack 2 --kill-at-step 6)
fi
stage throughput 330 "$PY" tests/benchmarks/bench_pack_throughput.py --ks $KS --modes eager \
  --procs $PROCS "${STEPS[@]}" --json "$WORK/throughput.json" "${SD21[@]}"
result "$WORK/throughput.log" prior= "Packed trials against processes, eager (bench_pack_throughput.py):"

if "$PY" -c 'import ray, optuna, mlflow' 2>/dev/null; then
  SWEEP=("$PY" tests/benchmarks/sweep_gpu_check.py --workspace "$WORK/sweeps" "${SWEEP_SIZE[@]}")
  [[ "$CUDA" == True ]] && SWEEP+=("renderer.estimator=$ESTIMATOR" prior.cache_dir="$DREAMSWEEP_CACHE")
  stage sweep_gpu:packed 420 "${SWEEP[@]}" "${PACKED[@]}" --report "$WORK/sweeps.md"
  stage sweep_gpu:pack1 420 "${SWEEP[@]}" --pack 1 --report "$WORK/sweeps.md"
  [[ -f "$WORK/sweeps.md" ]] && report "" "$(cat "$WORK/sweeps.md")"
elif [[ -z "${GPU_CHECK_ONLY:-}" || " $GPU_CHECK_ONLY " == *" sweep_gpu"* ]]; then
  report "- **sweep_gpu**: skipped: Ray, Optuna or MLflow does not import ($SWEEP_WHEELS)"
fi

stage cuda_graph_tests 120 "$PY" -m pytest -x -q -p no:cacheprovider tests/test_cuda_graph.py
stage throughput_graph 240 "$PY" tests/benchmarks/bench_pack_throughput.py --ks $KS \
  --modes eager,cuda_graph --procs '' "${STEPS[@]}" --json "$WORK/throughput_graph.json" "${SD21[@]}"
result "$WORK/throughput_graph.log" prior= "Packed trials, eager beside the CUDA-graph prior call:"
rm -rf "$PERSIST/inductor"  # a cold cache: the first workers compile, the later one should not
stage compile_cache 300 "$PY" tests/benchmarks/compile_cache_check.py --cache-dir "$PERSIST/inductor" \
  --together 2 --after 1 --rows 24 --json "$WORK/compile_cache.json" "${SD21[@]}"
result "$WORK/compile_cache.log" "Inductor cache" "Workers starting with the compiled prior call (compile_cache_check.py):"

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
  tar -czf "$OUT/gpu_check_logs.tar.gz" -C "$WORK" $(cd "$WORK" && ls *.log *.json *.md sweeps/*.log sweeps/*.json 2>/dev/null)
fi
echo "report: $REPORT" >&2
cat "$REPORT"
