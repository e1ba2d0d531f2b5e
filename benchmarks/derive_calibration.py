"""Derive the planner's constants (vramfit/calibration/calibration.json) from measured JSONL.

Usage: python benchmarks/derive_calibration.py [FILE.jsonl ...]
(default: every benchmarks/results/*/*.jsonl). Reads two kinds of rows:

* ``calibrate.py`` rows (``kind``: probe, transformer_step, text_encoder_2_encode, text_encoder_encode,
  vae_decode): activation peaks per token / megapixel, stage latencies, the reference GPU's rates;
* run records (``schema: vramfit.run/1``, as ``foundation.py`` and the bench write them; error rows skipped):
  pipeline overheads, offload transfer rates, compile speed-up and cold start, and the speed factor of every
  transformer backend measured with offload=none.

What no row measures yet keeps a value from ``SEED`` (numbers from DESIGN.md, measured on the same H200) or
``ASSUMED`` (marked ``"source": "assumed"``); the planner reports those as assumptions. Rerun after a bench.
"""

from __future__ import annotations

import glob
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vramfit import plan  # noqa: E402
from vramfit.recipe import Recipe  # noqa: E402

OUT = ROOT / "vramfit" / "calibration" / "calibration.json"

# Per-step times of the FLUX.1-dev transformer at 1024^2, batch 1, on the H200 (DESIGN.md table, 2026-11-21);
# bench rows for the same value replace them.
SEED = {
    "bnb-nf4": {"eager": 0.187, "peak_over_weights_gb": 0.50},
    "fp8-layerwise": {"eager": 0.206, "peak_over_weights_gb": 0.50},
    "torchao-fp8dq": {"eager": 0.283, "compiled": 0.111, "peak_over_weights_gb": 1.30},
    # public H100 report (DESIGN.md pitfalls): torchao int4 weight-only without compile is ~9x slower than bf16
    "torchao-int4wo": {"eager_x_bf16": 9.0},
}
SEED_SOURCE = "DESIGN.md table, H200 2026-11-21 (1024^2, batch 1)"
FULL_COMPILE_COLD_S = 424.0  # torchao fp8dq + torch.compile fullgraph on the H200 (DESIGN.md)

