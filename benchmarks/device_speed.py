"""Issue #12 on the H200, one call: the fastest FLUX.1-dev end to end, a step cache, and the compile cache's cold start.

    bash benchmarks/device_round.sh speed:330                                  # device call, carry [".whl"]
    PYTHONPATH=$PWD python3 benchmarks/device_speed.py --budget-s 330          # or directly; rows -> $OUT/speed.jsonl
    PYTHONPATH=$PWD python benchmarks/device_speed.py --smoke --out /tmp/speed  # the same code on flux-tiny, CPU

Every scenario is a fresh process (``vramfit.bench``'s child: load, one cold run, ``repeats`` warm runs, fidelity of
the image and latents against the uncompiled bf16 run of the same seed), its inductor/Triton caches empty. Full
size: flux-dev stand-in, 1024x1024, 28 steps, 3 warm runs (median), seed 0. In order, each only if its estimate
fits what is left of ``--budget-s`` (else a row "not-run: budget" saying so):

1. ``bf16``                 bf16 eager: the baseline and the fidelity reference                       (~45 s)
2. ``fast-cold``            the fastest no-cache candidate (fp8 dynamic per-row, fused QKV, regional compile +
                            CUDA graphs), with an EMPTY compile cache: its cold start is the uncached one (~240 s)
3. ``taylorseer``           bf16 eager + ``cache=taylorseer:4`` (fixed interval: the speed is the real model's;
                            fidelity against bf16 = the uncached run of the same recipe)               (~40 s)
4. ``fast-cached``          the same recipe as 2 in a new process WITH the cache 2 saved: the cached cold start
                                                                                                       (~80 s)
5. ``profile``              torch.profiler over 3 warm steps of the fastest row so far: kernel time per step in
                            linear / attention / other (name-based classes, stated in the row)         (~60 s)
6. more candidates while budget remains: per-tensor fp8 (``torchao-fp8dq-tensor``), cuDNN attention, and the
   flux-fast-style anchor (``compile=full+autotune+graphs``, fullgraph max-autotune: est. > 600 s, the 10-minute
   command limit -- a row with that reason unless the budget allows it).

Estimated GPU time: ~705 s for 1-5, more than one 10-minute command: fast-cold alone measured ~480 s on 2026-12-02
(49 s load, 364 s compile), so run it in two calls on one warm machine, the second keeping the first's cache:
    VRAMFIT_SPEED_ONLY=fast-cold bash benchmarks/device_round.sh speed:560
    VRAMFIT_SPEED_KEEP=1 VRAMFIT_SPEED_ONLY=fast-cached,taylorseer,profile bash benchmarks/device_round.sh speed:300
(the budget cuts what does not fit, with a row saying so).
Rows: ``$OUT/speed.jsonl`` (bench rows + ``speed`` fields: role, x vs bf16 eager, cache kind), the profile
row in the same file, and a summary table on stdout with the JSON summary as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vramfit import bench  # noqa: E402

FAST = "transformer=torchao-fp8dq,fuse_qkv=on,compile=regional+graphs"
# measured before (3.16 s warm, 170 s compile): used in FAST's place when FAST fails (fused QKV / CUDA graphs untried)
FALLBACK = "transformer=torchao-fp8dq,compile=regional"
FULL = [  # (name, recipe, role, est_s on the H200, note)
    ("bf16", "bf16", "baseline", 45, "bf16 eager, no compile: the baseline and the fidelity reference"),
    # 2026-12-02 (session 8): load 49 s + first-step compile 364 s, then ~0.105 s/step: ~480 s with 3 warm runs
    ("fast-cold", FAST, "candidate+cold-uncached", 480,
     "fastest no-cache candidate; empty compile cache: its cold start is the uncached one"),
    ("taylorseer", "cache=taylorseer:4", "cache", 40,
     "TaylorSeer lite, interval 4 (fixed schedule: speed independent of the weights)"),
    ("fast-cached", FAST, "cold-cached", 80, "same recipe as fast-cold, new process, with the cache fast-cold saved"),
    ("profile", None, "profile", 60, "torch.profiler breakdown of the fastest row"),
    ("fp8-tensor", "transformer=torchao-fp8dq-tensor,fuse_qkv=on,compile=regional+graphs", "candidate", 240,
     "per-tensor fp8 scales (flux-fast's default) instead of per-row"),
    ("fast-cudnn", FAST + ",attention=_native_cudnn", "candidate", 240, "cuDNN SDPA (no FA3 wheel here)"),
    ("flux-fast-anchor", "transformer=torchao-fp8dq-tensor,fuse_qkv=on,compile=full+autotune+graphs", "anchor", 900,
     "flux-fast style: fp8dq per-tensor, fused QKV, fullgraph max-autotune + CUDA graphs, inductor flags"),
]
SMOKE = [  # the same roles on flux-tiny, CPU (graphs/fp8dq/autotune cannot run there: their CPU stand-ins)
    ("bf16", "bf16", "baseline", 40, ""),
    ("fast-cold", "fuse_qkv=on,compile=regional", "candidate+cold-uncached", 400, "CPU stand-in of the fast recipe"),
    ("taylorseer", "cache=taylorseer:2", "cache", 40, ""),
    ("fast-cached", "fuse_qkv=on,compile=regional", "cold-cached", 300, ""),
    ("profile", None, "profile", 60, ""),
    ("refused-graphs", "compile=regional+graphs", "candidate", 20, "refused on CPU: a row with the reason"),
]


def scenario(name, recipe, role, est, note, smoke: bool) -> bench.Scenario:
    from vramfit import models
    from vramfit.recipe import Recipe

    spec = models.get_model("flux-tiny" if smoke else "flux-dev")
    size, steps = (128, 8) if smoke else (1024, 28)
    return bench.Scenario(
        name=name, recipe=recipe, expanded=str(Recipe.parse(recipe)), model=spec.name, weights="random",
        weights_seed=0, height=size, width=size, steps=steps, steps_default=steps, seeds=[0],
        repeats=1 if smoke else 3, prompt=bench.DEFAULT_PROMPT, guidance=None, tags=[role], note=note, est_s=est,
        source="benchmarks/device_speed.py")


def breakdown_child(job: dict) -> int:
    """Profile ``steps`` warm denoising steps of one recipe: CUDA (or CPU) kernel time per class per step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from vramfit import measure, models
    from vramfit.recipe import Recipe
    from vramfit.run import Runner, request_for

    device = measure.resolve_device(job["device"])
    spec = models.get_model(job["model"])
    runner = Runner(spec, models.resolve_weights(spec, "random", seed=0), Recipe.parse(job["recipe"]), device,
                    progress=False)
    req = request_for(spec, bench.DEFAULT_PROMPT, job["steps"], job["size"], job["size"], None, 0)
    runner.generate(req)  # cold (compile or cache load)
    runner.generate(req)  # warm
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        runner.generate(req)
    classes = {"linear": 0.0, "attention": 0.0, "other": 0.0}
    top: dict[str, float] = {}
    for ev in prof.key_averages():
        t = (ev.self_device_time_total if device.type == "cuda" else ev.self_cpu_time_total) / 1e6
        if t <= 0 or (device.type == "cuda" and ev.device_type != torch.autograd.DeviceType.CUDA):
            continue
        classes[kernel_class(ev.key)] += t
        top[ev.key[:120]] = top.get(ev.key[:120], 0.0) + t
    steps = req.steps
    row = {"recipe": job["recipe"], "device": str(device), "steps_profiled": steps, "encode_decode_included": True,
           "s_per_step": {k: round(v / steps, 5) for k, v in classes.items()},
           "total_kernel_s": round(sum(classes.values()), 4),
           "top_kernels_s": dict(sorted(top.items(), key=lambda kv: -kv[1])[:15]),
           "classes": "by kernel name: linear = gemm/mm/matmul/scaled_mm/cutlass/cublas/triton mm templates; "
                      "attention = flash/fmha/sdpa/attention/cudnn mha; other = the rest (norms, rope, "
                      "activations, quantize/cast, fused pointwise). One whole generation (28 steps + encode + "
                      "decode) divided by the step count"}
    Path(job["row_path"]).write_text(json.dumps(row))
    return 0


