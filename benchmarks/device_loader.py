"""Issue 13/9 on the H200: every backend loaded from a full-size checkpoint (`--weights DIR`) vs the random stand-in,
and `vramfit code` programs vs `vramfit generate` on the same checkpoint.

Run (GPU machine, from the repo root):
    PYTHONPATH=$PWD python3 benchmarks/device_loader.py [--budget-s 480] [--work /tmp/vramfit-loader]
    PYTHONPATH=$PWD python3 benchmarks/device_loader.py --pytest    # the GPU tests, matrix counts -> $OUT
    PYTHONPATH=$PWD python3 benchmarks/device_loader.py --smoke     # the same code on flux-tiny, CPU

Steps: `vramfit export flux-dev --weights random --out WORK/flux-dev` (33 GB, built in host memory with values drawn
on the GPU), `vramfit export-gguf flux-dev --weights WORK/flux-dev --type q4_1` (skipped with a row when it passes
90 s), then scenarios in priority order, each a fresh `vramfit generate ... --steps 4 --json` subprocess at
1024x1024 (memory after load, peak incl. load, median s/step, load time), DIR and random back to back so each pair
gets a "compare" row (the stand-in's promise: memory and s/step within a few %; load time differs and is not
compared). `code:` rows run the program `vramfit code` prints on the exported checkpoint in a fresh interpreter;
measurement is added from outside (FluxPipeline.__call__ wrapped to time steps with a callback, CUDA memory stats),
the program itself is unchanged. Only the transformer and T5 carry the backend (GGUF: transformer only).

Environment (for device calls): VRAMFIT_LOADER_ONLY / _SKIP / _DIR_FIRST (see --help); VRAMFIT_LOADER_REUSE=1 reuses
an export left in --work by an earlier call on the same warm machine, VRAMFIT_LOADER_KEEP=1 leaves it there;
VRAMFIT_LOADER_CODE_REPEAT=N alternates the code/generate pairs N times (group offload varies ~5 % run to run).

When --budget-s (default 480 s) is spent, no new scenario starts: each one left writes a "not run: time" row.
Rows: one JSON object per line in $OUT/device_loader.jsonl (`kind`: export | export-gguf | generate | code |
compare | skipped).

Estimated GPU wall time: export ~60-90 s, export-gguf <= 90 s, each generate row ~25-40 s (about 10 s of imports,
load from the page cache, 4 steps, decode): with the default budget about 10-12 scenario rows run, the rest
are "not run: time" rows. `--pytest`: about 3-5 minutes (160 matrix cells on flux-tiny plus the older GPU tests).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red fox in the snow, photograph"

# (name, recipe) in priority order: first the three backends that failed from a checkpoint on the H200, then the
# vramfit-code comparison of issue 9, then the rest with offload=none, then offload=model.
BACKENDS = [
    ("torchao-int8wo", "transformer=torchao-int8wo,text_encoder_2=torchao-int8wo"),
    ("quanto-int8", "transformer=quanto-int8,text_encoder_2=quanto-int8"),
    ("torchao-fp8dq", "transformer=torchao-fp8dq,text_encoder_2=torchao-fp8dq"),
    ("nf4", "transformer=bnb-nf4,text_encoder_2=bnb-nf4"),
    ("bnb-int8", "transformer=bnb-int8,text_encoder_2=bnb-int8"),
    ("fp8-layerwise", "transformer=fp8-layerwise"),  # transformer only (T5 stays bf16)
    ("torchao-fp8wo", "transformer=torchao-fp8wo,text_encoder_2=torchao-fp8wo"),
    ("torchao-int4wo", "transformer=torchao-int4wo,text_encoder_2=torchao-int4wo"),
    ("quanto-fp8", "transformer=quanto-fp8,text_encoder_2=quanto-fp8"),
    ("gguf-q4_1", "gguf"),  # the export-gguf file with --gguf
]
CODE_RECIPES = ["nf4+model-offload", "fp8-layerwise+group-offload"]


def plan(smoke: bool) -> list[dict]:
    """The ordered scenario list: DIR then random of each (backend, offload), code rows after the first three."""
    offloads = ["none"] if smoke else ["none", "model"]
    code_recipes = ["fp8-layerwise"] if smoke else CODE_RECIPES  # CPU: no offload to a GPU
    out = []
    for offload in offloads:
        for i, (name, recipe) in enumerate(BACKENDS):
            for weights in ("dir", "random"):
                out.append({"kind": "generate", "name": name, "recipe": recipe, "offload": offload, "weights": weights})
            if offload == "none" and i == 2:
                for r in code_recipes:
                    out.append({"kind": "code", "name": r, "recipe": r, "offload": None, "weights": "dir"})
                    out.append({"kind": "generate", "name": r, "recipe": r, "offload": None, "weights": "dir",
                                "pair_of": "code"})
    if smoke:  # CPU: only what runs on CPU (no bnb quantize-on-load, no CUDA-only torchao, no offload to a GPU)
        cpu_ok = {"torchao-int8wo", "quanto-int8", "fp8-layerwise", "gguf-q4_1"}
        out = [s for s in out if s["name"] in cpu_ok]
    return out


class Rows:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, row: dict) -> dict:
        row = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **row}
        with self.path.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k not in ("stderr_tail", "manifest")}, default=str),
              flush=True)
        return row


def sh(cmd: list[str], timeout: float, env=None) -> tuple[int, str, str, float]:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        return p.returncode, p.stdout, p.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        return 124, out, err, time.perf_counter() - t0


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "vramfit.cli", *args]


class _Timeout(Exception):
    pass


def run_inprocess(args: list[str], timeout: float) -> tuple[int, str, str, float, dict]:
    """``vramfit.cli.main(args)`` in this process (the same code as the ``vramfit generate`` command, without the
    15-20 s of a new interpreter: imports, CUDA context, teardown). stdout/stderr are captured; afterwards every
    reference is dropped, ``gc.collect()`` and ``empty_cache()`` run, and the CUDA memory still allocated is
    returned (``leftover_gb``: a leak would show there and in the next row's memory after load). A row that
    passes ``timeout`` is interrupted (SIGALRM) and reported as code 124."""
    import contextlib
    import gc
    import io
    import signal
    import traceback

    import torch

    from vramfit import cli as vcli

    def alarm(*_):
        raise _Timeout(f"row passed {timeout:.0f} s")

    before = torch.cuda.memory_allocated() / 1e9 if torch.cuda.is_available() else 0.0
    out, err = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(max(1, int(timeout)))
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = vcli.main(args)
    except _Timeout:
        code = 124
        err.write(traceback.format_exc())
    except BaseException:  # noqa: BLE001 - a crash is this row's error, the next row still runs
        code = 1
        err.write(traceback.format_exc())
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    wall = time.perf_counter() - t0
    gc.collect()  # outside the except: the traceback no longer holds the pipeline
    mem = {"allocated_before_gb": round(before, 3)}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        mem["leftover_gb"] = round(torch.cuda.memory_allocated() / 1e9, 3)
    return code, out.getvalue(), err.getvalue(), wall, mem


def generate_row(s: dict, a, model: str, ckpt: Path, gguf: Path | None, timeout: float) -> dict:
    recipe = s["recipe"]
    args = ["generate", PROMPT, "--model", model, "--steps", str(a.steps), "--height", str(a.size), "--width",
            str(a.size), "--device", a.device, "--no-progress", "--json", "--out", str(Path(a.work) / "img.png")]
    if recipe == "gguf":
        if gguf is None:
            return {"status": "skipped", "reason": "no GGUF file (export-gguf skipped or failed)"}
        args += ["--gguf", str(gguf)]
        recipe = ""
    if s["offload"] and s["offload"] != "none":
        recipe = ",".join(x for x in (recipe, f"offload={s['offload']}") if x)
    if recipe:
        args += ["--recipe", recipe]
    args += ["--weights", str(ckpt) if s["weights"] == "dir" else "random"]
    if a.inprocess:
        code, out, err, wall, harness = run_inprocess(args, timeout)
        harness["harness"] = "in-process vramfit.cli.main (host_peak_rss_gb is this process's peak so far)"
    else:
        code, out, err, wall = sh(cli(*args), timeout)
        harness = {"harness": "subprocess"}
    row = {"command": "vramfit " + " ".join(args), "wall_s": round(wall, 1), "rc": code, **harness}
    if code != 0:
        return {**row, "status": "error" if code != 124 else "timeout", "stderr_tail": err[-2000:]}
    rec = json.loads(out.strip().splitlines()[-1])
    m, t = rec["memory"], rec["timings"]
    pq = [x for x in rec["manifest"] if x["step"] == "pipeline-quantization"]
    return {**row, "status": "ok", "recipe_run": rec["recipe"],
            "after_load_gb": m["after_load"].get("allocated_gb"), "after_load_reserved_gb": m["after_load"].get(
                "reserved_gb"), "peak_gb": m["peak_allocated_gb"], "generate_peak_gb": m["generate_peak_allocated_gb"],
            "peak_reserved_gb": m["peak_reserved_gb"], "host_peak_rss_gb": m["host_peak_rss_gb"],
            "s_per_step_median": t["s_per_step_median"], "s_per_step": t["s_per_step"], "load_s": t["load_s"],
            "pipeline_quantization": pq[0]["form"] if pq else None, "weight_gb_total": rec["weight_gb_total"],
            "manifest": rec["manifest"]}


# measurement from outside the printed program: nothing in the program changes
CODE_BOOT = r"""
import json, runpy, sys, time, torch, diffusers
t0 = time.perf_counter()
m = {}
orig = diffusers.FluxPipeline.__call__
def call(self, *a, **kw):
    dev = torch.cuda.is_available()
    if dev: torch.cuda.synchronize()
    m["load_s"] = round(time.perf_counter() - t0, 3)
    if dev:
        m["after_load_gb"] = round(torch.cuda.memory_allocated() / 1e9, 3)
        m["after_load_reserved_gb"] = round(torch.cuda.memory_reserved() / 1e9, 3)
        torch.cuda.reset_peak_memory_stats()
    times = []
    def cb(p, i, t, k):
        if dev: torch.cuda.synchronize()
        times.append(time.perf_counter()); return {}
    kw["callback_on_step_end"] = cb
    t1 = time.perf_counter()
    out = orig(self, *a, **kw)
    steps = [b - a_ for a_, b in zip([t1] + times[:-1], times)]
    steady = sorted(steps[1:]) or steps
    m["step_s"] = [round(x, 4) for x in steps]
    m["s_per_step_median"] = round(steady[len(steady) // 2], 4)
    if dev:
        m["generate_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    return out
diffusers.FluxPipeline.__call__ = call
sys.modules["vramfit"] = None  # the program must not need vramfit
runpy.run_path(sys.argv[1], run_name="__main__")
print(json.dumps(m))
"""


def code_row(s: dict, a, model: str, ckpt: Path, timeout: float) -> dict:
    prog = Path(a.work) / f"code-{s['name'].replace('+', '_')}.py"
    args = ["code", s["recipe"], "--model", model, "--weights", str(ckpt), "--steps", str(a.steps), "--height",
            str(a.size), "--width", str(a.size), "--prompt", PROMPT, "--device", a.device, "--image",
            str(Path(a.work) / "code.png"), "--out", str(prog)]
    code, out, err, _ = sh(cli(*args), 120)
    if code != 0:
        return {"status": "error", "stage": "vramfit code", "stderr_tail": err[-2000:]}
    code, out, err, wall = sh([sys.executable, "-c", CODE_BOOT, str(prog)], timeout)
    row = {"command": "vramfit " + " ".join(args) + f" && python {prog.name}", "wall_s": round(wall, 1), "rc": code,
           "program": prog.read_text()}
    if code != 0:
        return {**row, "status": "error" if code != 124 else "timeout", "stderr_tail": err[-2000:]}
    return {**row, "status": "ok", **json.loads(out.strip().splitlines()[-1])}


def _fingerprint(module) -> dict:
    """What could make two loads of the same quantized transformer run at different speeds: per module its class,
    hooks (accelerate ``_hf_hook``, forward pre/post hooks), and per parameter dtype/device/stride/contiguity and
    bitsandbytes' quant-state fields."""
    fp = {}
    for name, m in module.named_modules():
        d = {"class": type(m).__name__, "hf_hook": type(getattr(m, "_hf_hook", None)).__name__,
             "pre_hooks": len(m._forward_pre_hooks), "hooks": len(m._forward_hooks),
             "forward_overridden": "forward" in vars(m)}
        for k in ("compute_dtype", "compute_type_is_set", "threshold", "has_fp16_weights"):
            if hasattr(m, k):
                d[k] = str(getattr(m, k))
        if hasattr(m, "state") and hasattr(m.state, "threshold"):
            d["state"] = {k: str(getattr(m.state, k, None)) for k in ("threshold", "has_fp16_weights", "is_training")}
        for pn, p in m.named_parameters(recurse=False):
            q = {"type": type(p).__name__, "dtype": str(p.dtype), "device": str(p.device), "shape": tuple(p.shape),
                 "stride": tuple(p.stride()), "contiguous": p.is_contiguous()}
            qs = getattr(p, "quant_state", None)
            if qs is not None:
                q["qs"] = {"dtype": str(qs.dtype), "blocksize": qs.blocksize, "quant_type": qs.quant_type,
                           "shape": tuple(qs.shape), "absmax": str(qs.absmax.dtype), "nested": qs.nested,
                           "code_device": str(qs.code.device) if qs.code is not None else None}
            for k in ("SCB", "CB"):
                if getattr(p, k, None) is not None:
                    q[k] = (str(getattr(p, k).dtype), tuple(getattr(p, k).shape))
            d["p." + pn] = q
        fp[name] = d
    return fp


def bnb_diag(a, rows, model: str, ckpt: Path) -> None:
    """Issue 13: bitsandbytes from a checkpoint ran 18-19 % slower per step than the same recipe on the random
    stand-in (H200, 2026-12-01) with equal memory. Both loads side by side in this process: module fingerprints
    diffed, and one 2-step generate of each profiled (CUDA kernel time by kernel, CPU time by op)."""
    import gc

    import torch
    from torch.profiler import ProfilerActivity, profile

    from vramfit import cli as vcli
    from vramfit import models
    from vramfit.run import Runner, request_for

    spec = models.get_model(model)
    req = request_for(spec, PROMPT, steps=2, height=a.size, width=a.size)
    fps, prof_rows = {}, {}
    for value in a.diag.split(","):
        for wname in ("dir", "random"):
            t0 = time.perf_counter()
            try:
                weights = models.resolve_weights(spec, str(ckpt) if wname == "dir" else "random")
                recipe = vcli.resolve_recipe(f"transformer={value},text_encoder_2={value}", weights)
                r = Runner(spec, weights, recipe, torch.device(a.device), progress=False)
                r.load()
                fps[(value, wname)] = _fingerprint(r.pipe.transformer)
                r.generate(req)  # warm
                times = []
                for _ in range(2):
                    res = r.generate(req)
                    times.append(res.record["timings"]["s_per_step"])
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    r.generate(req)
                ev = prof.key_averages()
                cuda = sorted(ev, key=lambda e: -getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)))
                cpu = sorted(ev, key=lambda e: -e.self_cpu_time_total)
                prof_rows[(value, wname)] = {
                    "s_per_step": times,
                    "top_cuda": [(e.key[:90], e.count, round(getattr(e, "device_time_total",
                                                                     getattr(e, "cuda_time_total", 0)) / 1e3, 2))
                                 for e in cuda[:14]],
                    "top_cpu_self": [(e.key[:90], e.count, round(e.self_cpu_time_total / 1e3, 2)) for e in cpu[:14]],
                    "device_self_ms_total": round(sum(getattr(e, "self_device_time_total", 0) or 0 for e in ev) / 1e3,
                                                  1),
                    "cpu_self_ms_total": round(sum(e.self_cpu_time_total for e in ev) / 1e3, 1),
                    "kernels": sum(e.count for e in ev if getattr(e, "device_type", None) is not None
                                   and str(getattr(e, "device_type", "")).endswith("CUDA")),
                    "load_s": round(time.perf_counter() - t0, 1)}
                r.close()
                del r, res
            except Exception as e:  # noqa: BLE001 - the diagnosis is a row either way
                prof_rows[(value, wname)] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
            gc.collect()
            torch.cuda.empty_cache()
        fa, fb = fps.get((value, "dir")), fps.get((value, "random"))
        diffs = []
        if fa and fb:
            for name in sorted(set(fa) | set(fb)):
                da, db = fa.get(name), fb.get(name)
                if da != db:
                    keys = sorted(set(da or {}) | set(db or {}))
                    diffs.append({"module": name, **{k: [(da or {}).get(k), (db or {}).get(k)] for k in keys
                                                     if (da or {}).get(k) != (db or {}).get(k)}})
        rows.add({"kind": "diag", "what": f"{value}: --weights DIR (a) vs random (b), one process",
                  "modules_differing": len(diffs), "first_diffs": diffs[:12],
                  "a": prof_rows.get((value, "dir")), "b": prof_rows.get((value, "random"))})


def pct(a, b):
    if a is None or b is None or not b:
        return None
    return round(100.0 * (a - b) / b, 2)


def compare(rows: Rows, a_row: dict, b_row: dict, what: str) -> None:
    keys = ("after_load_gb", "generate_peak_gb", "s_per_step_median")
    rows.add({"kind": "compare", "what": what, **{f"{k}_diff_pct": pct(a_row.get(k), b_row.get(k)) for k in keys},
              **{f"{k}_a": a_row.get(k) for k in keys}, **{f"{k}_b": b_row.get(k) for k in keys},
              "load_s_a": a_row.get("load_s"), "load_s_b": b_row.get("load_s")})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="flux-tiny on CPU, a few rows (tests the script here)")
    ap.add_argument("--pytest", action="store_true", help="run the GPU tests (pytest -m gpu tests/test_gpu.py)")
    ap.add_argument("--budget-s", type=float, default=480.0)
    ap.add_argument("--work", default=None, help="scratch directory for the checkpoints (not $OUT: 40 GB)")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--skip", default=os.environ.get("VRAMFIT_LOADER_SKIP", ""),
                    help="comma-separated NAME:OFFLOAD[:dir|random] rows measured in an earlier call ('code': the "
                         "vramfit code rows)")
    ap.add_argument("--dir-first", action="store_true", default=bool(os.environ.get("VRAMFIT_LOADER_DIR_FIRST")),
                    help="order: code rows, every --weights DIR row, then the random-weight pairs")
    ap.add_argument("--only", default=os.environ.get("VRAMFIT_LOADER_ONLY", ""),
                    help="comma-separated scenario names (a backend name, a code recipe, or 'code' for the vramfit "
                         "code rows and their generate pairs); default: all")
    ap.add_argument("--phase", choices=("all", "export", "rows"), default="all",
                    help="export: only the checkpoints (kept for a later call); rows: reuse them (no export)")
    ap.add_argument("--subprocess", dest="inprocess", action="store_false",
                    default=not os.environ.get("VRAMFIT_LOADER_SUBPROCESS"),
                    help="each generate row in a fresh `vramfit generate` process (default: in this process)")
    ap.add_argument("--diag", default=os.environ.get("VRAMFIT_LOADER_DIAG", ""),
                    help="comma-separated backend values to diagnose DIR vs random side by side before the rows")
    ap.add_argument("--order", default=os.environ.get("VRAMFIT_LOADER_ORDER", ""), choices=("", "model-first"),
                    help="model-first: the offload=model pairs first (quanto-fp8 last), then offload=none")
    a = ap.parse_args()
    out = Path(a.out)
    if a.pytest:
        env = {**os.environ, "VRAMFIT_MATRIX_JSON": str(out / "gpu_matrix.json"), "PYTHONPATH": str(ROOT)}
        p = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                            "tests/test_gpu.py"], cwd=ROOT, env=env)
        return p.returncode
    model = "flux-tiny" if a.smoke else "flux-dev"
    a.device, a.steps = ("cpu", 2) if a.smoke else ("cuda", 4)
    a.size = 128 if a.smoke else 1024
    a.work = a.work or ("/tmp/vramfit-loader-smoke" if a.smoke else "/tmp/vramfit-loader")
    work = Path(a.work)
    ckpt = work / model
    reuse = (bool(os.environ.get("VRAMFIT_LOADER_REUSE")) or a.phase == "rows") and (ckpt / "model_index.json").exists()
    if work.exists() and not reuse:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    rows = Rows(out / "device_loader.jsonl")
    t_start = time.perf_counter()

    def left() -> float:
        return a.budget_s - (time.perf_counter() - t_start)

    if reuse:  # a warm machine still holds the export of an earlier call (same command, same seed)
        code, err, wall = 0, "", 0.0
    else:
        code, _, err, wall = sh(cli("export", model, "--weights", "random", "--out", str(ckpt)), max(60.0, left()))
    rows.add({"kind": "export", "model": model, "status": ("reused" if reuse else "ok") if code == 0 else "error",
              "wall_s": round(wall, 1),
              "bytes": sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) if ckpt.exists() else None,
              **({"stderr_tail": err[-2000:]} if code else {})})
    if code != 0:
        return 1
    scenarios = plan(a.smoke)
    if a.phase == "export":
        scenarios = [sc for sc in scenarios if sc["recipe"] == "gguf"][:1]  # the GGUF file too, then stop
    if a.only:
        keep = set(a.only.split(","))
        scenarios = [sc for sc in scenarios if sc["name"] in keep
                     or ("code" in keep and (sc["kind"] == "code" or sc.get("pair_of") == "code"))]
    if a.skip:  # NAME:OFFLOAD[:dir|random] measured in an earlier call
        skip = [x.split(":") for x in a.skip.split(",") if x]
        if ["code"] in skip:  # the vramfit code rows and their generate pairs
            scenarios = [sc for sc in scenarios if sc["kind"] != "code" and sc.get("pair_of") != "code"]
        scenarios = [sc for sc in scenarios if not any(
            sc["name"] == k[0] and sc["offload"] == k[1] and (len(k) < 3 or sc["weights"] == k[2]) for k in skip)]
    if a.dir_first:  # the real path first: code rows, then every DIR row, then the random pairs
        rank = {("code", None): 0, ("dir", "none"): 1, ("dir", "model"): 2, ("random", "none"): 3,
                ("random", "model"): 4}
        scenarios.sort(key=lambda sc: 0 if sc["kind"] == "code" or sc.get("pair_of") == "code"
                       else rank[(sc["weights"], sc["offload"])])
    if a.order == "model-first":
        scenarios.sort(key=lambda sc: (sc["offload"] != "model", sc["name"] == "quanto-fp8"))
    repeat = int(os.environ.get("VRAMFIT_LOADER_CODE_REPEAT", "1"))
    if repeat > 1:  # code/generate pairs alternated `repeat` times (group offload's s/step varies from run to run)
        pair = [sc for sc in scenarios if sc["kind"] == "code" or sc.get("pair_of") == "code"]
        rest = [sc for sc in scenarios if sc not in pair]
        scenarios = [dict(sc, repeat=i) for i in range(repeat) for sc in pair] + rest
    gguf = work / "transformer-q4_1.gguf"
    if reuse and gguf.exists():
        pass
    elif any(sc["recipe"] == "gguf" for sc in scenarios):
        code, _, err, wall = sh(cli("export-gguf", model, "--weights", str(ckpt), "--type", "q4_1", "--out",
                                    str(gguf)), 90.0)
        if code == 124:
            rows.add({"kind": "skipped", "what": "export-gguf q4_1", "reason": "export-gguf took more than 90 s",
                      "wall_s": round(wall, 1)})
            gguf = None
        else:
            rows.add({"kind": "export-gguf", "status": "ok" if code == 0 else "error", "wall_s": round(wall, 1),
                      **({"stderr_tail": err[-2000:]} if code else {"bytes": gguf.stat().st_size})})
            gguf = gguf if code == 0 else None
    else:
        gguf = None

    if a.phase == "export":
        return 0  # the checkpoints stay in --work for the rows phase
    if a.diag:
        bnb_diag(a, rows, model, ckpt)
    done: dict = {}
    for s in scenarios:
        key = (s["kind"], s["name"], s["offload"], s["weights"])
        if left() <= 0:
            rows.add({**s, "kind": "skipped", "scenario_kind": s["kind"], "status": "not run: time",
                      "budget_s": a.budget_s})
            continue
        timeout = min(300.0, max(30.0, left() + 60))  # a started scenario may overrun the budget by a minute
        r = code_row(s, a, model, ckpt, timeout) if s["kind"] == "code" else \
            generate_row(s, a, model, ckpt, gguf, timeout)
        done[key] = rows.add({**s, "model": model, **r})
        if s["kind"] == "generate" and s.get("pair_of") is None:  # the pair's second row, in either order
            d = done.get(("generate", s["name"], s["offload"], "dir"))
            rnd = done.get(("generate", s["name"], s["offload"], "random"))
            if d and rnd and d.get("status") == "ok" and rnd.get("status") == "ok":
                compare(rows, d, rnd, f"{s['name']} offload={s['offload']}: DIR (a) vs random (b)")
        if s.get("pair_of") == "code":
            c = done.get(("code", s["name"], None, "dir"))
            if c and c.get("status") == "ok" and r.get("status") == "ok":
                compare(rows, c, r, f"{s['name']}: vramfit code program (a) vs vramfit generate (b), --weights DIR")
    if not os.environ.get("VRAMFIT_LOADER_KEEP"):  # keep: a next call on the same warm machine reuses the export
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
