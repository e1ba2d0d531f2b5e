"""Compile cache: torch.compile's artifacts kept per (GPU, driver, libraries, model, recipe, shape), so a new process
skips inductor's code generation ("mega-cache": ``torch.compiler.save_cache_artifacts`` after the first compiled
run, ``torch.compiler.load_cache_artifacts`` before compiling).

Where: ``$VRAMFIT_CACHE_DIR`` if set, else the user cache dir (``platformdirs``: ``~/.cache/vramfit/compile`` on
Linux), one folder per key holding ``artifacts.bin`` and ``meta.json`` (written whole or not at all). The
artifacts only work for the same torch/Triton/GPU, which is why those are in the key. ``vramfit warmup`` builds
an entry; ``generate`` and ``bench`` use it when it exists; every run's manifest says hit, miss or why unusable.

Dynamo still traces in a cached process (seconds); what the cache saves is inductor's codegen, Triton/C++ compiles
and autotuning. A process whose recipe turns inductor's caches off (``torch.compiler.config.force_disable_caches``:
``quant.WOQ_INT8_REWRITE_OFF`` for torchao-int8wo on CUDA) can neither save nor load: reported as unusable.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

from .errors import InputError, RecipeError

SCHEMA = "vramfit.compile-cache/1"
ARTIFACTS = "artifacts.bin"


def cache_root() -> Path:
    env = os.environ.get("VRAMFIT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir("vramfit")) / "compile"
    except ImportError:
        return Path.home() / ".cache" / "vramfit" / "compile"


def key_parts(device, model: str, recipe: str, height: int, width: int, batch: int, text_len: int) -> dict:
    import torch

    from . import measure

    info = measure.device_info(device)
    if device.type == "cuda":
        hw = {"gpu": info.get("name"), "capability": info.get("capability"), "driver": info.get("driver")}
    else:  # inductor's CPU code is C++ built for this machine's ISA
        hw = {"cpu": info.get("cpu"), "machine": platform.machine()}
    libs = measure.versions()
    try:
        from importlib import metadata

        libs["triton"] = metadata.version("triton")
    except Exception:  # noqa: BLE001 -- no triton (CPU wheels): part of the key as absent
        libs["triton"] = None
    libs["torch_build"] = torch.__version__
    return {"device": device.type, **hw, "libraries": libs, "model": model, "recipe": recipe,
            "shape": {"height": height, "width": width, "batch": batch, "text_len": text_len}}


def key_recipe(recipe) -> str:
    """The recipe as the key holds it: without ``cache=``. A step cache's hooks run in Python around the compiled
    blocks (``runtime.compile_block_forwards``), so the same recipe with and without a step cache compiles the same
    block graphs and shares one entry (whether inductor found them is in the compile step's ``inductor_cache``)."""
    from .recipe import Recipe

    if isinstance(recipe, Recipe) and recipe.cache != "none":
        return str(recipe.with_(cache="none"))
    return str(recipe)


def key_of(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def unusable_reason(dynamo_settings: dict) -> str | None:
    if dynamo_settings.get("torch.compiler.config.force_disable_caches"):
        return ("this recipe turns inductor's caches off (torch.compiler.config.force_disable_caches, set with "
                "torchao-int8wo under compile on CUDA so that no graph compiled with inductor's _weight_int8pack_mm "
                "rewrite is reused): every process compiles afresh")
    return None


class CompileCache:
    """One runner's use of the cache: ``before(req)`` loads the entry of the request's shape (once per shape),
    ``after(req)`` saves it when it was a miss; both record a ``compile-cache`` manifest entry."""

    def __init__(self, runner):
        self.runner = runner
        self.root = cache_root()
        self.unusable = unusable_reason(runner.dynamo)
        self.seen: dict[str, dict] = {}

    def _parts(self, req) -> dict:
        r = self.runner
        return key_parts(r.device, r.spec.name, key_recipe(r.recipe), req.height, req.width, 1,
                         req.max_sequence_length)

    def before(self, req, manifest) -> dict:
        parts = self._parts(req)
        key = key_of(parts)
        if key in self.seen:
            return self.seen[key]
        entry = manifest.add("compile-cache", key=key, dir=str(self.root / key), shape=parts["shape"])
        self.seen[key] = entry
        if self.unusable:
            entry.update(status="unusable", reason=self.unusable)
            return entry
        path = self.root / key / ARTIFACTS
        if not path.is_file():
            entry.update(status="miss")
            return entry
        import torch

        t0 = time.perf_counter()
        data = path.read_bytes()
        info = torch.compiler.load_cache_artifacts(data)
        entry.update(status="hit" if info is not None else "miss", bytes=len(data),
                     load_s=round(time.perf_counter() - t0, 3), api="torch.compiler.load_cache_artifacts(bytes)",
                     artifacts=_counts(info))
        if info is None:
            entry["reason"] = "load_cache_artifacts found nothing usable in the file"
        return entry

    def after(self, req, manifest) -> dict:
        entry = self.seen[key_of(self._parts(req))]
        if entry.get("status") != "miss" or entry.get("saved"):
            return entry
        import torch

        from .bench import write_atomic

        got = torch.compiler.save_cache_artifacts()
        if got is None:
            entry.update(saved=False, reason="save_cache_artifacts returned nothing (no compiled artifacts recorded)")
            return entry
        data, info = got
        d = self.root / entry["key"]
        d.mkdir(parents=True, exist_ok=True)
        write_atomic(d / ARTIFACTS, data)
        write_atomic(d / "meta.json", json.dumps({"schema": SCHEMA, "key": entry["key"], "parts": self._parts(req),
                                                  "bytes": len(data), "artifacts": _counts(info),
                                                  "written": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1).encode())
        entry.update(saved=True, bytes=len(data), artifacts=_counts(info), api="torch.compiler.save_cache_artifacts()")
        return entry


def _counts(info) -> dict | None:
    """CacheInfo lists artifact keys per kind (inductor, autotune, aot_autograd, pgo, ...): counts, not the keys."""
    if info is None:
        return None
    out = {}
    for name in dir(info):
        if name.endswith("_artifacts"):
            try:
                out[name[: -len("_artifacts")]] = len(getattr(info, name))
            except TypeError:
                continue
    return out


def for_runner(runner) -> CompileCache | None:
    from . import runtime

    if runtime.compile_scope(runner.recipe) == "off" and not runtime.on(runner.recipe, "compile_vae", "off"):
        return None
    if os.environ.get("VRAMFIT_COMPILE_CACHE", "on") == "off":  # bench's uncached cold-start rows
        return None
    return CompileCache(runner)


# ----------------------------------------------------------------------------------------------------------
# vramfit warmup


def cmd_warmup(args) -> int:
    import sys

    from . import measure, models, runtime
    from .recipe import Recipe
    from .run import Runner, request_for

    spec = models.get_model(args.model)
    weights = models.resolve_weights(spec, args.weights, seed=args.weights_seed)
    recipe = Recipe.parse(args.recipe)
    if runtime.compile_scope(recipe) == "off" and not runtime.on(recipe, "compile_vae", "off"):
        raise RecipeError(f"warmup: recipe {recipe} compiles nothing, so there is nothing to cache. "
                          "Alternative: add compile=regional (or compile=full)")
    req = request_for(spec, args.prompt, args.steps, args.height, args.width, None, 0)
    req.validate()
    device = measure.resolve_device(args.device)
    runner = Runner(spec, weights, recipe, device, progress=False)
    if runner.compile_cache is None:
        raise InputError("warmup: VRAMFIT_COMPILE_CACHE=off is set; unset it to build the cache")
    if runner.compile_cache.unusable:
        raise RecipeError(f"warmup: the compile cache cannot be used for {recipe}: {runner.compile_cache.unusable}. "
                          "Alternative: torchao-int8dq or torchao-fp8wo with compile (their caches work), or run "
                          "without warmup")
    t0 = time.perf_counter()
    res = runner.generate(req)
    (entry,) = [e for e in res.record["manifest"] if e["step"] == "compile-cache"]
    out = {"schema": "vramfit.warmup/1", "model": spec.name, "recipe": str(recipe), "device": str(device),
           "shape": entry["shape"], "key": entry["key"], "dir": entry["dir"], "status": entry["status"],
           "saved": entry.get("saved", False), "bytes": entry.get("bytes"),
           "first_image_s": round(time.perf_counter() - t0, 2),
           "inductor_cache": next((e.get("inductor_cache") for e in res.record["manifest"] if e["step"] == "compile"),
                                  None),
           "compile_s": res.record["timings"].get("compile_s")}
    print(f"vramfit warmup: {spec.name} {req.height}x{req.width} recipe {recipe}: cache {entry['status']}"
          f"{', saved ' + str(entry.get('bytes')) + ' bytes' if entry.get('saved') else ''} -> {entry['dir']}",
          file=sys.stderr)
    print(json.dumps(out))
    return 0


def add_parser(sub) -> None:
    w = sub.add_parser("warmup", help="compile a recipe once and keep the compiled artifacts for later processes",
                       description="Runs one generation with the recipe and saves torch.compile's artifacts under "
                       "$VRAMFIT_CACHE_DIR (default: the user cache dir). generate and bench load them when the key "
                       "(GPU, driver, libraries, model, recipe, shape) matches.")
    w.add_argument("model")
    w.add_argument("--recipe", required=True)
    w.add_argument("--height", type=int, default=None)
    w.add_argument("--width", type=int, default=None)
    w.add_argument("--steps", type=int, default=2, help="denoising steps of the warm-up run (default 2: the "
                   "compiled graphs do not depend on the count)")
    w.add_argument("--prompt", default="a red fox in the snow, photograph")
    w.add_argument("--weights", default="random")
    w.add_argument("--weights-seed", type=int, default=0)
    w.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    w.set_defaults(func=cmd_warmup)
