"""Issue #12 on the H200, one call: the fastest FLUX.1-dev end to end, a step cache, and the compile cache's cold start.

    bash benchmarks/device_round.sh speed:330                                  # device call, carry [".whl"]
    PYTHONPATH=$PWD python3 benchmarks/device_speed.py --budget-s 330          # or directly; rows -> $OUT/speed.jsonl
    PYTHONPATH=$PWD python benchmarks/device_speed.py --smoke --out /tmp/speed  # the same code on flux-tiny, CPU

Every scenario is a fresh process (``vramfit.bench``'s child: load, one cold run, ``repeats`` warm runs, fidelity of
the image and latents against the uncompiled bf16 run of the same seed), its inductor/Triton caches empty. Full
size: flux-dev stand-in, 1024x1024, 28 steps, 3 warm runs (median), seed 0. In order, each only if its estimate
fits what is left of ``--budget-s`` (else a row "not-run: budget" saying so):

1. ``bf16``                 bf16 eager: the baseline and the fidelity reference                       (~45 s)
2. ``fast-cdtune``          the fast recipe with ``compile=regional+cdtune``: coordinate-descent tuning, vramfit's
                            default for torchao before session 10 (199.8 s of compile in session 9) (~270 s)
3. ``fast-cold``            the fastest no-cache candidate (fp8 dynamic per-row, fused QKV, regional compile),
                            with an EMPTY compile cache: its cold start is the uncached one (session 10: 61 s) (~110 s)
4. ``fast-cached``          the same recipe as 3 in a new process WITH the cache 3 saved: the cached cold start
                            (session 10: 50.5 s, 30 s of it the stand-in's load)                       (~75 s)
5. ``fast-taylorseer``      3 + ``cache=taylorseer:4`` (fixed interval: the speed is the real model's), the cache
                            hooks around the compiled blocks; it shares 3's compile-cache entry; fidelity against
                            bf16 and against 3 or 4, the uncached run of the same recipe (``fidelity_vs``, also when
                            it runs first)                                                             (~75 s)
6. ``abl-regional``, ``abl-fp8dq``: the ablation's first rows (bf16 + regional; + fp8dq)            (~70, ~100 s)
7. ``fast-cudnn``           cuDNN SDPA (no FA3 wheel here)                                             (~100 s)
   ``attention-backends``   one process: every diffusers attention backend, whether it runs here and why not
                            (``apply.attention_support``; flash-attn, FA3 and sageattention>=2.1.1 have no wheel
                            here, the ``*_hub`` kernels need the Hub)                                 (~25 s)
   ``fast-flex``, ``fast-native-flash``, ``fast-efficient``: the fast recipe with each attention backend that runs
                            here (FlexAttention compiled in the blocks; SDPA's flash / memory-efficient kernels forced)
                                                                                                      (~100 s each)
8. ``profile``              torch.profiler over one warm generation of the fastest no-cache row in a new process
                            (fast-cold and fast-cached also profile one more warm run in their own process:
                            ``breakdown``)                                                             (~90 s)
9. ``taylorseer``           bf16 eager + ``cache=taylorseer:4``, fidelity also against bf16            (~40 s)
10. more candidates while budget remains: CUDA graphs on the fast recipe (an ablation), per-tensor fp8
   (``torchao-fp8dq-tensor``), and the flux-fast-style anchor (``compile=full+autotune+graphs``, fullgraph
   max-autotune with flux-fast's inductor flags: est. > 600 s, the 10-minute command limit -- a row with that
   reason unless the budget allows it).

Ablation (``abl-regional``, ``abl-fp8dq``, then fast-cold, fast-graphs, fast-cudnn, fp8-tensor, fast-taylorseer):
each step's own gain against the row it adds to, in the summary's ``ablation`` list, from the rows of one call.
``--flags +cdtune`` (``VRAMFIT_SPEED_FLAGS``) runs every torchao compile recipe with coordinate-descent tuning,
with estimates to match (then there is no separate ``fast-cdtune`` row). Session 10 ran ``--flags +nocdtune``: the
same recipes as today's default.

Estimated GPU time: more than one 10-minute command for everything: pick with ``VRAMFIT_SPEED_ONLY`` (its order is
the run order, after bf16), e.g. ``VRAMFIT_SPEED_ONLY=fast-cold,fast-cached,fast-taylorseer,abl-regional,abl-fp8dq``
(session 10: 522 s with fast-cudnn and taylorseer). ``VRAMFIT_SPEED_KEEP=1`` keeps an earlier call's work dir (its
compile cache) on the same warm machine, so a second call can continue where the first stopped.
A compile longer than one 10-minute command (the flux-fast-style anchor, est. 900 s): with
``VRAMFIT_SPEED_RESUME=flux-fast-anchor`` it runs for what is left of the budget whatever its estimate, and keeps its
own inductor/Triton caches; a second call with ``VRAMFIT_SPEED_KEEP=1`` on the same machine (within its idle
release) resumes from them, and the row says so (``compiler_cache.resumed``: its cold start is then not an uncached
one), e.g. twice: ``VRAMFIT_SPEED_KEEP=1 VRAMFIT_SPEED_RESUME=flux-fast-anchor VRAMFIT_SPEED_ONLY=flux-fast-anchor
bash benchmarks/device_round.sh speed:550``.
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

# 2026-12-02 (session 8): fp8dq + fused QKV + regional + CUDA graphs compiled for 364 s (twice fp8dq + regional's
# 170 s) and then ran 0.104-0.107 s/step, no faster than fp8dq + regional (0.105): the graphs are an ablation row now
FAST = "transformer=torchao-fp8dq,fuse_qkv=on,compile=regional"
# measured before (3.16 s warm, 170 s compile): used in FAST's place when FAST fails
FALLBACK = "transformer=torchao-fp8dq,compile=regional"
# --flags +cdtune (VRAMFIT_SPEED_FLAGS): every torchao compile recipe below with inductor's coordinate-descent tuning
# (vramfit's default before session 10: 237 of the 258 s of fast-taylorseer's first compile in session 9), with the
# estimates that go with it. Session 10 ran with +nocdtune, today's default (the same recipes without the flag)
FLAGS = os.environ.get("VRAMFIT_SPEED_FLAGS", "")
# the ablation, one step's own gain a row (flux-fast's table): (row, the row it adds one step to, the step)
ABLATION = (("abl-regional", "bf16", "regional compile"), ("abl-fp8dq", "abl-regional", "fp8 dynamic per row"),
            ("fast-cold", "abl-fp8dq", "fused QKV"), ("fast-graphs", "fast-cold", "CUDA graphs"),
            ("fast-cudnn", "fast-cold", "cuDNN SDPA"), ("fast-flex", "fast-cold", "flex attention"),
            ("fast-native-flash", "fast-cold", "SDPA flash kernel (FA2)"),
            ("fast-efficient", "fast-cold", "SDPA memory-efficient kernel"),
            ("fp8-tensor", "fast-cold", "fp8 per tensor, not per row"),
            ("fast-taylorseer", "fast-cold", "TaylorSeer lite, fixed interval"))


def ablation(rows: list[dict]) -> list[dict]:
    """Each step's own gain, from the rows of this call: warm end-to-end and s/step of a row against its parent."""
    ok = {r["scenario"]: r for r in rows if r["status"] == "ok" and bench._g(r, "warm", "total_s_median")}
    out = []
    for name, parent, step in ABLATION:
        if name in ok and parent in ok:
            a, b = ok[name], ok[parent]
            sa, sb = bench._g(a, "warm", "s_per_step_median"), bench._g(b, "warm", "s_per_step_median")
            out.append({"row": name, "adds": step, "to": parent, "warm_s": a["warm"]["total_s_median"],
                        "x_end_to_end": round(b["warm"]["total_s_median"] / a["warm"]["total_s_median"], 3),
                        "x_per_step": round(sb / sa, 3) if sa and sb else None})
    return out


