#!/usr/bin/env bash
# Where a cold start's import_s goes (bench/Runner: diffusers' FluxPipeline + the model classes), on the machine it
# runs on: python -X importtime twice (the second with every .pyc written), the 60 slowest modules (cumulative us)
# of each. Run after benchmarks/device_round.sh installed the wheels:  bash benchmarks/importtime.sh > $OUT/importtime.txt
set -u
export PYTHONPATH=/tmp/site:$PWD
for i in 1 2; do
  t0=$(date +%s%N)
  ${PYTHON:-python3} -X importtime -c "
import torch
from diffusers import FluxPipeline
from vramfit import models
for c in models.COMPONENTS:
    models.component_class(c)" 2> /tmp/importtime.$i || { tail -3 /tmp/importtime.$i; exit 1; }
  echo "run $i: $(( ($(date +%s%N) - t0) / 1000000 )) ms wall (python start + torch + diffusers + model classes)"
  sort -t'|' -k2 -n -r /tmp/importtime.$i | head -60
done
