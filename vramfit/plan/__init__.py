"""The planner: will a recipe fit, and how fast will it run -- before any download.

Three models, all explained by the architecture and by committed measurements:

* **weights** -- exact bytes of every component under every recipe value, counted on the meta device from the
  bundled configs: which Linear layers each backend quantizes (the same skips as ``quant.quantize_component``:
  T5's ``wo``, norms, embeddings, layerwise casting's skip patterns) times each library's storage layout
  (bnb packed nibbles + fp32 absmax per 64 + code, int8 + SCB, torchao qdata + scale (+ zero point), quanto
  data + bf16 scales (+ shift) + two scalar buffers, GGUF block bytes, fp8 casting applied for real on meta).
* **memory** -- per stage: resident weights (what each offload strategy keeps on the GPU) + activation peak of
  the stage (calibrated per token / per megapixel from ``benchmarks/results``), max over stages; host RAM from
  what stays in host memory (pinned copies of streamed groups, rounded up to powers of two by PyTorch's
  pinned-memory allocator).
* **latency** -- transformer step = (linear FLOPs / dense rate of the compute dtype x backend factor + attention
  FLOPs / bf16 rate) / efficiency + per-step overhead; transfers = bytes moved x the backend family's
  moved-bytes factor / link rate (pinned for streams, pageable for accelerate); streamed group offload overlaps
  copy and compute except a calibrated fraction of the shorter one (diffusers synchronizes the host at every
  group), accelerate moves add; staged loads build (generate or read) bf16 weights and quantize them on load;
  compile and the first run's lazy initialisation are cold-start costs. Every constant lives in ``calibration/calibration.json`` (written by
  ``benchmarks/derive_calibration.py`` from measured JSONL) with its source; unmeasured ones say "assumed".

Modules by role: ``data`` (budgets, calibration, GPU profiles, host RAM, the request shape), ``weights`` (bytes on
the meta device), ``memory`` (peaks per stage, host RAM, offload=stream's split), ``latency`` (step, stages,
moves, cold start), ``estimate`` (one recipe: ``predict``, ``stream_k``), ``choice`` (candidates, refusals, ranking),
``check`` (``plan --check``, in and out of sample), ``fallback`` (``generate --vram``), ``cli``.

``vramfit plan MODEL --vram 8GB`` lists the best candidates (``--top 0``: every candidate) with its prediction and marks the chosen one;
``vramfit plan --check results.jsonl`` compares predictions with measured rows; ``vramfit probe`` measures this
machine. ``generate_with_budget`` runs the chosen candidate and falls back on CUDA out-of-memory.

JSON (``vramfit plan ... --json``), schema ``vramfit.plan/1``::

    {"schema": "vramfit.plan/1", "model": str, "gpu": {profile: name, vram_gb, h2d_pinned_gbps, ...},
     "request": {"height", "width", "steps", "batch", "text_tokens", "images"},
     "budget": {"vram_gb", "ram_gb" | null, "margin": 0.05, "reserve_gb", "max_error" | null},
     "chosen": recipe string | null, "min_vram_gb": GB the fastest-to-fit candidate needs (null if none can),
     "candidates": [{"recipe": str, "status": "chosen" | "fits" | "too-big" | "too-much-ram" | "too-lossy"
                                              | "refused",
                     "reason": str | null,
                     "needs_vram_gb": predicted peak x (1 + margin) + reserve,
                     "predicted": {"peak_vram_gb", "peak_host_gb", "weights_gb": {component: GB},
                                   "stage_peak_gb": {"encode", "denoise", "decode"},
                                   "step_s", "encode_s", "denoise_s", "decode_s", "warm_s", "cold_s",
                                   "total_s" (= cold_s + images x warm_s), "expected_error", "fidelity",
                                   "compile_cached", "error_source", "assumed": [what is not calibrated by a
                                   measurement], "unmeasured": [the assumptions that are backend/offload factors
                                   never measured on any GPU]} | null}],
     "calibration": {source files and reference GPU}}

Exit codes of ``plan``: 0 a candidate fits, 1 none fits (the message names the smallest budget that works),
2 bad input. ``plan --check FILE...``: 0 every row within +-10 % peak VRAM and +-25 % latency, in sample and out
of sample (leave-one-out refits of the calibration), 1 otherwise.

``plan --check`` reads run records (``vramfit.run/1``) and bench rows (``vramfit.bench/1``) alike (see
``measured_row``). Peak VRAM is always the peak *while generating* (what the planner predicts; a bench row's
``memory.peak_gb``, a run record's ``generate_peak_allocated_gb``), never the load peak. A bench row's s/step is
its warm runs' denoise stage / steps (first step and in-denoise moves included) and is compared with the predicted
denoise stage / steps; a run record's is the median step, compared with ``step_s``. Bench rows with a status
other than ok are skipped with their exit reason; ``role: reference`` rows are bf16 rows (each one checked, from
its cold run when it has no warm run). Totals of rows with fewer steps than the model's default are shown, not
checked: fixed costs (cold start, encode, decode) dominate them.
"""


from .check import (BENCH_SCHEMA, RUN_SCHEMA, TOLERANCE, LeaveOneOut, _Skip, check_rows, compare_row,  # noqa: F401
                    measured_row, predicted_for)
from .choice import (OFFLOAD_COMPILE, TRANSFORMER_VALUES, _brief, _short, candidate_recipes, make_plan,  # noqa: F401
                     plan_for, rank_key, refusal, t5_values)
from .cli import DEFAULT_TOP, SERVE_HORIZON, add_parser, cmd_plan, cmd_probe, print_plan  # noqa: F401
from .data import (COMPONENTS, GB, GGUF_BLOCKS, PCIE_GBPS_PER_LANE, PRECISION_BYTES, STAGES, Shape,  # noqa: F401
                   _realize, calibration, find_gpu, gpu_profile, gpu_table, host_ram_gb, local_profile,
                   offload_kind, parse_size, profile_from_probe, ram_budget, using_calibration)
from .fallback import generate_with_budget, next_candidate, oom_resource  # noqa: F401
from .latency import _tiled_mpix, moved_bytes_factor, transformer_flops  # noqa: F401
from .memory import activations_gb, resident_gb, stage_peaks, stream_blocks, stream_split  # noqa: F401
from . import memory  # noqa: F401  (plan.memory.stream_stage_peaks)
from .estimate import UNMEASURED_PENALTY, expected_error, fidelity_class, fits_gb, predict, stream_k  # noqa: F401
from .weights import Layout, backend_family, family, layout, weight_bytes  # noqa: F401
