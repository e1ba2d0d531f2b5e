#!/usr/bin/env bash
# One device call: install the carried wheels, then run each named part within its own time budget (seconds).
#   device tool, carry [".whl"]:  bash benchmarks/device_round.sh pytest-stream:120 stream:330
# Parts: pytest-STEM (pytest -m gpu tests/test_STEM.py), or NAME for benchmarks/device_NAME.py --budget-s S
# (each script writes its rows under $OUT).
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
for item in "$@"; do
  part=${item%%:*}; budget=${item#*:}
  start=$(date +%s)
  case $part in
    pytest-*) timeout -s INT -k 20 "$budget" python3 -m pytest -m gpu "tests/test_${part#pytest-}.py" -q -p no:cacheprovider -rA \
                ${PYTEST_K:+-k "$PYTEST_K"} \
                > "$OUT/logs/$part.log" 2>&1 ;;
    *) timeout $((budget + 45)) python3 "benchmarks/device_$part.py" --budget-s "$budget" \
         > "$OUT/logs/$part.log" 2>&1 ;;
  esac
  echo "$part budget=${budget}s rc=$? wall=$(( $(date +%s) - start ))s" | tee -a "$OUT/logs/parts.txt"
done
tail -n 5 "$OUT"/logs/*.log
find "$OUT" -maxdepth 1 -type f ! -name '*.jsonl' -exec mv {} "$OUT/logs/" \;  # images etc.: at most 8 files come back
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -r "$OUT/logs"
ls -la "$OUT"
