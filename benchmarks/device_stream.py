"""offload=stream on the H200: the headline rows, a budget sweep against stock diffusers offload, and `generate --vram`.

    PYTHONPATH=$PWD python3 benchmarks/device_stream.py [--budget-s 600] [--only NAME,...] [--smoke]

Every scenario runs in a fresh process; where a row claims a budget the process is hard-capped first with
``torch.cuda.set_per_process_memory_fraction(budget / total)``. One JSON row per scenario is appended to
``$OUT/stream.jsonl`` (``runs/stream.jsonl`` without $OUT): a failed scenario is a row with its error, a scenario
left out for lack of time is a row saying so. Scenarios are listed by priority and run in that order while
``--budget-s`` (default 600) lasts: each has an estimate of its wall time (imports + building the full-size random
stand-in on the GPU + quantizing in host memory + steps) and is skipped, with a row, when it would not fit.

Rows (full-size FLUX.1-dev stand-in, random weights, 1024x1024, seed 0):
  link                 pinned (cudaHostRegister, as the executor pins) / pin_memory / pageable host->GPU GB/s
  tiny-identity        flux-tiny on the GPU, every backend (and bf16 + compile=regional): stream:1 vs none,
                       latents bit for bit (the CUDA path: pinned buffer, copy stream, events, block-wise quantize)
  nf4-stream-3GB       nf4 T5+transformer, offload=stream (K from the budget), vae tiling, cap 3 GB, 28 steps
                       (goal: s/step <= 1.10 x resident nf4 0.185)
  nf4-resident         the same recipe with offload=none, 28 steps: the speed reference and the identity check
                       (an "identity" row compares its latents' sha256 with nf4-stream-3GB's)
  bf16-stream-k0       bf16, offload=stream:0, 28 steps, no cap (goal: within 1.10 x of the bytes streamed per step / link
                       GB/s: 17.2 GB with the modulation hoisted, 23.8 GB before 2026-12-04)
  generate-3GB         `vramfit generate --vram 3GB` (the planner's choice) under a 3 GB cap
  generate-8GB/12GB    `vramfit generate --vram 8GB / 12GB` under those caps
  sweep-<value>-<GB>   offload=stream with K from each budget, 6 steps, for nf4 / torchao-int8wo / fp8-layerwise /
                       bf16 at 3/4/8/12/16/24 GB: one process per value (scenario sweep-<value>), built once and
                       re-attached with each budget's K, tightest first (child_sweep); a budget whose resolved
                       recipe equals the previous one's is not run again (it says so)
  stock-<value>-<how>  the best stock diffusers mechanism for budgets where stock must offload, 6 steps:
                       group-leaf (int8wo / fp8 / bf16; bnb is refused by group offload), model offload for nf4
  generate-3GB-dir     generate-3GB from the checkpoint directory device_loader.py exported (--weights DIR)
  nf4-stream-3GB-regional   nf4-stream-3GB with compile=regional (streamed + compiled at full size), cap 3 GB
  stock-bf16-group-leaf-uncapped   stock-bf16-group-leaf without a cap (is the capped row's slowdown the cap's?)
  fresh-<value>-<GB>   a sweep point (int8 / fp8 / nf4 at 3, 8 and 12 GB; bf16 at 8 and 12; then 24 / 16 / 4) in its own fresh capped
                       process, 6 steps: the host RAM peak of one budget, not the shared sweep process's upper bound

Estimated GPU wall time for everything: ~25 min (4 sweep groups of ~150 s: one build each plus ~15 s per budget;
4 stock rows ~80-100 s; 4 generate rows ~120 s; 4 headline rows ~60-110 s). With the default --budget-s 600:
link, tiny-identity, the headline rows and generate-3GB; the rest are rows saying they were left out. Use --only
(e.g. ``--only sweep-nf4,stock-nf4-model,sweep-int8``) to run the sweep in a later call.
``--smoke`` runs the same code on flux-tiny on CPU (64x64, 2 steps, no caps).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GB = 1e9
PROMPT = "a red bicycle leaning on a stone wall"
NF4 = "transformer=bnb-nf4,text_encoder_2=bnb-nf4"
VALUES = {"nf4": NF4, "int8": "transformer=torchao-int8wo,text_encoder_2=torchao-int8wo",
          "fp8": "transformer=fp8-layerwise,text_encoder_2=fp8-layerwise", "bf16": ""}
SWEEP_GB = (3, 4, 8, 12, 16, 24)


def scenarios() -> list[dict]:
    """In priority order. est_s: estimated wall seconds on the H200 (process start, build, quantize, steps)."""
    out = [
        dict(name="link", kind="link", est_s=15),
        dict(name="tiny-identity", kind="tiny", est_s=90),
        dict(name="nf4-stream-3GB", kind="run", recipe=f"{NF4},offload=stream,vae_decode=tiling", budget_gb=3,
             steps=28, est_s=110),
        dict(name="nf4-resident", kind="run", recipe=NF4, steps=28, est_s=80),
        dict(name="bf16-stream-k0", kind="run", recipe="offload=stream:0,vae_decode=tiling", steps=28, est_s=90),
        dict(name="generate-3GB", kind="cli", vram="3GB", budget_gb=3, steps=28, est_s=120),
        dict(name="generate-8GB", kind="cli", vram="8GB", budget_gb=8, steps=6, est_s=120),
        dict(name="generate-12GB", kind="cli", vram="12GB", budget_gb=12, steps=6, est_s=120),
    ]
    # one process per value, built once, every budget re-attached (child_sweep): ~60 s build + ~15 s per budget
    sweep = {v: dict(name=f"sweep-{v}", kind="sweepgroup", value=v, budgets_gb=list(SWEEP_GB), steps=6,
                     est_s=60 + 15 * len(SWEEP_GB)) for v in ("nf4", "int8", "fp8", "bf16")}
    stock = [dict(name="stock-int8-group-leaf", kind="run", recipe=VALUES["int8"] + ",offload=group-leaf,"
                  "vae_decode=tiling", budget_gb=3, steps=6, est_s=100),
             dict(name="stock-fp8-group-leaf", kind="run", recipe=VALUES["fp8"] + ",offload=group-leaf,"
                  "vae_decode=tiling", budget_gb=3, steps=6, est_s=100),
             dict(name="stock-nf4-model", kind="run", recipe=NF4 + ",offload=model,vae_decode=tiling", budget_gb=8,
                  steps=6, est_s=80),
             dict(name="stock-bf16-group-leaf", kind="run", recipe="offload=group-leaf,vae_decode=tiling",
                  budget_gb=3, steps=6, est_s=100)]
    # each value's sweep, then the stock row it is compared with where stock must offload
    stock_of = {"nf4": "stock-nf4-model", "int8": "stock-int8-group-leaf", "fp8": "stock-fp8-group-leaf",
                "bf16": "stock-bf16-group-leaf"}
    paired = [x for v in ("nf4", "int8", "fp8", "bf16") for x in (sweep[v], *[s for s in stock
                                                                               if s["name"] == stock_of[v]])]
    # the path users take: generate-3GB's planner choice loaded from a checkpoint directory (device_loader.py's
    # export, kept on a warm machine with VRAMFIT_LOADER_KEEP=1; $VRAMFIT_STREAM_WEIGHTS overrides)
    return out + paired + [
        dict(name="generate-3GB-dir", kind="cli", vram="3GB", budget_gb=3, steps=28, est_s=120, weights="dir"),
        # streamed + regional compile at full size (the tiny-identity row has bf16 + regional on flux-tiny only)
        dict(name="nf4-stream-3GB-regional", kind="run", recipe=f"{NF4},offload=stream,vae_decode=tiling,"
             "compile=regional", budget_gb=3, steps=28, est_s=200),
        # the same stock recipe without a cap: session 7's capped group-leaf rows ran 1.7x slower than session 4's
        dict(name="stock-bf16-group-leaf-uncapped", kind="run", recipe="offload=group-leaf,vae_decode=tiling",
             steps=6, est_s=100)] + [
        # a sweep point in its own fresh process (the sweep's host peak is the shared process's: an upper bound)
        dict(name=f"fresh-{v}-{gb}GB", kind="run", recipe=_stream_recipe(v, gb), budget_gb=gb, steps=6, est_s=90)
        for v, gb in (("int8", 3), ("fp8", 3), ("nf4", 3), ("int8", 12), ("fp8", 12), ("nf4", 12),
                      # the host-RAM goal above 3 GB in fresh processes (session 14 measured it only at 3 GB)
                      ("bf16", 8), ("bf16", 12), ("fp8", 8), ("int8", 8), ("nf4", 8),
                      # the rest of the sweep's budgets (session 15; nf4 at 16 / 24 GB is its 12 GB recipe)
                      ("bf16", 24), ("bf16", 16), ("fp8", 24), ("fp8", 16), ("int8", 24), ("int8", 16),
                      ("bf16", 4), ("fp8", 4), ("int8", 4), ("nf4", 4))]


# ----------------------------------------------------------------------------------------------------------
# child: one scenario in this process


def _cap(budget_gb):
    import torch

    if budget_gb and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gb * GB / total))
        return {"cap_gb": budget_gb, "cap_fraction": round(budget_gb * GB / total, 5)}
    return {"cap_gb": None}


def child_link(smoke: bool) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"error": "the link row needs CUDA (host->GPU copies)", "device": "cpu"}
    n = 256 * 2**20 if smoke else 2 * 2**30
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    out = {}

    def rate(src):
        dev.copy_(src, non_blocking=True)  # warm-up
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(5):
            dev.copy_(src, non_blocking=True)
        e.record()
        torch.cuda.synchronize()
        return round(5 * n / (s.elapsed_time(e) / 1e3) / GB, 2)

    reg = torch.empty(n, dtype=torch.uint8)
    reg.fill_(1)
    err = torch.cuda.cudart().cudaHostRegister(reg.data_ptr(), n, 0)
    out["registered_gb_s"] = rate(reg) if int(err) == 0 else f"cudaHostRegister error {int(err)}"
    torch.cuda.cudart().cudaHostUnregister(reg.data_ptr())
    out["pin_memory_gb_s"] = rate(torch.ones(n, dtype=torch.uint8).pin_memory())
    out["pageable_gb_s"] = rate(torch.ones(n, dtype=torch.uint8))
    out["bytes_per_copy"] = n
    return out


TINY_VALUES = ("bf16", "bnb-nf4", "bnb-int8", "torchao-int8wo", "torchao-fp8wo", "quanto-int8", "quanto-int4",
               "fp8-layerwise", "gguf-q4_1", "torchao-int4wo")


def child_tiny(smoke: bool) -> dict:
    """flux-tiny on the GPU, every backend: offload=stream:1 (transformer, T5 streamed) vs offload=none, latents
    compared bit for bit; plus bf16 with compile=regional. Checks the CUDA path quickly before the full-size rows."""
    import torch

    from vramfit import models, stream
    from vramfit.recipe import Recipe
    from vramfit.run import Runner, request_for

    device = torch.device("cpu" if smoke else "cuda")
    spec = models.get_model("flux-tiny")
    req = request_for(spec, PROMPT, steps=2, seed=0)
    out = {}
    cases = [(v, "") for v in TINY_VALUES if not (smoke and v == "torchao-int4wo")] + [("bf16", ",compile=regional")]
    for value, extra in cases:
        t5 = "bf16" if value.startswith("gguf") else value
        name = value + extra.replace(",", " ")
        try:
            sha = {}
            for off in ("none", "stream:1"):
                r = Runner(spec, models.resolve_weights(spec, "random"),
                           Recipe.parse(f"transformer={value},text_encoder_2={t5},offload={off}{extra}"), device,
                           progress=False)
                sha[off] = r.generate(req).record["latents"]["sha256"]
                if off != "none":
                    m = stream.measured(r.pipe)
                    pinned = r.pipe._vramfit_stream["transformer"].pinned
            out[name] = {"bit_identical": sha["none"] == sha["stream:1"], "pinned": pinned,
                         "copies": m["transformer"]["copies"], "link_gb_s": m["transformer"].get("link_gb_s")}
        except Exception as e:  # one backend failing is that backend's result, not the row's
            out[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
    return {"cases": out, "all_identical": all(v.get("bit_identical") for v in out.values())}


def _spec_and_request(smoke: bool, steps: int):
    from vramfit import models
    from vramfit.run import request_for

    spec = models.get_model("flux-tiny" if smoke else "flux-dev")
    size = 64 if smoke else 1024
    return spec, request_for(spec, PROMPT, steps=2 if smoke else steps, height=size, width=size, seed=0)


def child_run(sc: dict, smoke: bool) -> dict:
    import torch

    from vramfit import measure, models, stream
    from vramfit.recipe import Recipe
    from vramfit.run import Runner

    cap = _cap(None if smoke else sc.get("budget_gb"))
    device = torch.device("cpu" if smoke else "cuda")
    spec, req = _spec_and_request(smoke, sc["steps"])
    recipe = Recipe.parse(sc["recipe"])
    k_source = None
    if recipe.offload_kind == "stream":
        budget = sc.get("budget_gb")
        k, k_source = stream.resolve_k(recipe, spec=spec, shape=(req.height, req.width, req.steps),
                                       vram_budget_bytes=budget * GB if budget else None, gpu=None)
        recipe = recipe.with_(offload=f"stream:{k}")
    runner = Runner(spec, models.resolve_weights(spec, "random"), recipe, device, progress=False)
    res = runner.generate(req)
    rec = res.record
    row = {**cap, "recipe": rec["recipe"], "k_source": k_source, "steps": req.steps,
           "size": [req.height, req.width], "timings": rec["timings"], "memory": rec["memory"],
           "latents_sha256": rec["latents"]["sha256"], "latents_finite": rec["latents"]["finite"],
           "weight_gb_total": rec["weight_gb_total"], "device": rec["device"], "versions": rec["versions"]}
    entry = [s for s in rec["manifest"] if s["step"] == "offload"]
    if entry:
        row["offload"] = entry[0]
    # the manifest's load/quantize/vae steps: what was applied (tile_px of the decode, how each component was built)
    row["manifest"] = [s for s in rec["manifest"] if s["step"] in ("load", "quantize", "vae", "offload", "stream-park")]
    if recipe.offload_kind == "stream":
        row["stream_measured"] = stream.measured(runner.pipe)
    row["host_peak_rss_gb"] = measure.host_rss_gb().get("peak_rss_gb")
    return row


def _stream_recipe(value: str, gb: float) -> str:
    """The sweep's recipe for a value and budget: offload=stream (K from the budget), the decode tiled at <= 8 GB."""
    return ",".join(x for x in (VALUES[value], "offload=stream", "vae_decode=tiling" if gb <= 8 else "") if x)