def full_table(flags: str = "") -> list[tuple]:
    """(name, recipe, role, est_s on the H200, note) for the full-size run; ``flags`` joins every compile=regional
    recipe of a torchao transformer (``+cdtune``: coordinate-descent tuning, its estimates)."""
    nocd = "+cdtune" not in flags
    fast, fallback = FAST + flags, FALLBACK + flags

    def est(cd: int, nc: int) -> int:
        return nc if nocd else cd

    rows = [("bf16", "bf16", "baseline", 45, "bf16 eager, no compile: the baseline and the fidelity reference")]
    rows += [
        # session 10 (no tuning): 31 s load + 15 s compile, 61 s to the first image, then 3.071 s warm
        ("fast-cold", fast, "candidate+cold-uncached", est(270, 110),
         "fastest no-cache candidate; empty compile cache: its cold start is the uncached one"),
        # session 10: 50.5 s to the first image (30 s of it the stand-in's load; 4 s compile from the cache)
        ("fast-cached", fast, "cold-cached", est(245, 75),
         "same recipe as fast-cold, new process, with the cache fast-cold saved"),
        # the step cache's hooks run around the compiled blocks: this recipe shares fast-cold's compile-cache entry
        ("fast-taylorseer", fast + ",cache=taylorseer:4", "cache", est(240, 75),
         "the fast recipe + TaylorSeer lite, interval 4 (fixed schedule: speed independent of the weights); "
         "fidelity_vs = against fast-cold, the uncached run of the same recipe"),
        ("abl-regional", "compile=regional", "ablation", 70, "ablation: bf16 + regional compile"),
        ("abl-fp8dq", fallback, "ablation", est(230, 100),
         "ablation: + fp8 dynamic quantization per row (the fast recipe without fused QKV)"),
        ("fast-cudnn", fast + ",attention=_native_cudnn", "candidate", est(250, 100),
         "cuDNN SDPA (no FA3 wheel here)"),
        # every diffusers attention backend, in one process: which run here, and why not (vramfit's own refusal)
        ("attention-backends", None, "scan", 25, "apply.attention_support('cuda'): the checks `check` refuses with"),
        # the attention backends that install here, each on the fast recipe (flex is compiled inside the blocks)
        ("fast-flex", fast + ",attention=flex", "candidate", est(250, 110),
         "torch FlexAttention (diffusers' flex backend), compiled inside the regional blocks"),
        ("fast-native-flash", fast + ",attention=_native_flash", "candidate", est(250, 100),
         "PyTorch SDPA's flash kernel (FlashAttention-2) forced, instead of SDPA's own choice"),
        ("fast-efficient", fast + ",attention=_native_efficient", "candidate", est(250, 100),
         "PyTorch SDPA's memory-efficient kernel forced"),
        ("profile", None, "profile", est(90, 80), "torch.profiler breakdown of the fastest row"),
        ("taylorseer", "cache=taylorseer:4", "cache", 40,
         "bf16 eager + TaylorSeer lite, interval 4 (fixed schedule); fidelity_vs = against bf16"),
        ("fast-graphs", fast + "+graphs", "ablation", est(480, 250),
         "ablation: the fast recipe + CUDA graphs"),
        ("fp8-tensor", "transformer=torchao-fp8dq-tensor,fuse_qkv=on,compile=regional" + flags, "candidate",
         est(250, 100), "per-tensor fp8 scales (flux-fast's default) instead of per-row"),
        ("flux-fast-anchor", "transformer=torchao-fp8dq-tensor,fuse_qkv=on,compile=full+autotune+graphs", "anchor",
         900, "flux-fast style: fp8dq per-tensor, fused QKV, fullgraph max-autotune + CUDA graphs, inductor flags "
         "(cuDNN SDPA's place is taken by the default SDPA: no FA3 wheel)"),
        ("flux-fast-anchor-aten", "transformer=torchao-fp8dq-tensor,fuse_qkv=on,compile=full+autotune+graphs+atengemm",
         "anchor", 480, "the flux-fast-style anchor with max-autotune's GEMM search limited to ATen: session 16's full "
         "search took 12-91 s per fp8 GEMM shape (106 choices) and ran out of a 10-minute command after 7 of ~20 "
         "shapes; ATen's _scaled_mm won 4 of those 7, the one per-block shape among them by 10 %"),
    ]
    if nocd:
        # session 10: the tuning costs 185 s of compile for a 1 % faster step (sessions 9 / 10, different calls):
        # what it buys, in the same call as the rows without it
        rows.insert(-3, ("fast-cdtune", FAST + "+cdtune", "candidate+cold-uncached", 270,
                     "the fast recipe with inductor's coordinate-descent tuning: its cold start and step time"))
    return rows


