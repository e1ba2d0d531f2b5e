"""Derive the planner's constants (vramfit/calibration/calibration.json) from measured JSONL.

Usage: python benchmarks/derive_calibration.py [FILE.jsonl ...]
(default: every benchmarks/results/*/*.jsonl). ``derive(rows)`` is the same fit in memory: ``plan --check`` calls
it without one row at a time (leave-one-out). Reads three kinds of rows:

* ``calibrate.py`` rows (``kind``: probe, transformer_step, text_encoder_2_encode, text_encoder_encode,
  vae_decode): activation peaks per token / megapixel, stage latencies, the reference GPU's rates;
* run records (``schema: vramfit.run/1``, as ``foundation.py`` and ``generate --json`` write them; error rows
  skipped): cold-start costs, offload transfer rates, compile speed-up and cold start;
* bench rows (``schema: vramfit.bench/1``; rows whose status is not ok are skipped, ``role: reference`` rows are
  bf16 rows): warm pipeline overheads, the speed factor and activation peak of every transformer backend measured
  with offload=none (eager and compiled), per backend *family* how its weights move (model offload, group offload
  streams) and how fast it quantizes on load (staged), the expected error of every value (the latent rel. L2
  against the bf16 reference of the same seed);
* ``benchmarks/device_stream.py`` rows (``schema: vramfit.stream/1``; the committed rows written before it had a
  schema are recognised by their fields, see ``is_stream_row``): the pinned link rate (link rows) and
  offload=stream's link use and per-block cost, with every measured stream row (backend, K, regime, s/step, peak,
  host RAM) so the planner knows which stream recipes were measured; error / OOM / left-out rows are listed as
  skipped with their reason.

Fits that depend on the whole model are solved against ``vramfit.plan.predict`` itself (one constant at a time,
by bisection), so the planner and this script cannot disagree about what a constant means. Nothing is fitted to
a single scenario's name: a constant belongs to a backend value, a family or an offload strategy, and every row
of that kind constrains it (median over rows). What no row measures is marked ``"source": "assumed"``; the
planner reports those as assumptions (and ranks recipes resting on unmeasured factors after measured ones).
"""

from __future__ import annotations

import glob
import json
import re
import math
import statistics
import sys
from pathlib import Path

from .. import plan
from ..recipe import Recipe
from ..plan.memory import modulation_hoisting, row_hoisted
from ..stream_report import is_stream_row

ROOT = Path(__file__).resolve().parent.parent.parent  # the checkout: benchmarks/results lives beside vramfit/

OUT = ROOT / "vramfit" / "calibration" / "calibration.json"
# import + build + quantize before a compiled bench scenario starts compiling (H200, flux-dev stand-in: 45-60 s)
TIMEOUT_SETUP_S = 60.0

# cold start of compile=full where no full-compile row finished (an assumption: the regional figure, which the
# planner then marks assumed)
FULL_COMPILE_COLD_ASSUMED = "assumed: as compile=regional (no compile=full row finished)"

