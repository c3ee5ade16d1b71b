#!/usr/bin/env bash
# One device call's worth of GPU measurements, most valuable first, within a time budget.
#
#   on the lent GPU machine, from the repository root, carrying .whl (../shared/tools/device-bundle caustics):
#       bash benchmarks/gpu_run.sh                    # OUT=<folder> receives the logs and JSON
#   a dry run on a CPU machine, every size shrunk, with the current python3 (no .whl):
#       OUT=/tmp/gpu-dry GPU_RUN_SMALL=1 bash benchmarks/gpu_run.sh
#
# Steps, each under `timeout` so that one failing or hanging costs only itself, each limit
# clipped to what is left of GPU_RUN_BUDGET_S (default 480 s), each step's elapsed time printed.
# Ordered by what the next GPU session must answer (the first one measured the forward, the
# injection and the scan before its two fixes: benchmarks/README.md, "GPU"):
#   setup    source .whl/setup.sh (Ray, astropy, caustics), skipped when GPU_RUN_SMALL=1 or absent
#   info     nvidia-smi, CPUs, memory, /dev/shm, versions; Ray's view of the GPU
#   survey   benchmarks/synthetic_survey.py: 30 tiles of 3072 px, 6,700 objects each (201,000)
#   scan     lensscan bench, model and scan stages, batch 2048, 4 actors sharing the GPU (the first
#            session's best layout), projection of 2e10 objects on 1 GPU: does it reach 50,000/s now?
#   naive    benchmarks/bench_naive.py on the GPU: the research code's loop, for ours / naive
#   cut      lensscan bench --stages cut: read + cut + normalise per core on this machine's CPU
#   scan-1   the scan with one actor per GPU, batch 2048
#   model    benchmarks/bench_model.py: the model-only sweep (--budget-s 100)
#   inject   benchmarks/bench_inject.py --device cuda, 64 and 100 px, batches 256 and 1024
# Expected on one H100 with 16 cores: setup 15 s, info 10 s, survey 10 s, scan 90 s, naive 30 s,
# cut 40 s, scan-1 60 s, model 115 s, inject 30 s: about 400 s. Give the device call 540 s.
# Everything lands in $OUT (at most 8 files come back): gpu_run.log (all output), steps.tsv,
# bench-gpu.json, naive-gpu.json, cut-gpu.json, bench-gpu-1actor.json, model-gpu.json,
# inject-gpu.json.

set -u

: "${OUT:?set OUT to the folder that receives the logs and JSON}"
mkdir -p "$OUT"
REPO=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$REPO" || exit 1
SMALL=${GPU_RUN_SMALL:-0}
BUDGET_S=${GPU_RUN_BUDGET_S:-480}
T0=$(date +%s)
STEPS="$OUT/steps.tsv"
printf 'step\trc\tseconds\tlimit_s\n' >"$STEPS"

elapsed() { echo $(( $(date +%s) - T0 )); }

# step NAME LIMIT_S MIN_S COMMAND...: runs COMMAND under `timeout`, its limit clipped to the budget
# left; skipped when less than MIN_S is left. Records rc and seconds in steps.tsv.
step() {
    local name=$1 limit=$2 min=$3; shift 3
    local left=$(( BUDGET_S - $(elapsed) ))
    (( left < limit )) && limit=$left
    if (( limit < min )); then
        echo "== $name: skipped at $(elapsed) s: ${left} s of the ${BUDGET_S} s budget left, needs ${min} s"
        printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >>"$STEPS"
        return 0
    fi
    local cmd="$*"
    echo "== $name: start at $(elapsed) s, limit ${limit} s: ${cmd:0:300}"
    local t=$(date +%s)
    timeout -k 10 "$limit" "$@"
    local rc=$?
    local secs=$(( $(date +%s) - t ))
    (( rc == 124 || rc == 137 )) && echo "== $name: TIMED OUT after ${limit} s"
    echo "== $name: rc=$rc in ${secs} s (elapsed $(elapsed) s)"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$limit" >>"$STEPS"
    # A step killed mid-scan may leave processes holding the GPU: end those, by their PID only.
    if (( rc == 124 || rc == 137 )) && command -v nvidia-smi >/dev/null; then
        local pids
        pids=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | tr -d ' ')
        if [ -n "$pids" ]; then
            echo "== $name: ending leftover GPU processes $pids"
            kill $pids 2>/dev/null; sleep 2; kill -9 $pids 2>/dev/null
        fi
    fi
    return 0
}

