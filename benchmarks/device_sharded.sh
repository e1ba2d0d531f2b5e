#!/usr/bin/env bash
# One device call on a machine with N GPUs: N shards at once, one per GPU, each a fresh `vramfit bench` (or a
# special job), then one merged results.jsonl and one report. Each scenario still runs in its own process; the
# shards only share the host (64 cores, 512 GB on nvidia-h200-x4), which the rows' device info records.
#   bash benchmarks/device_sharded.sh "seeds --only resident" "seeds --only slow" "seeds --only compile" "seeds --only gguf"
# A shard is jobs separated by ";" run in turn on its GPU; special jobs: "vram" (vramfit generate --vram 8GB and
# 4GB on the full-size stand-in), "pytest" (the GPU tests), "probe ARGS" (benchmarks/compile_probe.py ARGS, its own
# compile cache, -> probe.jsonl). BENCH_SECONDS caps every shard (SIGTERM: rows so far stay).
# $OUT gets at most 8 files: results.jsonl vram.jsonl bench.log logs.tgz (every scenario's own log, with its phase lines,
# and report/blind.html) report/{index.html,memory_latency.png,bars.png,grid.png}. TORCH_LOGS (e.g. recompiles) passes through.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
WORK=/tmp/vramfit-sharded; rm -rf "$WORK"; mkdir -p "$WORK" "$OUT/report"
CAP=${BENCH_SECONDS:-500}
{ nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
  nproc; date -u; } > "$WORK/header.log" 2>&1
job_cmd() {  # one job of a shard: "vram", "pytest", or vramfit bench arguments
  case "$1" in
    vram) echo "for v in 8GB 4GB; do python3 -m vramfit generate 'a red fox in the snow, photograph' --model flux-dev --weights random --vram \$v --steps 28 --out $2/vram-\$v.png --no-progress --json | tail -1 >> $2/vram.jsonl; done" ;;
    pytest) echo "python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py" ;;
    probe\ *) echo "TORCHINDUCTOR_CACHE_DIR=$2/inductor-\$RANDOM timeout 240 python3 benchmarks/compile_probe.py ${1#probe } --out $2/probe.jsonl" ;;
    *) echo "python3 -m vramfit bench $1 --out $2/bench --device cuda --max-scenario-seconds ${MAX_SCENARIO_SECONDS:-300}" ;;
  esac
}
i=0
for shard in "$@"; do  # a shard: jobs separated by ';', run one after another on GPU $i
  d="$WORK/shard-$i"; mkdir -p "$d"; cmd=""
  IFS=';' read -ra jobs <<< "$shard"
  for j in "${jobs[@]}"; do j=$(echo "$j" | xargs); cmd="$cmd $(job_cmd "$j" "$d");"; done
  echo "shard $i (GPU $i): $cmd" >> "$WORK/header.log"
  (CUDA_VISIBLE_DEVICES=$i timeout -s TERM "$CAP" bash -c "$cmd" > "$d/log" 2>&1; echo "shard $i exit $?" >> "$d/log") &
  i=$((i+1))
done
wait
cat "$WORK/header.log" > "$OUT/bench.log"
for d in "$WORK"/shard-*; do echo "===== $d" >> "$OUT/bench.log"; tail -c 60000 "$d/log" >> "$OUT/bench.log"; done
cat "$WORK"/shard-*/bench/results.jsonl > "$OUT/results.jsonl" 2>/dev/null
for f in vram probe; do
  cat "$WORK"/shard-*/$f.jsonl > "$OUT/$f.jsonl" 2>/dev/null; [ -s "$OUT/$f.jsonl" ] || rm -f "$OUT/$f.jsonl"; done
if [ -s "$OUT/results.jsonl" ]; then
  python3 -m vramfit report "$WORK"/shard-*/bench/results.jsonl --out "$WORK/report" >> "$OUT/bench.log" 2>&1
  for f in index.html memory_latency.png bars.png grid.png; do
    [ -f "$WORK/report/$f" ] && cp "$WORK/report/$f" "$OUT/report/"; done
fi
(cd "$WORK" && tar czf "$OUT/logs.tgz" --exclude='*.row.json' shard-*/bench/logs report/blind.html 2>/dev/null)
find "$OUT" -type f -size +16M -printf "WARNING: %p is over 16 MiB and will not come back\n" >> "$OUT/bench.log"
ls -la "$OUT" "$OUT/report"
tail -n 3 "$WORK"/shard-*/log