FULL = full_table(FLAGS)
SMOKE = [  # the same roles on flux-tiny, CPU (graphs/fp8dq/autotune cannot run there: their CPU stand-ins)
    ("bf16", "bf16", "baseline", 40, ""),
    ("fast-cdtune", "fuse_qkv=on,compile=regional+cdtune", "candidate+cold-uncached", 400, ""),
    ("fast-cold", "fuse_qkv=on,compile=regional", "candidate+cold-uncached", 400, "CPU stand-in of the fast recipe"),
    ("fast-cached", "fuse_qkv=on,compile=regional", "cold-cached", 300, ""),
    ("fast-taylorseer", "fuse_qkv=on,compile=regional,cache=taylorseer:2", "cache", 300, ""),
    ("profile", None, "profile", 60, ""),
    ("abl-regional", "compile=regional", "ablation", 300, ""),
    ("taylorseer", "cache=taylorseer:2", "cache", 40, ""),
    ("refused-graphs", "compile=regional+graphs", "candidate", 20, "refused on CPU: a row with the reason"),
    ("attention-backends", None, "scan", 25, ""),
]
# a step-cache row is also scored against the uncached run of the same recipe (bench's compare_to -> fidelity_vs)
# (the first that ran: a cache row may run before its uncached twin, which then starts from the shared cache entry)
COMPARE_TO = {"fast-taylorseer": ("fast-cold", "fast-cached"), "taylorseer": ("bf16",)}
# rows that also profile one more warm run in their own process (no second compile; the "profile" scenario is a
# separate process that compiles again)
PROFILE_IN_PROCESS = {"fast-cold", "fast-cached"}