run_all() {
    echo "== gpu_run: $(date -u +%FT%TZ) on $(hostname), budget ${BUDGET_S} s, small=${SMALL}, OUT=$OUT"
    if [ "$SMALL" != 1 ] && [ -f .whl/setup.sh ]; then
        local t=$(date +%s)
        # shellcheck disable=SC1091
        source .whl/setup.sh || echo "== setup: FAILED: the steps that need Ray, astropy or caustics will fail"
        echo "== setup: $(( $(date +%s) - t )) s"
        printf 'setup\t-\t%s\t-\n' "$(( $(date +%s) - t ))" >>"$STEPS"
    else
        export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
        echo "== setup: skipped (small=${SMALL}, .whl/setup.sh $( [ -f .whl/setup.sh ] && echo present || echo absent )); python3 is $(command -v python3)"
    fi
    export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1 TQDM_DISABLE=1
    # Ray falls back to /tmp when /dev/shm is smaller than its object store, and refuses a
    # store over 10 GB there unless this is set.
    export RAY_OBJECT_STORE_ALLOW_SLOW_STORAGE=1
    export LENSSCAN_CACHE=/tmp/lensscan-gpu-run-cache

    local survey work
    if [ "$SMALL" = 1 ]; then
        survey=/tmp/lensscan-synth-small
        work=/tmp/lensscan-gpu-run-small
        SURVEY_ARGS=(--tiles 4 --size 512 --objects-per-tile 128 --workers 2)
        SCAN_ARGS=(--gpus-per-actor 0 --repeats 1 --batch-size 64 --stages model,scan --objects 2e10)
        NAIVE_ARGS=(--device cpu --stamps 50)
        CUT_ARGS=(--gpus-per-actor 0 --repeats 1 --stages cut)
        SCAN1_ARGS=(--gpus-per-actor 0 --repeats 1 --batch-size 128 --stages scan)
        MODEL_ARGS=(--device cpu --stamps 32 --batch-sizes 16,32 --repeats 1 --budget-s 60
                    --compile-modes default --compile-backend eager)
        INJECT_ARGS=(--device cpu --sizes 64 --batch-sizes 16 --repeats 1 --threads 2)
        LIMITS=(60 240 60 120 120 120 60)
    else
        survey=/tmp/lensscan-synth
        work=/tmp/lensscan-gpu-run
        SURVEY_ARGS=(--tiles 30 --size 3072 --objects-per-tile 6700 --workers 16)
        SCAN_ARGS=(--gpus-per-actor 0.25 --repeats 1 --batch-size 2048 --stages model,scan --objects 2e10 --gpus 1)
        NAIVE_ARGS=(--device cuda --stamps 2000)
        CUT_ARGS=(--gpus-per-actor 1 --repeats 2 --stages cut)
        SCAN1_ARGS=(--gpus-per-actor 1 --repeats 1 --batch-size 2048 --stages scan)
        MODEL_ARGS=(--budget-s 100)
        INJECT_ARGS=(--device cuda --sizes 64,100 --batch-sizes 256,1024 --repeats 3)
        LIMITS=(90 150 60 80 100 130 60)
    fi

    step info 30 5 bash -c '
        command -v nvidia-smi >/dev/null && { nvidia-smi; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv; } || echo "no nvidia-smi"
        echo "cpus: $(nproc)"; free -g | head -2; df -h /dev/shm /tmp 2>&1
        python3 - <<EOF
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available(), "gpus", torch.cuda.device_count())
for mod in ("triton", "ray", "astropy", "caustics", "pyarrow", "numpy"):
    try:
        print(mod, __import__(mod).__version__)
    except Exception as exc:
        print(mod, "MISSING:", type(exc).__name__, exc)
EOF'

    # Ray counts GPUs through NVML; if it sees none where torch sees some, tell it.
    if [ "$SMALL" != 1 ]; then
        local ray_gpus torch_gpus
        ray_gpus=$(timeout 60 python3 -c 'from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager as m; print(m.get_current_node_num_accelerators())' 2>/dev/null || echo "?")
        torch_gpus=$(timeout 60 python3 -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
        echo "== GPUs seen by Ray: $ray_gpus, by torch: $torch_gpus"
        if [ "$ray_gpus" != "$torch_gpus" ] && [ "$torch_gpus" != 0 ]; then
            export RAY_OVERRIDE_RESOURCES="{\"GPU\": $torch_gpus}"
            echo "== RAY_OVERRIDE_RESOURCES=$RAY_OVERRIDE_RESOURCES"
        fi
        local shm_kib
        shm_kib=$(df -k --output=avail /dev/shm 2>/dev/null | tail -1 | tr -d ' ')
        if [ -n "$shm_kib" ] && (( shm_kib < 16 * 1024 * 1024 )); then
            echo "== /dev/shm has ${shm_kib} KiB free: Ray's object store goes to /tmp (slower)"
        fi
    fi

    rm -rf "$work"
    if [ -f "$survey/survey.json" ]; then
        echo "== survey: reusing $survey"
    else
        rm -rf "$survey"
        step survey "${LIMITS[0]}" 5 python3 benchmarks/synthetic_survey.py --out "$survey" "${SURVEY_ARGS[@]}"
    fi
    local sample=(--tiles "$survey/tiles" --catalog "$survey/catalog.parquet" --tile-pattern '{tile}_{band}.fits')

    step scan "${LIMITS[1]}" 60 python3 -m scanner.cli bench "${sample[@]}" "${SCAN_ARGS[@]}" \
        --work-dir "$work/scan" --json "$OUT/bench-gpu.json"
    step naive "${LIMITS[2]}" 20 python3 benchmarks/bench_naive.py "${sample[@]}" "${NAIVE_ARGS[@]}" \
        --work-dir "$work/naive" --json "$OUT/naive-gpu.json"
    step cut "${LIMITS[3]}" 30 python3 -m scanner.cli bench "${sample[@]}" "${CUT_ARGS[@]}" \
        --work-dir "$work/cut" --json "$OUT/cut-gpu.json"
    step scan-1 "${LIMITS[4]}" 50 python3 -m scanner.cli bench "${sample[@]}" "${SCAN1_ARGS[@]}" \
        --work-dir "$work/scan-1" --json "$OUT/bench-gpu-1actor.json"
    step model "${LIMITS[5]}" 40 python3 benchmarks/bench_model.py "${MODEL_ARGS[@]}" --json "$OUT/model-gpu.json"
    step inject "${LIMITS[6]}" 30 python3 benchmarks/bench_inject.py "${INJECT_ARGS[@]}" --json "$OUT/inject-gpu.json"

    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,temperature.gpu,clocks.sm,power.draw,memory.used --format=csv
    rm -rf "$work"
    echo "== gpu_run: done in $(elapsed) s"
    column -t -s $'\t' "$STEPS" 2>/dev/null || cat "$STEPS"
    ls -la "$OUT"
}

run_all 2>&1 | tee "$OUT/gpu_run.log"
