#!/usr/bin/env bash
# One device call: install the carried wheels, then run each named part within its own time budget (seconds).
#   device tool, carry [".whl"]:  bash benchmarks/device_round.sh pytest-stream:120 stream:330
# Parts: pytest-STEM (pytest -m gpu tests/test_STEM.py), or NAME for benchmarks/device_NAME.py --budget-s S
# NAME/PHASE passes --phase PHASE (device_loader.py: export | rows); A+B runs parts A and B side by side.
# PYTEST_SHARDS=N runs a pytest part as N processes side by side (VRAMFIT_MATRIX_SHARD=i/N: tests/test_gpu.py's
# matrix split by backend value; flux-tiny leaves the GPU mostly idle, so N shards take about 1/N of the time).
# (each script writes its rows under $OUT).
# The upload (every tracked file, about 11 MB, plus the carried .whl) must stay under 64 MiB: the stream and speed
# parts need only the five wheels of ../shared/device/wheels.sh (51 MiB, bitsandbytes 43 MB of it); a serve part adds
# the serve set (fastapi, uvicorn, pydantic, ... about 4 MB), which then fits only without bitsandbytes (leave it
# out when no bnb recipe runs). Session 15's first call, with all of them, was refused as over the limit.
# JSONL rows land in $OUT (each script names its own file); logs and the environment go into $OUT/logs.tgz,
# so that at most 8 files come back. A part that fails or runs out of time is recorded with its exit status.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT/logs"
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
  free -g; nproc; } > "$OUT/logs/env.txt" 2>&1
run_part() {  # NAME[/PHASE]:BUDGET
  local item=$1 part budget name phase start rc
  part=${item%%:*}; budget=${item#*:}; name=${part%%/*}; phase=
  [[ $part == */* ]] && phase=${part#*/}
  start=$(date +%s)
  case $name in
    pytest-*) local n=${PYTEST_SHARDS:-1} i pids=()
              for ((i = 0; i < n; i++)); do
                # threads split between the shards (4 x 16 threads would oversubscribe 16 cores: quanto/GGUF quantize on the CPU)
                OMP_NUM_THREADS=$(( $(nproc) / n > 0 ? $(nproc) / n : 1 )) VRAMFIT_MATRIX_SHARD="$i/$n" timeout -s INT -k 20 "$budget" python3 -m pytest -m gpu \
                  "tests/test_${name#pytest-}.py" -q -p no:cacheprovider -rA ${PYTEST_K:+-k "$PYTEST_K"} \
                  > "$OUT/logs/$name-$i.log" 2>&1 &
                pids+=($!)
              done
              rc=0; for i in "${pids[@]}"; do wait "$i" || rc=$?; done ;;
    *) timeout $((budget + 45)) python3 "benchmarks/device_$name.py" --budget-s "$budget" ${phase:+--phase "$phase"} \
         > "$OUT/logs/$name${phase:+-$phase}.log" 2>&1; rc=$? ;;
  esac
  echo "$part budget=${budget}s rc=$rc wall=$(( $(date +%s) - start ))s" | tee -a "$OUT/logs/parts.txt"
}
# A+B: parts A and B side by side (say the GPU matrix on flux-tiny while a checkpoint is written)
for item in "$@"; do
  IFS=+ read -ra group <<< "$item"
  for g in "${group[@]}"; do run_part "$g" & done
  wait
done
tail -n 5 "$OUT"/logs/*.log
find "$OUT" -maxdepth 1 -type f ! -name '*.jsonl' -exec mv {} "$OUT/logs/" \;  # images etc.: at most 8 files come back
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -r "$OUT/logs"
ls -la "$OUT"