def cache_dir_of(out: Path, name: str) -> Path:
    return out / "logs" / f"{bench.safe_name(name)}.compiler-cache"  # bench.run_scenario's scratch for the scenario


def cache_census(d: Path) -> dict:
    """How far a compile got, from the files inductor and Triton left (each is written as it finishes): generated
    kernels, their tuned configs (coordinate descent / pointwise autotune), GEMM autotune entries, Triton builds."""
    files = [f for f in d.rglob("*") if f.is_file()] if d.is_dir() else []
    return {"files": len(files), "mb": round(sum(f.stat().st_size for f in files) / 2**20, 1),
            "kernels_py": sum(f.suffix == ".py" for f in files),
            "best_configs": sum(f.name.endswith(".best_config") for f in files),
            "triton_builds": sum(f.suffix == ".cubin" for f in files),
            "gemm_autotune": sum(1 for f in files if f.parent.name == "cache" and "inductor" in f.parts)}


class CacheWatch:
    """A line on stdout every ``every_s`` seconds while a scenario runs: its compiler cache's census (a compile that
    runs out of the command otherwise leaves no trace of where it was). ``every_s`` 0: off."""

    def __init__(self, out: Path, name: str, every_s: float):
        import threading

        self.dir, self.name, self.every = cache_dir_of(out, name), name, every_s
        self.stop, self.t0 = threading.Event(), time.time()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.wait(self.every):
            print(f"[cache +{time.time() - self.t0:.0f}s] {self.name}: {json.dumps(cache_census(self.dir))}",
                  flush=True)

    def __enter__(self):
        if self.every > 0:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()


PART_BYTES = 15 * 2**20  # the device tool brings back files of at most 16 MiB