# compute dtype of each transformer value (what its matmuls run in) and assumed slow-down of the linear part
# relative to the same FLOPs in that dtype, where nothing is measured yet: dequantize-per-matmul backends
# pay a weight read + unpack per layer.
BACKENDS = {
    "bf16": ("bf16", 1.0), "fp16": ("bf16", 1.0), "fp32": ("bf16", 4.0),
    "fp8-layerwise": ("bf16", 1.3), "fp8-layerwise-e5m2": ("bf16", 1.3),
    "torchao-fp8dq": ("fp8", 1.5), "torchao-fp8dq-tensor": ("fp8", 1.5), "torchao-fp8wo": ("bf16", 1.5), "torchao-int8wo": ("bf16", 1.5),
    "torchao-int8dq": ("int8", 1.0), "torchao-int4wo": ("bf16", 1.5),
    "bnb-nf4": ("bf16", 1.1), "bnb-fp4": ("bf16", 1.1), "bnb-int8": ("bf16", 3.0),
    "quanto-int8": ("bf16", 2.0), "quanto-fp8": ("bf16", 2.0), "quanto-int4": ("bf16", 3.0),
    **{f"gguf-{q}": ("bf16", 1.3 if q in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1") else 1.5)
       for q in ("q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0", "q3_k", "q2_k")},
}
# same-as-value aliases: measured once, valid for the twin (same kernels) -- used only while the twin itself is
# unmeasured. LIKE: unmeasured values assumed to run at the speed of a measured value of the same dequantize path
# (still reported as assumed): the legacy GGUF block types unpack like q4_1, the k-quants like q2_k.
TWINS = {"bnb-fp4": "bnb-nf4", "fp8-layerwise-e5m2": "fp8-layerwise", "torchao-fp8dq-tensor": "torchao-fp8dq"}
LIKE = {"quanto-fp8": "quanto-int8", "gguf-q5_1": "gguf-q4_1", "gguf-q5_0": "gguf-q4_1", "gguf-q4_0": "gguf-q4_1",
        "gguf-q6_k": "gguf-q2_k", "gguf-q5_k": "gguf-q2_k", "gguf-q4_k": "gguf-q2_k", "gguf-q3_k": "gguf-q2_k"}
FAMILIES = ("bnb", "torchao", "quanto", "layerwise", "gguf")

# an unmeasured value's error is assumed to be that of the measured value of the same library with the nearest
# bits per weight at or below its own (an upper bound where the format is finer)
ERROR_LIKE = {"gguf-q6_k": "gguf-q4_1", "gguf-q5_k": "gguf-q4_1", "gguf-q5_1": "gguf-q4_1", "gguf-q5_0": "gguf-q4_1",
              "gguf-q4_k": "gguf-q4_1", "gguf-q4_0": "gguf-q4_1", "gguf-q3_k": "gguf-q2_k", "quanto-fp8": "quanto-int8"}
STEPS_FOR_ERRORS = 28  # the model's default: fidelity rows of other step counts count only where no 28-step row is


def speed_variant(r: dict) -> bool:
    """A bench row of a speed-path step (a step cache, fused QKV, another attention backend, CUDA graphs, autotune,
    coordinate-descent tuning): it measures that step, not its backend, and no constant is fitted to it."""
    rc = Recipe.parse(r["recipe"])
    return (rc.cache != "none" or runtime_on(rc, "fuse_qkv") or rc.attention != "native"
            or bool(set(rc.compile.split("+")[1:]) - {"nocdtune"}))


def runtime_on(rc, key: str) -> bool:
    return str(getattr(rc, key, "off")) == "on"


def cd_tuned(r: dict) -> bool:
    """Whether inductor's coordinate-descent tuning was on for a compiled row: its recipe's +cdtune / +nocdtune, else
    the recorded dynamo settings; rows of torchao recipes from before vramfit passed ``set_inductor_config=False``
    (its quantize entry says so) had it on -- torchao's configs switched it on themselves."""
    rc = Recipe.parse(r["recipe"])
    if rc.compile_cdtune is not None:
        return rc.compile_cdtune
    man = [m for m in r.get("manifest") or [] if isinstance(m, dict)]
    for m in man:
        if m.get("step") == "dynamo-config":
            v = (m.get("settings") or {}).get("torch._inductor.config.coordinate_descent_tuning")
            if v is not None:
                return bool(v)
    torchao = any(str(v).startswith("torchao-") for v in rc.components.values())
    return torchao and not any("set_inductor_config=False" in str(m.get("api") or "") for m in man
                               if m.get("step") == "quantize")


def cold_family(fam: str, cdtune: bool) -> str:
    """The calibration key of a compile cold start: the backend family, ``+cdtune`` where the tuning was on."""
    return fam + "+cdtune" if cdtune else fam


def errors_from_rows(bench: list) -> dict:
    """Expected error of every recipe value: the latent rel. L2 of bench rows against the bf16 reference of the
    same seed (``fidelity.latent_rel_l2``), median over the rows whose transformer carries the value (T5 as in
    the row: usually the same value, so the figure bounds the value's error on either component); 28-step rows
    where there are any. A value without a row takes its LIKE/TWIN's figure, marked assumed."""
    found: dict = {}
    for r in bench:
        fid = r.get("fidelity") or {}
        e = fid.get("latent_rel_l2")
        rc = Recipe.parse(r["recipe"])
        if e is None or r.get("role") == "reference" or rc.transformer in ("bf16", "fp32"):
            continue
        found.setdefault(rc.transformer, []).append((e, r.get("steps"), r["_file"], r.get("scenario")))
    out = {}
    for value, rows in sorted(found.items()):
        full = [x for x in rows if x[1] == STEPS_FOR_ERRORS] or rows
        out[value] = {"error": round(statistics.median(x[0] for x in full), 4),
                      "source": "measured on the H200: latent rel. L2 vs bf16, same seed ("
                                + ", ".join(f"{x[3]} {x[1]} steps {x[0]:.4f}" for x in full) + "; "
                                + ", ".join(sorted({x[2] for x in full})) + ")"}
    for value, of in {**TWINS, **ERROR_LIKE}.items():
        if value not in out and of in out:
            out[value] = {"error": out[of]["error"], "source": f"assumed: as {of} (nearest measured format; {of} "
                                                                 f"measured {out[of]['error']})"}
    return out


def read(paths):
    rows = []
    for p in paths:
        for line in Path(p).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                r = r.get("record", r)
                r["_file"] = str(Path(p).resolve().relative_to(ROOT)) if Path(p).resolve().is_relative_to(ROOT) else p
                rows.append(r)
    return rows


def lstsq(xs, ys):
    """y = a x + b"""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return a, my - a * mx


def solve(f, target, lo, hi, iters=80):
    """x in [lo, hi] (geometric) with f(x) == target, f monotonic; clamps to the bracket."""
    flo, fhi = f(lo) - target, f(hi) - target
    if flo * fhi > 0:
        return lo if abs(flo) < abs(fhi) else hi
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        fm = f(mid) - target
        if (fm > 0) == (flo > 0):
            lo, flo = mid, fm
        else:
            hi = mid
    return math.sqrt(lo * hi)


def bench_measured(r):
    """A bench row as the check reads it (warm medians, else the cold run), plus its stage times."""
    w, c = r.get("warm") or {}, r.get("cold") or {}
    warm = bool(w.get("n")) and w.get("total_s_median") is not None
    g = (lambda k: w.get(f"{k}_median")) if warm else (lambda k: c.get(k))
    return {"warm": warm, "encode_s": g("encode_s"), "denoise_s": g("denoise_s"), "decode_s": g("decode_s"),
            "s_per_step": g("s_per_step"), "total_s": g("total_s"), "compile_s": c.get("compile_s")}


def act_factors(backends, bench, transformer, vae_cal, shape_of):
    """Transformer activation peak of each backend relative to bf16's, from offload=none bench rows whose peak is
    the denoise stage (peak minus all weights above the VAE decode's activations): median over rows."""
    found: dict = {}
    for r in bench:
        rc = Recipe.parse(r["recipe"])
        if rc.offload != "none" or rc.transformer in ("bf16", "fp32") or rc.transformer not in backends:
            continue
        s = shape_of(r)
        act = r["memory"]["peak_gb"] - sum(r["weight_bytes"].values()) / 1e9
        a_ref = transformer["act_gb_per_token"] * (s.img_tokens + s.text_tokens) + transformer["act_gb_fixed"]
        if act > vae_cal["act_gb_per_mpix"] * s.mpix * 1.05 and act > a_ref:  # the denoise stage set the peak
            found.setdefault(rc.transformer, []).append((act / a_ref, r["_file"]))
    for value, fs in found.items():
        backends[value]["act_factor"] = round(statistics.median(f for f, _ in fs), 3)
        backends[value]["act_source"] = f"measured: offload=none peaks ({', '.join(sorted({x for _, x in fs}))})"


# ---- offload=stream rows (benchmarks/device_stream.py)
STREAM_SCHEMA = "vramfit.stream/1"


def _why_not(r: dict) -> str | None:
    """Why a device_stream row measured nothing the stream fit can use (None: it did)."""
    if r.get("smoke"):
        return "smoke row (flux-tiny on CPU)"
    if r.get("skipped"):
        return str(r["skipped"])
    if r.get("error"):
        return str(r["error"]).splitlines()[0][:160]
    if stream_row_device(r).get("type") != "cuda":
        return "not measured on a GPU"
    return None


def stream_row_device(r: dict) -> dict:
    """The device a device_stream row ran on. ``generate --vram`` rows (kind cli) measured before 2026-12-02 14:30
    UTC kept no device field: a cap fraction is only set where CUDA was available (``_cap``), and the plan in the
    row names the GPU it probed."""
    if r.get("device"):
        return r["device"]
    if (r.get("scenario") or {}).get("kind") == "cli" and r.get("cap_fraction") and not r.get("smoke"):
        return {"type": "cuda", "name": str((r.get("plan") or {}).get("gpu", "")).replace(" (probed)", ""),
                "source": "inferred: a CUDA memory cap was set, plan.gpu names the GPU"}
    return {}


def stream_row_steps_weights(r: dict) -> tuple:
    """(steps, weights kind) of a device_stream row: a cli row's are in its argv when the row predates those fields."""
    argv = r.get("argv") or []
    opt = lambda flag: argv[argv.index(flag) + 1] if flag in argv[:-1] else None  # noqa: E731
    steps = r.get("steps") or (int(opt("--steps")) if opt("--steps") else (r.get("scenario") or {}).get("steps"))
    w = r.get("weights") or opt("--weights") or "random"
    return steps, "random" if w == "random" else "hub"


def stream_rows(rows: list) -> tuple[list, list, list]:
    """(pinned link rows, offload=stream run rows, skipped rows) of the device_stream rows among ``rows``, each in
    one flat shape (the committed rows are read as they are; nothing is rewritten). Runs of other strategies in the
    same files (offload=none, group-leaf: the stock comparisons) are not stream rows; ``plan --check`` judges them
    out of sample."""
    links, runs, skipped = [], [], []
    for r in rows:
        if not is_stream_row(r):
            continue
        sc = r.get("scenario") or {}
        name, kind = r.get("name") or sc.get("name"), sc.get("kind")
        why = _why_not(r) if kind != "link" else (None if isinstance(r.get("registered_gb_s"), (int, float))
                                                  else _why_not(r) or "no pinned rate measured")
        if kind == "link":
            if why or r.get("smoke"):
                skipped.append({"scenario": name, "file": r.get("_file"), "reason": why or "smoke row"})
            else:
                links.append({"scenario": name, "file": r.get("_file"), "pinned_gbps": r["registered_gb_s"],
                              "pin_memory_gbps": r.get("pin_memory_gb_s"), "pageable_gbps": r.get("pageable_gb_s")})
            continue
        if kind not in ("run", "cli"):
            continue  # tiny-identity and the identity row check bits, not the planner's figures
        want = str(r.get("recipe") or sc.get("recipe") or "")
        if why is None and ("timings" not in r or "memory" not in r):
            why = "no timings / memory in the row"
        if why is None and offload_kind_of(want) != "stream":
            continue
        if why is not None:
            if "offload=stream" in str(sc.get("recipe", "")) or kind == "cli":
                skipped.append({"scenario": name, "file": r.get("_file"), "reason": why})
            continue
        rc = Recipe.parse(want)
        comps = (r.get("offload") or {}).get("components") or {}
        sm = r.get("stream_measured") or {}
        t, m = r["timings"], r["memory"]
        runs.append({
            "scenario": name, "file": r.get("_file"), "recipe": str(rc), "transformer": rc.transformer,
            "text_encoder_2": rc.text_encoder_2, "k": rc.stream_k, "steps": stream_row_steps_weights(r)[0],
            "height": (r.get("size") or [1024, 1024])[0], "width": (r.get("size") or [1024, 1024])[1],
            "cap_gb": r.get("cap_gb"), "device": stream_row_device(r).get("name"),
            "streamed_blocks": (comps.get("transformer") or {}).get("streamed"),
            "bytes_streamed_per_step": (r.get("offload") or {}).get("bytes_streamed_per_step"),
            "s_per_step": t["s_per_step_median"], "peak_gb": m.get("generate_peak_allocated_gb",
                                                                     m.get("peak_allocated_gb")),
            "host_peak_gb": r.get("host_peak_rss_gb") or m.get("host_peak_rss_gb"),
            "host_after_load_gb": (m.get("after_load") or {}).get("rss_gb"),
            "link_gb_s": (sm.get("transformer") or {}).get("link_gb_s"), "hoisted": row_hoisted(r)})
    return links, runs, skipped


def offload_kind_of(recipe_text: str) -> str:
    from ..plan.data import offload_kind

    return offload_kind(Recipe.parse(recipe_text)) if recipe_text else "none"


def stream_fit(rows, gpu, out) -> None:
    """offload=stream's constants from the measured device_stream rows (median over rows, nothing fitted to one
    scenario): the link use is the executor's own copy rate (bytes copied / copy time on its side stream) over the
    reference probe's pinned rate; the per-block cost (events, rebinding, unhidden copy tails) is solved per row
    against the planner's step. Each row is stored with the regime the planner puts it in (link- or compute-bound),
    so the planner marks a stream recipe measured only where its backend and regime were. Without rows the assumed
    constants stay and the planner marks every stream recipe unmeasured."""
    from ..plan.latency import compute_step, stream_regime

    links, runs, skipped = stream_rows(rows)
    st = out["stream"]
    st["skipped"] = skipped
    if links:
        st["pinned_gbps_measured"] = round(statistics.median(x["pinned_gbps"] for x in links), 2)
        st["pinned_source"] = "measured: cudaHostRegister'd host->GPU copies (" + ", ".join(
            f"{x['scenario']} {x['pinned_gbps']} GB/s ({x['file']})" for x in links) + ")"
    if not runs:
        return
    ref = out["reference_gpu"]["h2d_pinned_gbps"]
    rates = [x["link_gb_s"] for x in runs if x["link_gb_s"]]
    if rates:
        st["link_fraction_of_pinned"] = round(statistics.median(rates) / ref, 3)

    def shape(x):
        return plan.Shape(x["height"], x["width"], x["steps"], 1, 512)

    def step_at(x, per_block):
        st["per_block_s"] = per_block
        with modulation_hoisting(x["hoisted"]):
            return plan.predict("flux-dev", Recipe.parse(x["recipe"]), shape(x), gpu, "random")["step_s"]

    sols = [solve(lambda v, x=x: step_at(x, v), x["s_per_step"], 1e-7, 0.05) for x in runs]
    st["per_block_s"] = round(statistics.median(sols), 6)
    for x in runs:
        rc = Recipe.parse(x["recipe"])
        with modulation_hoisting(x["hoisted"]):
            x["regime"] = stream_regime("flux-dev", rc, gpu, compute_step("flux-dev", rc, shape(x), gpu, []))
    st["rows"] = runs
    link_note = (f"link use = the executor's measured copy rate (median {statistics.median(rates):.2f} GB/s) / the "
                 f"probe's pinned {ref} GB/s" if rates else "link use assumed")
    st["source"] = ("measured: offload=stream rows (" + ", ".join(
        f"{x['scenario']} {x['transformer']} K={x['k']} {x['s_per_step']} s/step, {x['regime']}-bound, per-block "
        f"{v * 1e3:.3f} ms" for x, v in zip(runs, sols)) + "; " + ", ".join(sorted({x["file"] for x in runs}))
        + "); " + link_note)


def source_files(cal: dict) -> list:
    """The files a calibration was fitted from (its ``source.files``), where they exist in this checkout."""
    files = [ROOT / f for f in cal.get("source", {}).get("files", [])]
    return [str(f) for f in files if f.is_file()]


def main(paths):
    out = derive(read(paths))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)} from {out['source']['summary']}")


