#!/usr/bin/env bash
# Every check that needs a real NVIDIA GPU, in one run of under 8 minutes, ending in one table.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, on a machine with a GPU
#
# 1. every `cuda`-marked test (pytest -m cuda);
# 2. bench_train.py --device cuda: five models at batch 1/8/32, fp32 and bf16 autocast, AdamW
#    and SGD, the estimate against torch.cuda.max_memory_allocated (largest and median error);
# 3. gpu-info on real NVML: the table, --json health fields, --format prometheus (parsed by
#    prometheus_client), and --ray on a one-node local cluster where Ray is installed;
# 4. nms --device cuda against the CPU on the shipped examples (same records, byte for byte).
#
# ptools runs from this tree (PYTHONPATH); packages the machine lacks can be carried as wheels
# in .whl/ (installed into /tmp/site first), e.g. orjson, pycocotools, torchsummary, typer.
# A part whose packages are missing says so in its row instead of failing the others.
# Writes its logs to ${OUT:-/tmp/gpu_check}/ and the table to stdout (and table.txt there).
set -u
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
rows=()
row() { rows+=("$(printf '| %-34s | %-7s | %6ss | %s |' "$1" "$2" "$3" "$4")"); }
timed() { local start=$SECONDS; "$@"; local code=$?; elapsed=$((SECONDS - start)); return $code; }

# 1. cuda-marked tests
if timed timeout 120 python3 -m pytest -m cuda -q -p no:cacheprovider -o addopts="" tests >"$out/cuda_tests.log" 2>&1; then
    row "pytest -m cuda" "pass" "$elapsed" "$(tail -n 1 "$out/cuda_tests.log")"
else
    row "pytest -m cuda" "FAIL" "$elapsed" "$(tail -n 1 "$out/cuda_tests.log") (see cuda_tests.log)"
fi

# 2. training-step estimate against max_memory_allocated
if timed timeout 300 python3 benchmarks/bench_train.py --device cuda --runs 1 --batches 1,8,32 \
        --optimizers adamw,sgd --amp none,bf16 --no-torchinfo >"$out/bench_train.log" 2>&1; then
    row "summary --train vs max_allocated" "ran" "$elapsed" "$(grep -E 'points; largest' "$out/bench_train.log")"
else
    row "summary --train vs max_allocated" "FAIL" "$elapsed" "$(tail -n 1 "$out/bench_train.log")"
fi

# 3. gpu-info on real NVML
if timed timeout 60 python3 -m ptools gpu-info --json >"$out/gpu_info.json" 2>"$out/gpu_info.err"; then
    summary=$(python3 -c "
import json, sys
data = json.load(open(sys.argv[1]))
gpus = [d for d in data['devices'] if d.get('kind', 'gpu') == 'gpu']
health = [d.get('health') for d in gpus]
print(f\"{len(gpus)} GPU(s): {', '.join(d['name'] for d in gpus)}; health fields: {sorted(health[0]) if health and health[0] else 'none'}\")
" "$out/gpu_info.json" 2>&1)
    row "gpu-info --json (real NVML)" "pass" "$elapsed" "$summary"
else
    row "gpu-info --json (real NVML)" "FAIL" "$elapsed" "$(tail -n 1 "$out/gpu_info.err")"
fi
if timed timeout 60 python3 -m ptools gpu-info --format prometheus >"$out/gpu_info.prom" 2>&1 && python3 -c "
import sys
from prometheus_client.parser import text_string_to_metric_families
families = list(text_string_to_metric_families(open(sys.argv[1]).read()))
print(len(families))" "$out/gpu_info.prom" >"$out/prom_count" 2>&1; then
    row "gpu-info --format prometheus" "pass" "$elapsed" "$(cat "$out/prom_count") metric families parsed"
else
    row "gpu-info --format prometheus" "FAIL" "$elapsed" "$(tail -n 1 "$out/gpu_info.prom")"
fi
if python3 -c "import ray" 2>/dev/null; then
    ray start --head --num-cpus 2 --disable-usage-stats >"$out/ray_start.log" 2>&1
    if timed timeout 120 python3 -m ptools gpu-info --ray --json >"$out/gpu_info_ray.json" 2>"$out/gpu_info_ray.err"; then
        row "gpu-info --ray (one-node cluster)" "pass" "$elapsed" "$(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(len(d.get('nodes', [])), 'node(s)')" "$out/gpu_info_ray.json")"
    else
        row "gpu-info --ray (one-node cluster)" "FAIL" "$elapsed" "$(tail -n 1 "$out/gpu_info_ray.err")"
    fi
    ray stop --force >/dev/null 2>&1
else
    row "gpu-info --ray (one-node cluster)" "skipped" "0" "Ray is not installed here (pip install '.[ray]')"
fi

# 4. nms on the GPU against the CPU
if timed timeout 120 bash -c "python3 -m ptools nms examples/detections.json --device cuda -o '$out/nms_cuda.json' \
        && python3 -m ptools nms examples/detections.json -o '$out/nms_cpu.json'" >"$out/nms.log" 2>&1; then
    if cmp -s "$out/nms_cuda.json" "$out/nms_cpu.json"; then
        row "nms --device cuda vs cpu" "pass" "$elapsed" "same records, byte for byte"
    else
        row "nms --device cuda vs cpu" "FAIL" "$elapsed" "outputs differ (nms_cuda.json, nms_cpu.json)"
    fi
else
    row "nms --device cuda vs cpu" "FAIL" "$elapsed" "$(tail -n 1 "$out/nms.log")"
fi

{
    printf '| %-34s | %-7s | %7s | %s |\n' "check" "result" "time" "detail"
    printf '|%s|%s|%s|%s|\n' "------------------------------------" "---------" "---------" "------"
    printf '%s\n' "${rows[@]}"
} | tee "$out/table.txt"
! grep -q "| FAIL" "$out/table.txt"