def child_sweep(sc: dict, smoke: bool) -> dict:
    """One value at every budget of the sweep, in one process and from one build: the pipeline is built once (the
    random stand-in, quantized block by block) at the tightest budget's K under its cap; for each larger budget the
    cap is raised, the transformer's executor is detached and attached again with that budget's K (K only grows, so
    the new resident blocks join the old ones), the VAE tiling set as the recipe says, the peak counters reset,
    and one image generated. Each budget is its own row. What is shared: the build (``load_s`` is the first row's
    only) and the process (``host_peak_rss_gb`` is the process's peak so far: an upper bound for the row; the RSS
    after the re-attach is each row's own). Saves a fresh build per budget (30-60 s each on the H200)."""
    import gc

    import torch

    from vramfit import measure, models, runtime, stream
    from vramfit.recipe import Recipe
    from vramfit.run import Runner

    device = torch.device("cpu" if smoke else "cuda")
    spec, req = _spec_and_request(smoke, sc["steps"])
    budgets = sorted(sc["budgets_gb"])
    plans = []
    for gb in budgets:
        r = Recipe.parse(_stream_recipe(sc["value"], gb))
        k, k_source = stream.resolve_k(r, spec=spec, shape=(req.height, req.width, req.steps),
                                       vram_budget_bytes=gb * GB, gpu=None)
        if smoke:  # flux-tiny fits whole at every budget: K grows with the budget's index, to re-attach for real
            k, k_source = min(k, len(plans)), "smoke: K = the budget's index"
        plans.append((gb, r.with_(offload=f"stream:{k}"), k, k_source))
    rows, runner, last, shas = [], None, None, {}
    for gb, recipe, k, k_source in plans:
        name = f"sweep-{sc['value']}-{gb:g}GB"
        row = {"name": name, "scenario": {"name": name, "kind": "run", "value": sc["value"], "budget_gb": gb,
                                          "steps": sc["steps"], "recipe": _stream_recipe(sc["value"], gb)},
               "harness": "one process per value (child_sweep): built once, re-attached with each budget's K"}
        if last is not None and str(last) == str(recipe):
            row["skipped"] = f"same resolved recipe as the {rows[-1]['name']} row: not run again"
            rows.append(row)
            continue
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            row.update(_cap(None if smoke else gb))
            t0 = time.perf_counter()
            mem = measure.Memory(device)
            first = runner is None  # this row builds the pipeline (its load peak is its own)
            if first:
                runner = Runner(spec, models.resolve_weights(spec, "random"), recipe, device, progress=False)
                runner.load()
            else:
                mem.reset_peak()
                pipe = runner.pipe
                pipe._vramfit_stream["transformer"].detach()
                pipe._vramfit_stream["transformer"] = stream.attach(pipe.transformer, "transformer", device, k,
                                                                    **stream.pipe_attach_kwargs(pipe, recipe))
                if recipe.vae_decode == "tiling":
                    pipe.vae.enable_tiling()
                    runtime.set_vae_tiles(pipe.vae)
                else:
                    pipe.vae.disable_tiling()
                gc.collect()
            attach = mem.peak() if not first else {}
            row["attach_s"] = round(time.perf_counter() - t0, 2)
            row["host_rss_after_attach_gb"] = measure.host_rss_gb().get("rss_gb")
            rec = runner.generate(req).record
            m = dict(rec["memory"])
            if not first:  # the load peak of the first row does not belong to this one
                m["peak_allocated_gb"] = max(m["generate_peak_allocated_gb"], attach.get("peak_allocated_gb", 0.0))
                m["peak_reserved_gb"] = max(m["generate_peak_reserved_gb"], attach.get("peak_reserved_gb", 0.0))
                m["attach_peak_allocated_gb"] = attach.get("peak_allocated_gb")
                rec["timings"] = {**rec["timings"], "load_s": None}
            row.update({"recipe": str(recipe), "k_source": k_source, "steps": req.steps,
                        "size": [req.height, req.width], "timings": rec["timings"], "memory": m,
                        "latents_sha256": rec["latents"]["sha256"], "latents_finite": rec["latents"]["finite"],
                        "weight_gb_total": rec["weight_gb_total"], "device": rec["device"],
                        "versions": rec["versions"], "offload": {"step": "offload", "strategy": "stream", "k": k,
                                                                 "components": {c: e.describe() for c, e in
                                                                                runner.pipe._vramfit_stream.items()}},
                        "manifest": [x for x in rec["manifest"] if x["step"] in ("load", "quantize", "vae")]
                        if first else [{"step": "vae", "mode": recipe.vae_decode,
                                               **(runtime.vae_tiles(runner.pipe.vae.config)
                                                  if recipe.vae_decode == "tiling" else {})}],
                        "stream_measured": stream.measured(runner.pipe),
                        "host_peak_rss_gb": measure.host_rss_gb().get("peak_rss_gb")})
            shas[name] = rec["latents"]["sha256"]
            last = recipe
        except Exception as e:  # this budget's row carries the error
            import traceback

            row.update({"error": f"{type(e).__name__}: {e}"[:800], "traceback": traceback.format_exc()[-2000:]})
            rows.append(row)
            # out of memory while generating with the pipeline built: the next (larger) budget re-attaches and runs
            # (2026-12-02: fp8 OOM at 3 GB stopped its whole group); any other error leaves the state unknown: stop
            if not (isinstance(e, torch.OutOfMemoryError) and runner is not None and runner.pipe is not None):
                break
            row["continued"] = "out of memory in generate: the next budget re-attaches (memory freed first)"
            continue
        finally:
            gc.collect()  # outside the handler: the failed step's frames no longer hold its tensors
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    return {"rows": rows, "same_latents_across_budgets": len(set(shas.values())) <= 1 if shas else None}