def pack_cache(out: Path, name: str, dest: Path, limit_mb: float = 40.0) -> dict:
    """The scenario's compiler cache as ``dest/NAME.compiler-cache.tgz.NN`` parts. Triton's builds are left out when
    the whole would pass ``limit_mb`` (what travels back into a call is 64 MiB with the repo and the wheels): the
    tuned configs and GEMM choices are what a resumed compile cannot redo quickly, Triton rebuilds in parallel."""
    import tarfile

    src = cache_dir_of(out, name)
    if not src.is_dir():
        return {"error": f"no compiler cache at {src}"}
    dest.mkdir(parents=True, exist_ok=True)
    blob = dest / f"{bench.safe_name(name)}.compiler-cache.tgz"
    parts = []
    for with_triton in (True, False):
        with tarfile.open(blob, "w:gz") as tar:
            for sub in sorted(src.iterdir()):
                if with_triton or sub.name != "triton":
                    tar.add(sub, arcname=sub.name)
        if blob.stat().st_size <= limit_mb * 2**20 or not with_triton:
            break
    data = blob.read_bytes()
    blob.unlink()
    for i in range(0, len(data), PART_BYTES):
        part = dest / f"{blob.name}.{i // PART_BYTES:02d}"
        part.write_bytes(data[i:i + PART_BYTES])
        parts.append(part.name)
    return {"parts": parts, "mb": round(len(data) / 2**20, 1), "triton": with_triton, **cache_census(src)}


def unpack_cache(src: Path, out: Path, name: str) -> dict | None:
    """Put an earlier call's parts (``pack_cache``) in place of the scenario's compiler cache; None when there are
    none. Only an empty cache dir is filled (a kept one on the same machine is newer)."""
    import io
    import tarfile

    parts = sorted(src.glob(f"{bench.safe_name(name)}.compiler-cache.tgz.[0-9][0-9]"))
    dest = cache_dir_of(out, name)
    if not parts or (dest.is_dir() and any(dest.rglob("*"))):
        return None
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts)), mode="r:gz") as tar:
        tar.extractall(dest, filter="data")
    return {"parts": [p.name for p in parts], **cache_census(dest)}


def scenario(name, recipe, role, est, note, smoke: bool) -> bench.Scenario:
    from vramfit import models
    from vramfit.recipe import Recipe

    spec = models.get_model("flux-tiny" if smoke else "flux-dev")
    size, steps = (128, 8) if smoke else (1024, 28)
    return bench.Scenario(
        name=name, recipe=recipe, expanded=str(Recipe.parse(recipe)), model=spec.name, weights="random",
        weights_seed=0, height=size, width=size, steps=steps, steps_default=steps, seeds=[0],
        repeats=1 if smoke else 3, prompt=bench.DEFAULT_PROMPT, guidance=None, tags=[role], note=note, est_s=est,
        source="benchmarks/device_speed.py", compare_to=(COMPARE_TO.get(name) or (None,))[0],
        profile=name in PROFILE_IN_PROCESS)


def breakdown_child(job: dict) -> int:
    """Profile ``steps`` warm denoising steps of one recipe: CUDA (or CPU) kernel time per class per step."""
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
    row = {"recipe": job["recipe"], **measure.profile_generation(lambda: runner.generate(req), device, req.steps)}
    Path(job["row_path"]).write_text(json.dumps(row))
    return 0


def run_profile(rows: list[dict], out: Path, device: str, smoke: bool, timeout: float, fast: str | None = None) -> dict:
    ok = [r for r in rows if r["status"] == "ok" and bench._g(r, "warm", "total_s_median")
          and bench._g(r, "speed", "role") != "cache"]  # the fastest recipe without a step cache
    fastest = min(ok, key=lambda r: r["warm"]["total_s_median"]) if ok else None
    base = {"schema": bench.ROW_SCHEMA, "scenario": "profile", "role": "profile", "tags": ["profile"],
            "status": None, "exit_reason": None, "error": None}
    if fastest is None:
        return {**base, "status": "skipped", "exit_reason": "not-run", "error": "no measured row to profile"}
    if fastest["scenario"] == "bf16" and fast is not None:
        # only the baseline ran in this call (say profile alone, after fast-cold's call): the fast recipe
        fastest = {**fastest, "scenario": "fast (not run in this call)", "recipe": fast}
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