def kernel_class(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "sdpa", "attention", "attn", "mha")):
        return "attention"
    if any(k in n for k in ("gemm", "scaled_mm", "matmul", "cutlass", "cublas", "_mm", "addmm", "aten::mm",
                            "aten::bmm", "sm90_xmma", "nvjet", "triton_tem")):
        return "linear"
    return "other"


def run_profile(rows: list[dict], out: Path, device: str, smoke: bool, timeout: float) -> dict:
    ok = [r for r in rows if r["status"] == "ok" and bench._g(r, "warm", "total_s_median")
          and bench._g(r, "speed", "role") != "cache"]  # the fastest recipe without a step cache
    fastest = min(ok, key=lambda r: r["warm"]["total_s_median"]) if ok else None
    base = {"schema": bench.ROW_SCHEMA, "scenario": "profile", "role": "profile", "tags": ["profile"],
            "status": None, "exit_reason": None, "error": None}
    if fastest is None:
        return {**base, "status": "skipped", "exit_reason": "not-run", "error": "no measured row to profile"}
    row_path = out / "logs" / "profile.row.json"
    job = {"recipe": fastest["recipe"], "model": fastest["model"], "device": device, "row_path": str(row_path),
           "size": fastest["request"]["height"], "steps": fastest["steps"]}
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(out / "logs" / "profile-inductor")}
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, __file__, "--profile-child", json.dumps(job)], capture_output=True,
                           text=True, timeout=timeout, env=env)
        if p.returncode != 0 or not row_path.exists():
            return {**base, "status": "error", "exit_reason": "crash", "recipe": fastest["recipe"],
                    "error": (p.stderr or p.stdout)[-1500:], "wall_s": round(time.time() - t0, 1)}
    except subprocess.TimeoutExpired:
        return {**base, "status": "error", "exit_reason": "timeout", "recipe": fastest["recipe"],
                "error": f"profile killed after {timeout:.0f} s", "wall_s": round(time.time() - t0, 1)}
    return {**base, "status": "ok", "of_scenario": fastest["scenario"], "recipe": fastest["recipe"],
            "breakdown": json.loads(row_path.read_text()), "wall_s": round(time.time() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget-s", type=float, default=330.0, help="total wall-time cap for all scenarios")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"), help="rows go to OUT/speed.jsonl")
    ap.add_argument("--work", default="/tmp/vramfit-speed", help="scratch: reference tensors, images, compile cache "
                    "(not brought back); the scenario logs are copied to OUT/logs/speed/")
    ap.add_argument("--smoke", action="store_true", help="flux-tiny on CPU: the same code, CPU stand-in recipes")
    ap.add_argument("--only", default=os.environ.get("VRAMFIT_SPEED_ONLY") or None,
                    help="comma-separated scenario names (bf16, the reference, always runs)")
    ap.add_argument("--keep-work", action="store_true", default=bool(os.environ.get("VRAMFIT_SPEED_KEEP")),
                    help="keep --work (its compile cache) from an earlier call on the same machine: fast-cold then "
                         "runs in one call and fast-cached in the next (fast-cold alone takes ~480 s)")
    ap.add_argument("--profile-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.profile_child:
        return breakdown_child(json.loads(args.profile_child))
    t_start = time.time()
    import shutil

    out = Path(args.work)
    if not args.keep_work:
        shutil.rmtree(out, ignore_errors=True)  # empty reference, cache and logs: every row of this call is its own
    (out / "logs").mkdir(parents=True, exist_ok=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = Path(args.out) / "speed.jsonl"
    device = "cpu" if args.smoke else "cuda"
    table = SMOKE if args.smoke else FULL
    if args.only:
        keep = set(args.only.split(","))
        table = [t for t in table if t[0] in keep or t[0] == "bf16"]  # the reference always runs
    cache_dir = out / "compile-cache"  # empty at the start of this script: fast-cold's start is uncached
    os.environ["VRAMFIT_CACHE_DIR"] = str(cache_dir)
    print(f"device_speed: {len(table)} scenarios, budget {args.budget_s:.0f} s, rows -> {results}", flush=True)
    print(bench.table_header(), flush=True)
    rows = []
    queue = list(table)
    while queue:
        name, recipe, role, est, note = queue.pop(0)
        left = args.budget_s - (time.time() - t_start)
        if est > left:
            row = {"schema": bench.ROW_SCHEMA, "scenario": name, "role": role, "tags": [role], "recipe": recipe,
                   "status": "skipped", "exit_reason": "not-run",
                   "error": f"budget: estimated {est} s on the H200, {max(left, 0):.0f} s of --budget-s left"
                   + (" (and over the 10-minute command limit)" if est >= 600 else "")}
        elif recipe is None:
            row = run_profile(rows, out, device, args.smoke, timeout=max(left, 30))
        else:
            s = scenario(name, recipe, role, est, note, args.smoke)
            if role == "baseline":
                s = replace(s, role="reference")
            row = bench.run_scenario(s, out, device, timeout=max(left, 30))
        row["speed"] = {"role": role, "command": "benchmarks/device_speed.py" + (" --smoke" if args.smoke else ""),
                        "cache_kind": {"cache": "fixed schedule (TaylorSeer interval)"}.get(role)}
        rows.append(row)
        bench.append_row(results, row)
        if name == "fast-cold" and row["status"] == "error" and row.get("exit_reason") != "timeout" and not args.smoke:
            # the untried parts failed: measure the known-good recipe's uncached and cached cold start instead
            queue = [(n, FALLBACK if r == FAST else r, ro, e, no + " (fallback: fast-cold failed)" if r == FAST else no)
                     for n, r, ro, e, no in queue]
            queue.insert(1, ("fallback-cold", FALLBACK, "candidate+cold-uncached", 230,
                             "known-good recipe, empty compile cache (fast-cold failed)"))
        print(bench.table_line(row) if "steps" in row else f"{name:<30} {row['status']} {row.get('error') or ''}",
              flush=True)
    logs = Path(args.out) / "logs" / "speed"  # device_round.sh packs OUT/logs into logs.tgz
    logs.mkdir(parents=True, exist_ok=True)
    for f in (out / "logs").glob("*.log"):
        shutil.copy(f, logs / f.name)
    base = next((r for r in rows if r["scenario"] == "bf16" and r["status"] == "ok"), None)
    summary = {"schema": "vramfit.device-speed/1", "results": str(results), "wall_s": round(time.time() - t_start, 1),
               "rows": []}
    for r in rows:
        warm = bench._g(r, "warm", "total_s_median")
        summary["rows"].append({
            "scenario": r["scenario"], "status": r["status"], "recipe": r.get("recipe"), "warm_s": warm,
            "x_vs_bf16_eager": round(base["warm"]["total_s_median"] / warm, 3) if base and warm else None,
            "psnr_db": bench._g(r, "fidelity", "psnr_db"), "latent_rel_l2": bench._g(r, "fidelity", "latent_rel_l2"),
            "compile_cache": bench._g(r, "compile_cache", "status"),
            "to_first_image_uncached_s": bench._g(r, "cold_uncached", "to_first_image_s"),
            "to_first_image_cached_s": bench._g(r, "cold_cached", "to_first_image_s"),
            "breakdown_s_per_step": bench._g(r, "breakdown", "s_per_step"), "error": (r.get("error") or "")[:200]})
    for s in summary["rows"]:
        print(f"  {s['scenario']:<18} {s['status']:<8} warm {s['warm_s']} s  x{s['x_vs_bf16_eager']}  "
              f"PSNR {s['psnr_db']}  cache {s['compile_cache']}  first image {s['to_first_image_uncached_s']} / "
              f"{s['to_first_image_cached_s']} s  {s['breakdown_s_per_step'] or ''}", flush=True)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