def child_cli(sc: dict, smoke: bool) -> dict:
    from vramfit import cli

    cap = _cap(None if smoke else sc.get("budget_gb"))
    out_png = Path(os.environ.get("OUT", ROOT / "runs")) / f"{sc['name']}.png"
    weights = "random"
    if sc.get("weights") == "dir":
        weights = os.environ.get("VRAMFIT_STREAM_WEIGHTS") or (
            "/tmp/vramfit-loader-smoke/flux-tiny" if smoke else "/tmp/vramfit-loader/flux-dev")
        if not (Path(weights) / "model_index.json").exists():
            return {**cap, "error": f"no checkpoint at {weights} (run device_loader.py with VRAMFIT_LOADER_KEEP=1 "
                                    "first, or set VRAMFIT_STREAM_WEIGHTS)"}
    argv = ["generate", PROMPT, "--model", "flux-tiny" if smoke else "flux-dev", "--weights", weights,
            "--vram", sc["vram"], "--steps", str(2 if smoke else sc["steps"]), "--out", str(out_png),
            "--no-progress", "--json"]
    if smoke:
        argv += ["--device", "cpu", "--height", "64", "--width", "64", "--gpu", "4060"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(argv)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.startswith("{")]
    rec = json.loads(lines[-1]) if lines else {}
    return {**cap, "argv": argv, "rc": rc, "recipe": rec.get("recipe"), "timings": rec.get("timings"),
            "memory": rec.get("memory"), "latents_sha256": (rec.get("latents") or {}).get("sha256"),
            "plan": rec.get("plan"), "device": rec.get("device"), "steps": (rec.get("request") or {}).get("steps"),
            "size": [(rec.get("request") or {}).get("height"), (rec.get("request") or {}).get("width")],
            "weights": "random" if weights == "random" else "dir"}