def attention_scan(device: str, timeout: float) -> dict:
    """One fresh process: every diffusers attention backend, whether a recipe with it runs on ``device`` here, and
    the reason where not (``vramfit.apply.attention_support``, what ``check`` refuses with)."""
    base = {"schema": bench.ROW_SCHEMA, "scenario": "attention-backends", "role": "scan", "tags": ["scan"],
            "recipe": None, "status": None, "exit_reason": None, "error": None}
    code = ("import json, sys; from vramfit import apply; "
            f"json.dump(apply.attention_support({device!r}), sys.stdout)")
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**base, "status": "error", "exit_reason": "timeout", "error": f"killed after {timeout:.0f} s"}
    if p.returncode != 0:
        return {**base, "status": "error", "exit_reason": "crash", "error": (p.stderr or p.stdout)[-1500:]}
    found = json.loads(p.stdout)
    return {**base, "status": "ok", "device": device, "backends": found, "runs_here": [b["backend"] for b in found
            if b["ok"]], "wall_s": round(time.time() - t0, 1)}


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
                         "runs in one call and fast-cached in the next")
    ap.add_argument("--flags", default=FLAGS, help="compile flags for every torchao compile recipe, e.g. +cdtune "
                    "(VRAMFIT_SPEED_FLAGS)")
    ap.add_argument("--resume", default=os.environ.get("VRAMFIT_SPEED_RESUME", ""),
                    help="comma-separated scenarios (VRAMFIT_SPEED_RESUME) that run whatever their estimate, for what "
                    "is left of --budget-s, and keep their inductor/Triton caches: with --keep-work a second call "
                    "on the same warm machine resumes the compile (the row says compiler_cache.resumed)")
    ap.add_argument("--no-reference", action="store_true", default=bool(os.environ.get("VRAMFIT_SPEED_NOREF")),
                    help="skip bf16, the fidelity reference (VRAMFIT_SPEED_NOREF=1): a first call that only starts a "
                    "resumed compile; its rows then carry no fidelity, and the call that finishes it runs bf16")
    ap.add_argument("--cache-in", default=os.environ.get("VRAMFIT_SPEED_CACHE_IN", ""),
                    help="a folder (VRAMFIT_SPEED_CACHE_IN, a carried path) with the parts an earlier call brought "
                    "back from OUT/cache/: each --resume scenario's compiler cache starts from them, across machines")
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
    table = SMOKE if args.smoke else full_table(args.flags)
    if args.only:  # in the order given, after bf16 (the reference always runs first)
        keep = args.only.split(",")
        by_name = {t[0]: t for t in table}
        table = [by_name["bf16"]] + [by_name[n] for n in keep if n in by_name and n != "bf16"]
    if args.no_reference:
        table = [t for t in table if t[0] != "bf16"]
    cache_dir = out / "compile-cache"  # empty at the start of this script: fast-cold's start is uncached
    os.environ["VRAMFIT_CACHE_DIR"] = str(cache_dir)
    print(f"device_speed: {len(table)} scenarios, budget {args.budget_s:.0f} s, rows -> {results}", flush=True)
    print(bench.table_header(), flush=True)
    rows = []
    queue = list(table)
    while queue:
        name, recipe, role, est, note = queue.pop(0)
        left = args.budget_s - (time.time() - t_start)
        resume = name in args.resume.split(",")
        if est > left and not (resume and left >= 60):
            row = {"schema": bench.ROW_SCHEMA, "scenario": name, "role": role, "tags": [role], "recipe": recipe,
                   "status": "skipped", "exit_reason": "not-run",
                   "error": f"budget: estimated {est} s on the H200, {max(left, 0):.0f} s of --budget-s left"
                   + (" (and over the 10-minute command limit)" if est >= 600 else "")}
        elif role == "scan":
            row = attention_scan(device, timeout=max(min(left, 120), 30))
        elif recipe is None:
            row = run_profile(rows, out, device, args.smoke, timeout=max(left, 30),
                              fast=None if args.smoke else FAST + args.flags)
        else:
            s = scenario(name, recipe, role, est, note, args.smoke)
            if role == "baseline":
                s = replace(s, role="reference")
            carried = unpack_cache(Path(args.cache_in), out, name) if resume and args.cache_in else None
            with CacheWatch(out, name, every_s=60.0 if resume else 0.0):
                row = bench.run_scenario(s, out, device, timeout=max(left, 30), keep_compiler_cache=resume)
            if resume:
                row.setdefault("compiler_cache", {})["carried_in"] = carried
                if row["status"] != "ok" and not args.smoke:  # unfinished: bring its cache back for the next call
                    row["compiler_cache"]["carried_out"] = pack_cache(out, name, Path(args.out) / "cache")
        row["speed"] = {"role": role, "command": "benchmarks/device_speed.py" + (" --smoke" if args.smoke else ""),
                        "cache_kind": {"cache": "fixed schedule (TaylorSeer interval)"}.get(role)}
        rows.append(row)
        bench.append_row(results, row)
        if name == "fast-cold" and row["status"] == "error" and row.get("exit_reason") != "timeout" and not args.smoke:
            # the untried parts failed: measure the known-good recipe's uncached and cached cold start instead
            queue = [(n, r.replace(FAST, FALLBACK), ro, e, no + " (fallback: fast-cold failed)")
                     if r and r.startswith(FAST) else (n, r, ro, e, no) for n, r, ro, e, no in queue]
            queue.insert(1, ("fallback-cold", FALLBACK + args.flags, "candidate+cold-uncached", 230,
                             "known-good recipe, empty compile cache (fast-cold failed)"))
        said = row.get("error") or row.get("runs_here") or ""
        print(bench.table_line(row) if "steps" in row else f"{name:<30} {row['status']} {said}", flush=True)
    # a cache row that ran before its uncached twin: scored against it now, from the files both left
    for r in rows:
        got = r.get("fidelity_vs") or {}
        if r["status"] != "ok" or r["scenario"] not in COMPARE_TO or (got and not got.get("error")):
            continue
        for other in COMPARE_TO[r["scenario"]]:
            if any(x["scenario"] == other and x["status"] == "ok" for x in rows):
                r["fidelity_vs"] = bench.fidelity_vs_files(out, r["scenario"], other, [0])
                break
    bench.write_atomic(results, "".join(json.dumps(bench.finite(r), allow_nan=False) + "\n" for r in rows).encode())
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
            "vs": bench._g(r, "fidelity_vs", "scenario"), "psnr_vs_db": bench._g(r, "fidelity_vs", "psnr_db"),
            "ssim_vs": bench._g(r, "fidelity_vs", "ssim"), "latent_rel_l2_vs": bench._g(r, "fidelity_vs", "latent_rel_l2"),
            "steps_computed": next((e.get("steps_computed") for e in r.get("manifest") or []
                                    if isinstance(e, dict) and e.get("step") == "cache"), None),
            "compile_cache": bench._g(r, "compile_cache", "status"),
            "load_s": r.get("load_s"), "to_first_image_uncached_s": bench._g(r, "cold_uncached", "to_first_image_s"),
            "to_first_image_cached_s": bench._g(r, "cold_cached", "to_first_image_s"),
            "breakdown_s_per_step": bench._g(r, "breakdown", "s_per_step"), "error": (r.get("error") or "")[:200]})
    summary["ablation"] = ablation(rows)
    for a in summary["ablation"]:
        print(f"  ablation {a['row']:<16} + {a['adds']:<30} {a['x_end_to_end']}x end to end, {a['x_per_step']}x/step")
    for s in summary["rows"]:
        print(f"  {s['scenario']:<18} {s['status']:<8} warm {s['warm_s']} s  x{s['x_vs_bf16_eager']}  "
              f"PSNR {s['psnr_db']}" + (f" (vs {s['vs']}: {s['psnr_vs_db']})" if s["vs"] else "") +
              f"  cache {s['compile_cache']}  first image {s['to_first_image_uncached_s']} / "
              f"{s['to_first_image_cached_s']} s  {s['breakdown_s_per_step'] or ''}", flush=True)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
