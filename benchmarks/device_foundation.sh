#!/usr/bin/env bash
# One device call: install the carried wheels, then probe + calibration sweep + issue-2 scenarios, all under $OUT.
# Run with the device tool from the repo root, carrying .whl:  bash benchmarks/device_foundation.sh
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/gpu.txt
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)" | tee -a $OUT/gpu.txt
python3 benchmarks/calibrate.py $OUT/calibration.jsonl > $OUT/calibrate.log 2>&1; echo "calibrate rc=$?"
tail -3 $OUT/calibrate.log
python3 benchmarks/foundation.py $OUT 2>&1 | tee $OUT/foundation.log
rm -rf $OUT/img/*.json