def child(sc: dict, smoke: bool) -> dict:
    t0 = time.perf_counter()
    try:
        row = {"link": child_link, "tiny": child_tiny, "run": lambda s: child_run(sc, s),
               "cli": lambda s: child_cli(sc, s), "sweepgroup": lambda s: child_sweep(sc, s)}[
            sc["kind"]](smoke)
    except Exception as e:  # a failed scenario is a row with its error
        import traceback

        row = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    row["wall_s"] = round(time.perf_counter() - t0, 2)
    return row


# ----------------------------------------------------------------------------------------------------------
# parent: scenarios in priority order within the time budget


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=600.0, help="wall-clock budget for all scenarios")
    ap.add_argument("--only", default=os.environ.get("VRAMFIT_STREAM_ONLY", ""),
                    help="comma-separated scenario names (default: $VRAMFIT_STREAM_ONLY, as device_round.sh passes "
                         "only --budget-s)")
    ap.add_argument("--smoke", action="store_true", help="flux-tiny on CPU, no caps: checks the logic")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        sc = json.loads(args.child)
        print(json.dumps(child(sc, args.smoke)))
        return 0

    out_dir = Path(os.environ.get("OUT") or ROOT / "runs")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "stream.jsonl"
    todo = scenarios()
    if args.only:
        names = set(args.only.split(","))
        todo = [s for s in todo if s["name"] in names]
    t_start = time.perf_counter()
    done: dict[str, dict] = {}
    seen_recipes: dict[str, tuple] = {}  # resolved recipe -> (row name, its cap)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    command = f"device_stream.py {' '.join(argv or sys.argv[1:])} @ {stamp}"
    for sc in todo:
        left = args.budget_s - (time.perf_counter() - t_start)
        # the schema lets vramfit/calibration/derive.py read the row (rows written before it are known by their fields)
        row = {"schema": "vramfit.stream/1", "name": sc["name"], "scenario": sc, "command": command, "smoke": args.smoke}
        est = 10 if args.smoke else sc["est_s"]
        if est > left:
            row["skipped"] = f"left out: estimated {est} s, {left:.0f} s of --budget-s left"
        else:
            key = _resolved_key(sc, args.smoke)
            prev = seen_recipes.get(key) if key is not None else None
            cap = sc.get("budget_gb")
            if prev is not None and prev[1] is not None and (cap is None or prev[1] <= cap):
                row["skipped"] = (f"same resolved recipe as {prev[0]}, which ran capped at {prev[1]} GB: "
                                  "not run again")
            else:
                row.update(_run_child(sc, args.smoke, timeout=left))
                if key is not None and "error" not in row:
                    seen_recipes[key] = (sc["name"], cap)
        if "rows" in row:  # a sweep group: one row per budget, then the group's own summary row
            for sub in row.pop("rows"):
                sub = {"schema": "vramfit.stream/1", "command": command, "smoke": args.smoke, **sub}
                done[sub["name"]] = sub
                _append(out, sub)
                print(_line(sub), flush=True)
        done[sc["name"]] = row
        _append(out, row)
        print(_line(row), flush=True)
    a, b = done.get("nf4-resident", {}), done.get("nf4-stream-3GB", {})
    if a.get("latents_sha256") and b.get("latents_sha256"):
        row = {"schema": "vramfit.stream/1", "name": "identity-nf4", "command": command, "smoke": args.smoke,
               "resident": a["latents_sha256"], "stream": b["latents_sha256"],
               "bit_identical": a["latents_sha256"] == b["latents_sha256"]}
        _append(out, row)
        print(_line(row), flush=True)
    print(json.dumps({"out": str(out), "rows": len(done), "wall_s": round(time.perf_counter() - t_start, 1)}))
    return 0


