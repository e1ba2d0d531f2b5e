#!/usr/bin/env bash
# One device call: install the carried wheels, run one scenario file (or a tagged part of it) with `vramfit bench`,
# then build the report. A device call returns at most 8 files from $OUT (2 folders deep, 16 MiB each), so $OUT
# gets exactly these (full-size images stay on the machine; the report embeds downscaled copies):
#   results.jsonl  bench.log  report/{index.html,blind.html,memory_latency.png,bars.png,grid.png}  extras.tar.gz
# (extras.tar.gz: per-scenario logs, the bf16 reference latents + PNGs, any further grids.)
# Run with the device tool from the repo root, carrying .whl:
#   bash benchmarks/device_bench.sh seeds --only resident        (one call per tag of seeds.toml: see its header)
# Env: BENCH_SECONDS (bench wall-time cap, default 500: the call's 600 s minus install and report),
#      MAX_SCENARIO_SECONDS (per-scenario kill, default 240; a scenario's own `timeout` wins).
set -uo pipefail
SCEN=${1:?usage: bash benchmarks/device_bench.sh SCENARIO [vramfit bench options...]}
shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORK=/tmp/vramfit-bench
rm -rf "$WORK" && mkdir -p "$WORK" "$OUT/report"
LOG=$OUT/bench.log
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
  echo "command: python3 -m vramfit bench $SCEN --out $WORK --device cuda --max-scenario-seconds ${MAX_SCENARIO_SECONDS:-240} $*"
} 2>&1 | tee "$LOG"

# timeout sends SIGTERM: bench kills the running scenario's process group and exits; finished rows are on disk
timeout -s TERM "${BENCH_SECONDS:-500}" python3 -m vramfit bench "$SCEN" --out "$WORK" --device cuda \
  --max-scenario-seconds "${MAX_SCENARIO_SECONDS:-240}" "$@" 2>&1 | tee -a "$LOG"
echo "bench exit: ${PIPESTATUS[0]} (124 = stopped by BENCH_SECONDS)" | tee -a "$LOG"

[ -f "$WORK/results.jsonl" ] || { echo "no results.jsonl" | tee -a "$LOG"; exit 1; }
cp "$WORK/results.jsonl" "$OUT/"
python3 -m vramfit report "$WORK/results.jsonl" --out "$WORK/report" 2>&1 | tail -2 | tee -a "$LOG"
for f in index.html blind.html memory_latency.png bars.png grid.png; do
  [ -f "$WORK/report/$f" ] && cp "$WORK/report/$f" "$OUT/report/"
done
(cd "$WORK" && tar czf "$OUT/extras.tar.gz" logs reference $(cd "$WORK" && ls report/grid-*.png 2>/dev/null))
find "$OUT" -type f -size +16M -printf "WARNING: %p is over 16 MiB and will not come back\n" | tee -a "$LOG"
ls -la "$OUT" "$OUT/report" | tee -a "$LOG"