def derive(rows, quiet: bool = False) -> dict:
    """The calibration fitted from ``rows`` (as ``read`` returns them)."""
    kind = lambda k: [r for r in rows if r.get("kind") == k]  # noqa: E731
    runs = [r for r in rows if r.get("schema") == "vramfit.run/1" and not r.get("error") and not r.get("exit_code")
            and r.get("model") == "flux-dev" and "timings" in r]
    skipped = [r for r in rows if r.get("schema") == "vramfit.bench/1" and r.get("status") != "ok"]
    bench = [r for r in rows if r.get("schema") == "vramfit.bench/1" and r.get("status") == "ok"
             and r.get("model") == "flux-dev" and (r.get("memory") or {}).get("gpu") and not speed_variant(r)]
    for r in bench:
        r["_m"] = bench_measured(r)
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

    def shape_of(r):
        q = r["request"]
        return plan.Shape(q["height"], q["width"], r.get("steps", q["steps"]), 1, q.get("max_sequence_length", 512))

    def recipe_of(r):  # compile=regional+nocdtune is plain regional compile (the default since session 10)
        rc = Recipe.parse(r["recipe"])
        return rc.with_(compile=rc.compile_scope) if rc.compile.split("+")[1:] == ["nocdtune"] else rc

    def enc_compute(r):
        s = shape_of(r)
        return t5["s"] / t5["tokens"] * s.text_tokens + clip["s"]

    def gbs(r, *comps):
        return sum(r["weight_bytes"][c] for c in comps) / 1e9

    def pick(offload, compile="off", transformer="bf16", among=None):
        return [r for r in (runs if among is None else among) if recipe_of(r).offload == offload
                and recipe_of(r).compile == compile and recipe_of(r).transformer == transformer
                and recipe_of(r).text_encoder_2 == "bf16"]

    # pipeline: warm overheads from warm bench runs (bf16 encoders, resident); what the first run of a process
    # pays on top (lazy CUDA/cuBLAS init) from the cold run records
    warm_res = [r for r in bench if r["_m"]["warm"] and recipe_of(r).offload == "none" and recipe_of(r).compile == "off"]
    warm_enc = [r for r in warm_res if recipe_of(r).text_encoder_2 == "bf16"]
    resident = pick("none") + pick("staged") + pick("none", "regional")
    load = lambda r: sum(s.get("load_s", 0) for s in r["stages"].values())  # noqa: E731
    enc_warm = statistics.median(r["_m"]["encode_s"] - enc_compute(r) for r in warm_enc)
    dec_warm = statistics.median((r["_m"]["decode_s"] - vae_cal["s_per_mpix"] * shape_of(r).mpix) / shape_of(r).mpix
                                 for r in warm_res)
    enc_cold = statistics.median(r["stages"]["encode"]["s"] - r["stages"]["encode"].get("load_s", 0) - enc_compute(r)
                                 for r in resident)
    dec_cold = statistics.median((r["stages"]["decode"]["s"] - r["stages"]["decode"].get("load_s", 0)
                                  - vae_cal["s_per_mpix"] * shape_of(r).mpix) / shape_of(r).mpix for r in resident)
    pipeline = {
        "host_base_gb": round(min(r["memory"]["host_peak_rss_gb"] for r in resident), 3),
        "encode_overhead_s": round(max(enc_warm, 0.0), 4),
        "decode_overhead_s_per_mpix": round(max(dec_warm, 0.0), 4),
        "encode_cold_extra_s": round(enc_cold - max(enc_warm, 0.0), 4),
        "decode_cold_extra_s": round((dec_cold - max(dec_warm, 0.0)) * 1.048576, 4),
        "first_step_extra_s": round(statistics.median(r["timings"]["first_step_s"] - r["timings"]["s_per_step_median"]
                                                      for r in pick("none") + pick("staged")), 4),
        "source": {"encode_overhead_s, decode_overhead_s_per_mpix":
                   f"warm bench runs, offload=none ({len(warm_res)} rows; encode: the {len(warm_enc)} with bf16 T5)",
                   "*_cold_extra_s, first_step_extra_s": "first runs of a process (run records, offload none/staged/"
                                                          "regional compile) minus the warm overheads"},
    }
    base_median = {id(r): r["timings"]["s_per_step_median"] for r in pick("none")}
    ref_eager = statistics.median(base_median.values())
    reg = pick("none", "regional")[0]
    compile_cal = {
        "regional": {"step_factor": round((reg["timings"]["s_per_step_median"] - overhead) / (ref_eager - overhead), 4),
                     "cold_s": reg["timings"]["compile_s"], "source": f"measured ({reg['_file']})"},
        "full": {"step_factor": None, "cold_s": reg["timings"]["compile_s"], "assumed": ["step_factor", "cold_s"],
                 "source": FULL_COMPILE_COLD_ASSUMED + "; speed-up assumed as regional"},
    }
    compile_cal["full"]["step_factor"] = compile_cal["regional"]["step_factor"]
    # cold start per backend family and mode, measured: the cold run's compile time (first step minus median step)
    # of every ok compiled bench row; quantized blocks compile far slower than bf16 ones (torchao: minutes)
    cold_rows: dict = {}
    for r in bench:
        rc = recipe_of(r)
        cs = (r.get("cold") or {}).get("compile_s")
        if rc.compile == "off" or cs is None:
            continue
        fam = cold_family(plan.backend_family(rc.transformer), cd_tuned(r))
        cold_rows.setdefault((rc.compile, fam), []).append((cs, r["_file"], r["scenario"]))
    for (mode, fam), vals in sorted(cold_rows.items()):
        compile_cal[mode].setdefault("cold_s_by_family", {})[fam] = {
            "s": round(statistics.median(v for v, _, _ in vals), 1),
            "source": f"measured: {', '.join(f'{n} {v:.0f} s' for v, _, n in vals)} "
                      f"({', '.join(sorted({fl for _, fl, _ in vals}))})"}
    full_rows = [v for (mode, _), vals in cold_rows.items() if mode == "full" for v in vals]
    if full_rows:
        compile_cal["full"].update(cold_s=round(statistics.median(v for v, _, _ in full_rows), 1),
                                   source="cold start measured: " + ", ".join(f"{n} {v:.0f} s" for v, _, n in full_rows)
                                   + "; speed-up assumed as regional")
    # A compiled scenario killed by its timeout says its cold start was longer than the time it had left after
    # importing, building and quantizing (~60 s on the H200): a lower bound per backend family and compile mode,
    # kept only where no compiled row of that family and mode finished.
    for r in skipped:
        rec = Recipe.parse(r["recipe"])
        m_ = re.search(r"killed after (\d+(?:\.\d+)?) s", r.get("error") or "")
        ran = (float(m_.group(1)) if r.get("exit_reason") == "timeout" and m_ else
               r.get("wall_s") if r.get("exit_reason") == "interrupted" else None)  # stopped from outside
        if rec.compile == "off" or not ran or speed_variant(r):  # a speed-path step bounds no backend's cold start
            continue
        fam = cold_family(plan.backend_family(rec.transformer), cd_tuned(r))
        if (rec.compile, fam) in cold_rows:
            continue
        bound = round(float(ran) - TIMEOUT_SETUP_S, 1)
        mins = compile_cal[rec.compile].setdefault("cold_s_min_by_family", {})
        if bound > mins.get(fam, {}).get("s", 0):
            mins[fam] = {"s": bound, "source": f"lower bound: {r['scenario']} stopped ({r['exit_reason']}) after "
                                              f"{float(ran):.0f} s ({r.get('_file', 'bench')}) minus "
                                              f"~{TIMEOUT_SETUP_S:.0f} s set-up"}

    pageable, pinned = probe["h2d_pageable_gbps"], probe["h2d_pinned_gbps"]
    m = pick("model")[0]
    sm = shape_of(m)
    enc_w, tr_w = gbs(m, "text_encoder", "text_encoder_2"), gbs(m, "transformer")
    sync = enc_w / (m["stages"]["encode"]["s"] - enc_cold - enc_compute(m))
    moves = m["timings"]["denoise_s"] - sm.steps * m["timings"]["s_per_step_median"] - pipeline["first_step_extra_s"]
    writeback = (enc_w + tr_w) / (moves - tr_w / sync)
    sq = pick("sequential")[0]
    eager_step = sum(plan.transformer_flops("flux-dev", shape_of(sq))) / bf16 / eff + overhead
    seq = gbs(sq, "transformer") / (sq["timings"]["s_per_step_median"] - eager_step)
    st = pick("staged")[0]
    offload = {
        "sync_fraction_of_pageable": round(sync / pageable, 4), "writeback_gbps": round(writeback, 3),
        "sequential_fraction_of_pageable": round(seq / pageable, 4),
        "stream_fraction_of_pinned": {"group-block": 1.0, "group-leaf": 1.0},
        "stream_unhidden": {},
        "moved_bytes_factor": {"sync": {}, "stream": {}, "sequential": {}},
        "quantize_gbps": {},
        "random_gen_gbps": round(sum(st["weight_bytes"].values()) / 1e9 / load(st), 1),
        "disk_gbps": 2.0,
        "source": {"sync, writeback": m["_file"] + " offload=model (encode stage; first step and end of denoise)",
                   "sequential": sq["_file"] + " offload=sequential",
                   "stream": "streams copy at the probe's pinned rate; stream_unhidden (the part of the shorter of "
                             "compute and copy that is not overlapped: diffusers synchronizes the host at every "
                             "group) from the bf16 group-block / group-leaf run records",
                   "moved_bytes_factor": "per backend family and move mechanism, fitted to every row that moves "
                                         "that family (see each entry); 1 = its stored bytes move like bf16 bytes",
                   "quantize_gbps": "bf16 GB quantized per second when a staged load builds a quantized component",
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
    act_factors(backends, bench, transformer, vae_cal, shape_of)
    # bench rows and run records with offload=none, one transformer backend at a time: a bench row's s/step is
    # the mean step (denoise / steps) of its warm runs -- resident, that is the step; a run record gives its median
    measured: dict = {}
    for r in bench + runs:
        rc = recipe_of(r)
        if rc.offload != "none" or rc.transformer == "bf16" or rc.transformer not in backends:
            continue
        if "_m" in r:
            if not r["_m"]["warm"]:
                continue  # a cold run's mean step carries the first step (and compilation): not the step
            step = r["_m"]["s_per_step"]
        else:
            step = r["timings"]["s_per_step_median"]
        key = "compiled" if rc.compile != "off" else "eager"
        f = factor_from(rc.transformer, step, shape_of(r), rc.compile != "off",
                        rc.compile if rc.compile != "off" else "regional")
        measured.setdefault((rc.transformer, key), []).append((f, r["_file"], rc.compile))
    for (value, key), fs in list(measured.items()):
        if key == "compiled":  # regional rows where there are any (the mode the planner picks), else full ones
            mode = "regional" if any(m == "regional" for _, _, m in fs) else fs[0][2]
            measured[(value, key)] = [x for x in fs if x[2] == mode]
            backends[value]["compiled_mode"] = mode
    for (value, key), fs in sorted(measured.items()):
        backends[value]["factor"][key] = round(statistics.median(f for f, _, _ in fs), 3)
        files = sorted({fl for _, fl, _ in fs})
        backends[value]["source"] = f"measured ({', '.join(files)}; {len(fs)} row{'s' if len(fs) > 1 else ''})"
    for twin, of in TWINS.items():
        if backends[twin]["source"] == "assumed" and backends[of]["source"] != "assumed":
            backends[twin] = {**backends[of], "source": f"as {of}: " + backends[of]["source"]}
    for value, of in LIKE.items():
        if backends[value]["source"] == "assumed" and backends[of]["source"] != "assumed":
            backends[value] = {**backends[of], "source": "assumed",
                               "basis": f"as {of} (same dequantize path; {of}: {backends[of]['source']})"}

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
        "errors": errors_from_rows(bench),
        "stream": dict(plan.data.STREAM_ASSUMED),
        "budget": {"margin": 0.05, "reserve_gb": 0.5,
                   "source": "assumed: CUDA context and allocator fragmentation outside torch's allocated bytes"},
    }

    # ---- constants solved against the planner itself (plan.predict reads this dict from here on)
    plan.data._OVERRIDE.append(out)  # plan.predict reads this dict while the constants below are solved
    try:
        h200 = plan._realize(spec)

        def predicted(r, what):
            p = plan.predict("flux-dev", recipe_of(r), shape_of(r), h200, r.get("weights", {}).get("kind", "hub"))
            return sum(p[k] for k in what) if isinstance(what, tuple) else p[what]

        def measured_of(r, what):
            if "_m" in r:
                return sum(r["_m"][k] for k in what) if isinstance(what, tuple) else r["_m"][what]
            return r["timings"][what]

        def step_target(r):  # (predicted key, measured): bench = mean step (denoise / steps), run record = median
            if "_m" in r:
                return "denoise_s", r["_m"]["denoise_s"]
            return "step_s", r["timings"]["s_per_step_median"]

        # stream_unhidden per strategy, from the bf16 run records (first run's median step)
        for o in ("group-block", "group-leaf"):
            r = pick(o)[0]
            offload["stream_unhidden"][o] = 0.0

            def f(beta, r=r, o=o):
                offload["stream_unhidden"][o] = beta
                return predicted(r, "step_s")
            offload["stream_unhidden"][o] = round(solve(f, r["timings"]["s_per_step_median"], 1e-4, 1.0), 4)

        def fit_family(mechanism, fam, targets, note):
            """targets: [(row, predicted key(s), measured value)] -> median of the per-row solutions."""
            table = offload["moved_bytes_factor"][mechanism]
            sols = []
            for r, key, meas in targets:
                def f(x):
                    table[fam] = {"factor": x, "source": "fitting"}
                    return predicted(r, key)
                sols.append((solve(f, meas, 0.05, 20.0), r))
            table[fam] = {"factor": round(statistics.median(x for x, _ in sols), 3),
                          "source": f"measured: {note} ({', '.join(sorted({r['_file'] for _, r in sols}))}; "
                                    f"{len(sols)} row{'s' if len(sols) > 1 else ''}: "
                                    + ", ".join(f"{x:.2f}" for x, _ in sols) + ")"}

        def fam_of(r, comp):
            return plan.family(getattr(recipe_of(r), comp))

        moved_rows = [r for r in bench + runs if recipe_of(r).offload in ("model", "group-block", "group-leaf")]
        stage_keys = ("encode_s", "denoise_s", "decode_s")
        for fam in FAMILIES:
            # sync moves (accelerate model offload; group-block's unstreamed T5): whole stages, warm where possible
            t = [(r, stage_keys, measured_of(r, stage_keys)) for r in moved_rows if recipe_of(r).offload == "model"
                 and fam in (fam_of(r, "text_encoder_2"), fam_of(r, "transformer"))]
            t += [(r, "encode_s", measured_of(r, "encode_s")) for r in moved_rows if recipe_of(r).offload == "group-block"
                  and fam_of(r, "text_encoder_2") == fam]
            if t:
                fit_family("sync", fam, t, "offload=model stages / group-block encode (unstreamed T5)")
        for fam in FAMILIES:
            t = []
            for r in moved_rows:
                if recipe_of(r).offload in ("group-block", "group-leaf") and fam_of(r, "transformer") == fam:
                    key, meas = step_target(r)
                    t.append((r, key, meas))
            if t:
                v = recipe_of(t[0][0]).transformer
                note = "group offload step" + ("" if backends[v]["source"] != "assumed" else
                                               f" (given the assumed compute of {v}: {backends[v].get('basis', 'assumed')})")
                fit_family("stream", fam, t, note)
        for mech in ("sync", "stream", "sequential"):
            for fam in FAMILIES:
                offload["moved_bytes_factor"][mech].setdefault(fam, {"factor": 1.0, "source": "assumed"})

        # quantize-on-load rate per family, from staged rows that build quantized components from random weights
        for fam in FAMILIES:
            t = [(r, stage_keys, measured_of(r, stage_keys)) for r in bench + runs if recipe_of(r).offload == "staged"
                 and fam in (fam_of(r, "text_encoder_2"), fam_of(r, "transformer"))]
            sols = []
            for r, key, meas in t:
                def f(x):
                    offload["quantize_gbps"][fam] = {"gbps": x, "source": "fitting"}
                    return predicted(r, key)
                sols.append((solve(f, meas, 0.01, 1000.0), r))
            if sols:
                offload["quantize_gbps"][fam] = {
                    "gbps": round(statistics.median(x for x, _ in sols), 3),
                    "source": f"measured: offload=staged stages ({', '.join(sorted({r['_file'] for _, r in sols}))})"}
        q0 = next((q["gbps"] for q in offload["quantize_gbps"].values()), 1.0)
        for fam in FAMILIES:
            offload["quantize_gbps"].setdefault(fam, {"gbps": q0, "source": "assumed"})

        stream_fit(rows, h200, out)
    finally:
        plan.data._OVERRIDE.remove(out)
    st = out["stream"]
    out["source"]["summary"] = (f"{len(rows)} rows ({len(runs)} run records, {len(bench)} bench rows ok, "
                                 f"{len(skipped)} bench rows skipped: "
                                 + ", ".join(f"{r.get('scenario')} ({r.get('exit_reason')})" for r in skipped)
                                 + f"; {len(st.get('rows', []))} offload=stream rows, {len(st.get('skipped', []))} "
                                 "stream rows skipped: "
                                 + ", ".join(f"{x['scenario']} ({x['reason'][:60]})" for x in st.get("skipped", [])
                                             if not x["reason"].startswith("left out"))
                                 + f", {sum(x['reason'].startswith('left out') for x in st.get('skipped', []))} "
                                 "left out by device_stream's time budget)")
    return out


if __name__ == "__main__":
    main(sys.argv[1:] or sorted(glob.glob(str(ROOT / "benchmarks" / "results" / "*" / "*.jsonl"))))