def _resolved_key(sc: dict, smoke: bool):
    """Stream rows whose K from the budget resolves to a recipe already run (e.g. all resident at 16 and 24 GB) are
    the same run; a larger cap does not change s/step once the recipe fits a smaller one."""
    if sc["kind"] != "run" or "offload=stream" not in sc.get("recipe", ""):
        return None
    from vramfit import models, stream
    from vramfit.recipe import Recipe

    spec, req = _spec_and_request(smoke, sc["steps"])
    r = Recipe.parse(sc["recipe"])
    try:
        k, _ = stream.resolve_k(r, spec=spec, shape=(req.height, req.width, req.steps),
                                vram_budget_bytes=sc["budget_gb"] * GB, gpu=None)
    except Exception:
        return None
    # steps are left out: s/step is what the rows compare, and a 28-step headline row covers a 6-step sweep row
    return str(r.with_(offload=f"stream:{k}", vae_decode="none"))


def _run_child(sc: dict, smoke: bool, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(sc)] + (["--smoke"] if smoke else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(5.0, timeout), env=env)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-1500:]
        return {"error": f"killed after {timeout:.0f} s (--budget-s)",
                "stderr_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"error": f"exit {p.returncode}", "stderr_tail": p.stderr[-3000:]}
    return json.loads(lines[-1])


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _line(row: dict) -> str:
    if "skipped" in row:
        return f"{row['name']:24s} skipped: {row['skipped']}"
    if "error" in row:
        return f"{row['name']:24s} ERROR {row['error']}"
    t, m = row.get("timings") or {}, row.get("memory") or {}
    if row.get("name") == "link":
        return f"{'link':24s} " + ", ".join(f"{k} {v}" for k, v in row.items() if k.endswith("gb_s"))
    if "cases" in row:
        return f"{row['name']:24s} all_identical={row['all_identical']} " + ", ".join(
            f"{k}: {v.get('bit_identical', v.get('error'))}" for k, v in row["cases"].items())
    if "same_latents_across_budgets" in row:
        return f"{row['name']:24s} same_latents_across_budgets={row['same_latents_across_budgets']}"
    if "bit_identical" in row:
        return f"{row['name']:24s} bit_identical={row['bit_identical']}"
    sm = row.get("stream_measured", {}).get("transformer", {})
    return (f"{row['name']:24s} {t.get('s_per_step_median')} s/step  peak {m.get('peak_reserved_gb')} GB reserved  "
            f"host {row.get('host_peak_rss_gb') or m.get('host_peak_rss_gb')} GB  load {t.get('load_s')} s  "
            f"{row.get('recipe')}" + (f"  link {sm.get('link_gb_s')} GB/s" if sm else ""))


if __name__ == "__main__":
    sys.exit(main())