# compute dtype of each transformer value (what its matmuls run in) and assumed slow-down of the linear part
# relative to the same FLOPs in that dtype, where nothing is measured yet: dequantize-per-matmul backends
# pay a weight read + unpack per layer.
BACKENDS = {
    "bf16": ("bf16", 1.0), "fp16": ("bf16", 1.0), "fp32": ("bf16", 4.0),
    "fp8-layerwise": ("bf16", 1.3), "fp8-layerwise-e5m2": ("bf16", 1.3),
    "torchao-fp8dq": ("fp8", 1.5), "torchao-fp8wo": ("bf16", 1.5), "torchao-int8wo": ("bf16", 1.5),
    "torchao-int8dq": ("int8", 1.0), "torchao-int4wo": ("bf16", 1.5),
    "bnb-nf4": ("bf16", 1.1), "bnb-fp4": ("bf16", 1.1), "bnb-int8": ("bf16", 3.0),
    "quanto-int8": ("bf16", 2.0), "quanto-fp8": ("bf16", 2.0), "quanto-int4": ("bf16", 3.0),
    **{f"gguf-{q}": ("bf16", 1.3 if q in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1") else 1.5)
       for q in ("q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0", "q3_k", "q2_k")},
}
# same-as-value aliases: measured once, valid for the twin (same kernels)
TWINS = {"bnb-fp4": "bnb-nf4", "fp8-layerwise-e5m2": "fp8-layerwise"}

# Relative L2 error of the flux-tiny transformer output vs bf16 on CPU. "measured": the quant tests' measurements
# (int8 family 0.008-0.013, fp8 family 0.024-0.036, nf4 0.128, int4 0.09, q8_0 0.008, q4_1 0.086, q2_k 0.24);
# "bound": tests/test_quant.py's bound / 1.5 (the bounds are set at ~1.5x the measurement); "assumed": by bits.
M, B = "measured", "bound"
ERRORS = {
    "fp16": (0.001, "assumed"), "torchao-int8wo": (0.010, M), "torchao-int8dq": (0.013, M), "bnb-int8": (0.013, M),
    "quanto-int8": (0.010, M), "torchao-fp8wo": (0.036, M), "torchao-fp8dq": (0.036, "assumed"),
    "quanto-fp8": (0.036, M), "fp8-layerwise": (0.024, M), "fp8-layerwise-e5m2": (0.047, B), "bnb-nf4": (0.128, M),
    "bnb-fp4": (0.153, B), "quanto-int4": (0.090, M), "torchao-int4wo": (0.090, "assumed"), "gguf-q8_0": (0.008, M),
    "gguf-q6_k": (0.02, "assumed"), "gguf-q5_k": (0.035, "assumed"), "gguf-q5_1": (0.043, B), "gguf-q5_0": (0.047, B),
    "gguf-q4_k": (0.07, "assumed"), "gguf-q4_1": (0.086, M), "gguf-q4_0": (0.093, B), "gguf-q3_k": (0.14, "assumed"),
    "gguf-q2_k": (0.24, M),
}
ERRORS_SOURCE = {M: "measured on CPU: flux-tiny transformer output vs bf16 (tests/test_quant.py runs, torch 2.13)",
                 B: "tests/test_quant.py error bound / 1.5 (bounds are ~1.5x the CPU measurement)",
                 "assumed": "assumed (interpolated by bits per weight)"}


def read(paths):
    rows = []
    for p in paths:
        for line in Path(p).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                r = r.get("record", r)
                r["_file"] = str(Path(p).relative_to(ROOT)) if Path(p).is_absolute() else p
                rows.append(r)
    return rows


def lstsq(xs, ys):
    """y = a x + b"""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return a, my - a * mx


def main(paths):
    rows = read(paths)
    kind = lambda k: [r for r in rows if r.get("kind") == k]  # noqa: E731
    runs = [r for r in rows if r.get("schema") == "vramfit.run/1" and not r.get("error") and not r.get("exit_code")
            and r.get("model") == "flux-dev" and "timings" in r]
    probe = kind("probe")[-1]
    spec = plan.find_gpu(probe["name"])
    theo = plan.PCIE_GBPS_PER_LANE[spec["link"]["pcie_gen"]] * spec["link"]["lanes"]
    ref = {
        "name": probe["name"], "tflops": probe["tflops"], "h2d_pinned_gbps": probe["h2d_pinned_gbps"],
        "h2d_pageable_gbps": probe["h2d_pageable_gbps"],
        "matmul_fraction_of_spec": {k: round(probe["tflops"][k] / v, 3) for k, v in spec["tflops_spec"].items()
                                    if v and probe["tflops"].get(k)},
        "link_fraction_pinned": round(probe["h2d_pinned_gbps"] / theo, 3),
        "pageable_over_pinned": round(probe["h2d_pageable_gbps"] / probe["h2d_pinned_gbps"], 3),
    }
    bf16 = probe["tflops"]["bf16"] * 1e12

    # transformer: activation = batch x (a x tokens + b); step = FLOPs / (rate x efficiency) + overhead
    steps = kind("transformer_step")
    a, b = lstsq([r["img_tokens"] + r["txt_tokens"] for r in steps], [r["activation_peak_gb"] / r["batch"] for r in steps])
    xs = [sum(plan.transformer_flops("flux-dev", plan.Shape(r["res"], r["res"], 1, r["batch"], r["txt_tokens"]))) / bf16
          for r in steps]
    k, overhead = lstsq(xs, [r["s"] for r in steps])
    transformer = {"act_gb_per_token": a, "act_gb_fixed": b, "width": 3072, "efficiency": round(1 / k, 4),
                   "overhead_s": round(overhead, 5), "points": len(steps)}
    eff = 1 / k

    def eager_compute(shape):  # bf16 eager step without overhead, from the fit
        return sum(plan.transformer_flops("flux-dev", shape)) / bf16 / eff

    t5 = kind("text_encoder_2_encode")[-1]
    clip = kind("text_encoder_encode")[-1]
    vae = kind("vae_decode")
    plain = [r for r in vae if not r["tiling"]]
    vae_cal = {"act_gb_per_mpix": statistics.fmean(r["activation_peak_gb"] / (r["res"] ** 2 / 1e6) for r in plain),
               "s_per_mpix": sum(r["s"] * r["res"] ** 2 / 1e6 for r in plain) / sum((r["res"] ** 2 / 1e6) ** 2 for r in plain),
               "tile_px": 1024, "width": 128}
    tiled = [r for r in vae if r["tiling"] and r["res"] > vae_cal["tile_px"]]
    vae_cal["tiled_overhead"] = round(statistics.fmean(
        r["s"] / (vae_cal["s_per_mpix"] * plan._tiled_mpix(plan.Shape(r["res"], r["res"]), 1024)) for r in tiled), 3)

    # pipeline and offload constants from run records at their own shapes
    def shape_of(r):
        q = r["request"]
        return plan.Shape(q["height"], q["width"], q["steps"], 1, q.get("max_sequence_length", 512))

    def recipe_of(r):
        return Recipe.parse(r["recipe"])

    def enc_compute(r):
        s = shape_of(r)
        return t5["s"] / t5["tokens"] * s.text_tokens + clip["s"]

    def gbs(r, *comps):
        return sum(r["weight_bytes"][c] for c in comps) / 1e9

    def pick(offload, compile="off", transformer="bf16"):
        return [r for r in runs if recipe_of(r).offload == offload and recipe_of(r).compile == compile
                and recipe_of(r).transformer == transformer and recipe_of(r).text_encoder_2 == "bf16"]

    resident = pick("none") + pick("staged") + pick("none", "regional")
    load = lambda r: sum(s.get("load_s", 0) for s in r["stages"].values())  # noqa: E731
    pipeline = {
        "host_base_gb": round(min(r["memory"]["host_peak_rss_gb"] for r in resident), 3),
        "encode_overhead_s": round(statistics.median(r["stages"]["encode"]["s"] - r["stages"]["encode"].get("load_s", 0)
                                                     - enc_compute(r) for r in resident), 4),
        "decode_overhead_s_per_mpix": round(statistics.median(
            (r["stages"]["decode"]["s"] - r["stages"]["decode"].get("load_s", 0)
             - vae_cal["s_per_mpix"] * shape_of(r).mpix) / shape_of(r).mpix for r in resident), 4),
        "first_step_extra_s": round(statistics.median(r["timings"]["first_step_s"] - r["timings"]["s_per_step_median"]
                                                      for r in pick("none") + pick("staged")), 4),
    }
    base_median = {id(r): r["timings"]["s_per_step_median"] for r in pick("none")}
    ref_eager = statistics.median(base_median.values())
    reg = pick("none", "regional")[0]
    compile_cal = {
        "regional": {"step_factor": round((reg["timings"]["s_per_step_median"] - overhead) / (ref_eager - overhead), 4),
                     "cold_s": reg["timings"]["compile_s"], "source": f"measured ({reg['_file']})"},
        "full": {"step_factor": None, "cold_s": FULL_COMPILE_COLD_S, "assumed": ["step_factor"],
                 "source": f"cold start: {SEED_SOURCE}, torchao-fp8dq; speed-up assumed as regional"},
    }
    compile_cal["full"]["step_factor"] = compile_cal["regional"]["step_factor"]

    pageable, pinned = probe["h2d_pageable_gbps"], probe["h2d_pinned_gbps"]
    m = pick("model")[0]
    sm = shape_of(m)
    enc_w, tr_w = gbs(m, "text_encoder", "text_encoder_2"), gbs(m, "transformer")
    sync = enc_w / (m["stages"]["encode"]["s"] - pipeline["encode_overhead_s"] - enc_compute(m))
    moves = m["timings"]["denoise_s"] - sm.steps * m["timings"]["s_per_step_median"] - pipeline["first_step_extra_s"]
    writeback = (enc_w + tr_w) / (moves - tr_w / sync)
    sq = pick("sequential")[0]
    seq = gbs(sq, "transformer") / (sq["timings"]["s_per_step_median"] - eager_compute(shape_of(sq)) - overhead)
    stream = {o: round(gbs(r, "transformer") / pinned / r["timings"]["s_per_step_median"], 4)
              for o in ("group-block", "group-leaf") for r in pick(o)[:1]}
    st = pick("staged")[0]
    offload = {
        "sync_fraction_of_pageable": round(sync / pageable, 4), "writeback_gbps": round(writeback, 3),
        "sequential_fraction_of_pageable": round(seq / pageable, 4), "stream_fraction_of_pinned": stream,
        "random_gen_gbps": round(sum(st["weight_bytes"].values()) / 1e9 / load(st), 1),
        "disk_gbps": 2.0,
        "source": {"sync, writeback": m["_file"] + " offload=model (encode stage; first step and end of denoise)",
                   "sequential": sq["_file"] + " offload=sequential", "stream": "group-block / group-leaf rows",
                   "random_gen_gbps": "staged row (random weights generated on the GPU)",
                   "disk_gbps": "assumed (NVMe read of a checkpoint)"},
    }

    # transformer backends: measured rows (offload=none) override the seed; the rest is assumed
    backends = {}
    shape1024 = plan.Shape(1024, 1024, 28, 1, 512)
    for value, (cd, assumed_factor) in BACKENDS.items():
        backends[value] = {"compute": cd, "factor": {"eager": assumed_factor}, "source": "assumed"}

    def factor_from(value, step_s, shape, compiled, comp_mode="regional"):
        cd = BACKENDS[value][0]
        lin, attn = plan.transformer_flops("flux-dev", shape)
        rate = probe["tflops"][cd] * 1e12
        body = step_s - overhead
        if compiled:
            body /= compile_cal[comp_mode]["step_factor"]
        return (body * eff - attn / bf16) / (lin / rate)

    backends["bf16"].update(factor={"eager": 1.0}, source="definition (the calibration sweep is bf16 eager)")
    for value, s in SEED.items():
        f = {}
        if "eager" in s:
            f["eager"] = round(factor_from(value, s["eager"], shape1024, False), 3)
        if "compiled" in s:
            f["compiled"] = round(factor_from(value, s["compiled"], shape1024, True, "full"), 3)
        if "eager_x_bf16" in s:
            f["eager"] = round(factor_from(value, s["eager_x_bf16"] * ref_eager, shape1024, False), 3)
        backends[value]["factor"] = f
        backends[value]["source"] = SEED_SOURCE
        if "peak_over_weights_gb" in s:
            a_ref = transformer["act_gb_per_token"] * 4608 + transformer["act_gb_fixed"]
            backends[value]["act_factor"] = round(max(1.0, s["peak_over_weights_gb"] / a_ref), 3)
    for r in runs:  # bench rows: offload=none, one transformer backend at a time
        rc = recipe_of(r)
        if rc.offload != "none" or rc.transformer == "bf16" or rc.transformer not in backends:
            continue
        key = "compiled" if rc.compile != "off" else "eager"
        f = factor_from(rc.transformer, r["timings"]["s_per_step_median"], shape_of(r), rc.compile != "off",
                        rc.compile if rc.compile != "off" else "regional")
        backends[rc.transformer]["factor"][key] = round(f, 3)
        backends[rc.transformer]["source"] = f"measured ({r['_file']})"
    for twin, of in TWINS.items():
        if backends[twin]["source"] == "assumed" and backends[of]["source"] != "assumed":
            backends[twin] = {**backends[of], "source": f"as {of}: " + backends[of]["source"]}

    a_t5 = t5["activation_peak_gb"] / t5["tokens"]
    out = {
        "source": {"files": sorted({r["_file"] for r in rows}), "reference_gpu": probe["name"],
                   "measured_at": probe.get("measured_at"), "weights": "random stand-in (memory and latency are "
                   "the real architecture's)", "derived_by": "benchmarks/derive_calibration.py"},
        "reference_gpu": ref,
        "transformer": transformer,
        "text_encoder_2": {"act_gb_per_token": a_t5, "s_per_token": t5["s"] / t5["tokens"], "width": 4096},
        "text_encoder": {"act_gb": clip["activation_peak_gb"], "s": clip["s"], "width": 768},
        "vae": vae_cal,
        "pipeline": pipeline,
        "offload": offload,
        "compile": compile_cal,
        "backends": backends,
        "errors": {v: {"error": e, "source": "assumed" if s == "assumed" else ERRORS_SOURCE[s]}
                   for v, (e, s) in ERRORS.items()},
        "budget": {"margin": 0.05, "reserve_gb": 0.5,
                   "source": "assumed: CUDA context and allocator fragmentation outside torch's allocated bytes"},
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)} from {len(rows)} rows ({len(runs)} run records)")


if __name__ == "__main__":
    main(sys.argv[1:] or sorted(glob.glob(str(ROOT / "benchmarks" / "results" / "*" / "*.jsonl"))))
