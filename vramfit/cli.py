"""Command line: parses arguments, validates them before any heavy work, calls the library, prints a summary."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from .errors import InputError, VramfitError


# ----------------------------------------------------------------------------------------------------------
# small helpers


def atomic_write(path: Path, write) -> None:
    """Write to a temporary file beside ``path`` and rename it over, so a failure never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_out_file(out: str, suffix: str) -> Path:
    p = Path(out)
    if p.suffix.lower() != suffix:
        raise InputError(f"--out {out!r}: must end in {suffix}")
    if p.exists() and p.is_dir():
        raise InputError(f"--out {out!r} is a directory; give a file name ending in {suffix}")
    parent = p.parent if str(p.parent) else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise InputError(f"--out {out!r}: {probe} is not writable")
    return p


def check_out_dir(out: str) -> Path:
    p = Path(out)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise InputError(f"--out {out!r} exists and is not an empty directory; choose a new directory "
                         f"(nothing there is overwritten)")
    return p


def save_pipeline_dir(pipe, out: Path, marker: dict) -> int:
    """``save_pretrained`` into a temporary directory beside ``out`` plus ``vramfit.json`` (what the checkpoint
    holds), then rename it to ``out``: a failure leaves nothing half-written. Returns the bytes written."""
    import shutil

    tmp = Path(tempfile.mkdtemp(dir=out.parent if str(out.parent) else ".", prefix=f".{out.name}."))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "vramfit.json").write_text(json.dumps(marker, indent=2, default=str) + "\n")
        if out.exists():
            out.rmdir()  # check_out_dir allowed only an empty directory
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


def gb(x) -> str:
    return "-" if x is None else f"{x:.2f} GB"


# ----------------------------------------------------------------------------------------------------------
# commands


def cmd_models(args) -> int:
    from . import models

    rows = []
    for name, spec in models.REGISTRY.items():
        counts = models.count_params(spec)
        rows.append({"model": name, "hub_id": spec.hub_id, "description": spec.description,
                     "params": counts, "bf16_gb": round(sum(counts.values()) * 2 / 1e9, 2)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    comps = models.COMPONENTS
    print(f"{'model':<14}" + "".join(f"{c:>16}" for c in comps) + f"{'bf16 total':>12}  hub id")
    for r in rows:
        print(f"{r['model']:<14}" + "".join(f"{_count(r['params'][c]):>16}" for c in comps)
              + f"{r['bf16_gb']:>9.2f} GB  {r['hub_id'] or '(random stand-in only)'}")
    print("parameter counts computed on the meta device from the bundled configs (no weights)")
    return 0


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def cmd_generate(args) -> int:
    from . import measure, models  # heavy imports only after argument parsing
    from .run import Runner, request_for

    spec = models.get_model(args.model)
    weights = models.resolve_weights(spec, args.weights, seed=args.weights_seed)
    recipe = resolve_recipe(args.recipe, weights)
    if args.gguf:
        if not Path(args.gguf).is_file():
            raise InputError(f"--gguf {args.gguf!r}: no such file")
        from .gguf_io import read_gguf_type

        recipe = recipe.with_(transformer=read_gguf_type(args.gguf))
    req = request_for(spec, args.prompt, args.steps, args.height, args.width, args.guidance, args.seed)
    req.validate()
    out = check_out_file(args.out, ".png")
    device = measure.resolve_device(args.device)
    if args.vram:
        if args.recipe or args.gguf:
            raise InputError("--vram picks the recipe itself; drop --recipe/--gguf, or drop --vram to run yours")
        from . import plan

        plan.parse_size(args.vram)  # a bad budget fails here, before any heavy work

        def make_runner(r):
            return Runner(spec, weights, r, device, progress=not args.no_progress)

        result, _ = plan.generate_with_budget(spec, weights, args.vram, req, device, make_runner,
                                              log=lambda m: print(m, file=sys.stderr), gpu=args.gpu,
                                              max_error=args.max_error)
    else:
        runner = Runner(spec, weights, recipe, device, gguf_file=args.gguf, progress=not args.no_progress)
        print(f"vramfit: {spec.name} | weights {weights.kind}{' ' + weights.path if weights.path else ''} | "
              f"{device} | recipe {recipe}", file=sys.stderr)
        result = runner.generate(req)
    rec = result.record
    rec["output"] = {"image": str(out), "json": str(out.with_suffix(".json"))}
    atomic_write(out, lambda tmp: result.image.save(tmp, format="PNG"))
    atomic_write(out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(rec, indent=2) + "\n"))
    print_summary(rec)
    if args.json:
        print(json.dumps(rec))
    return 0


def resolve_recipe(text: str, weights):
    """The user's recipe; on a checkpoint written by ``vramfit quantize`` its quantized components are taken as
    saved (they cannot be re-quantized or de-quantized on load), and a conflicting request is refused."""
    from . import models
    from .recipe import Recipe

    recipe = Recipe.parse(text)
    saved = models.checkpoint_recipe(weights)
    asked = Recipe.parse(text).changed() if text else {}
    for comp, value in saved.items():
        if comp in asked and asked[comp] != value:
            raise InputError(f"{weights.path} holds {comp}={value} (pre-quantized); the recipe asks {comp}="
                             f"{asked[comp]}. Drop that item, or write a new checkpoint with vramfit quantize")
    return recipe.with_(**saved) if saved else recipe


def print_summary(rec: dict) -> None:
    t, m = rec["timings"], rec["memory"]
    w = rec["weights"]
    print(f"model      {rec['model']}  (weights: {w['kind']}{', seed ' + str(w['seed']) if 'seed' in w else ''}"
          f"{', ' + w['path'] if 'path' in w else ''})")
    print(f"recipe     {rec['recipe']}")
    print(f"device     {rec['device'].get('name', rec['device']['type'])}")
    print("applied    " + "; ".join(_step_line(s) for s in rec["manifest"]))
    print(f"time       load {t['load_s']:.2f}s | encode {t['encode_s']:.3f}s | denoise {t['denoise_s']:.2f}s "
          f"({t['s_per_step']:.3f} s/step) | decode {t['decode_s']:.3f}s | total {t['total_s']:.2f}s"
          + (f" | compile {t['compile_s']:.1f}s" if "compile_s" in t else ""))
    al = m["after_load"]
    if "allocated_gb" in al:
        print(f"memory     after load {gb(al['allocated_gb'])} allocated ({gb(al['reserved_gb'])} reserved) | "
              f"peak while generating {gb(m['generate_peak_allocated_gb'])} allocated "
              f"({gb(m['generate_peak_reserved_gb'])} reserved) | peak incl. load {gb(m['peak_allocated_gb'])} | "
              f"host peak RSS {gb(m['host_peak_rss_gb'])}")
    else:
        print(f"memory     host RSS after load {gb(al.get('rss_gb'))} | host peak RSS {gb(m['host_peak_rss_gb'])}")
    print(f"weights    {rec['weight_gb_total']:.3f} GB on device across components")
    if "output" in rec:
        print(f"wrote      {rec['output']['image']} and {rec['output']['json']}")


def _step_line(s: dict) -> str:
    if s["step"] == "load":
        return f"load {s['component']} ({s['class']})"
    if s["step"] == "quantize":
        return f"quantize {s['component']}={s['value']}"
    keys = [k for k in ("strategy", "mode", "backend", "settings") if k in s]
    return f"{s['step']} " + " ".join(str(s[k]) for k in keys)


def cmd_export(args) -> int:
    import torch

    from . import __version__, apply, models

    spec = models.get_model(args.model)
    if args.weights != "random":
        raise InputError("export writes random stand-ins (--weights random); a hub or local checkpoint already "
                         "is a diffusers-format directory")
    weights = models.resolve_weights(spec, "random", seed=args.weights_seed)
    out = check_out_dir(args.out)
    device = torch.device("cpu")
    manifest = apply.Manifest()
    comps = {c: models.build_random_component(spec, c, weights.seed, device, torch.bfloat16) for c in models.COMPONENTS}
    pipe = apply.assemble(spec, weights, comps)
    size = save_pipeline_dir(pipe, out, {
        "written_by": f"vramfit {__version__}", "model": spec.name, "weights": "random", "seed": weights.seed,
        "generated_on": str(models.random_generation_device(device)), "dtype": "bf16",
        "note": "random stand-in: real architecture, seeded random weights"})
    del manifest
    print(f"wrote {out} ({size / 1e6:.1f} MB, diffusers format, random stand-in seed {weights.seed}); "
          f"load it with --weights {out}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vramfit", description="Run FLUX inside any GPU-memory budget, measured.")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list the model registry with parameter counts (no weights needed)")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)

    g = sub.add_parser("generate", help="generate one image with a recipe and record measurements")
    g.add_argument("prompt")
    g.add_argument("--model", default="flux-dev", help="flux-dev | flux-schnell | flux-tiny")
    g.add_argument("--weights", default=None,
                   help="hub (default for real models) | random | a local diffusers-format directory")
    g.add_argument("--weights-seed", type=int, default=0, help="seed of random stand-in weights")
    g.add_argument("--recipe", default="", help="e.g. 'transformer=bnb-nf4,offload=model' or a preset name")
    g.add_argument("--gguf", default=None, help="take the transformer from this GGUF file")
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--guidance", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--out", default="outputs/image.png", help="PNG path; the run JSON is written beside it")
    g.add_argument("--vram", default=None, help="a GPU-memory budget (8GB, 24GiB, auto): plan, then run the "
                   "fastest recipe predicted to fit; on out-of-memory fall back to the next")
    g.add_argument("--gpu", default=None, help="with --vram: plan for this GPU profile instead of probing (local)")
    g.add_argument("--max-error", type=float, default=None, help="with --vram: fidelity bound (relative error)")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--json", action="store_true", help="print the run record as JSON on the last line")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("export", help="write a random stand-in as a diffusers-format checkpoint")
    e.add_argument("model")
    e.add_argument("--weights", default="random")
    e.add_argument("--weights-seed", type=int, default=0)
    e.add_argument("--out", required=True)
    e.set_defaults(func=cmd_export)

    # commands that live beside the code they drive: each module has add_parser(sub) and keeps its
    # top-level imports light (torch and diffusers are imported inside the command)
    import importlib

    for name in EXTENSION_MODULES:
        try:
            mod = importlib.import_module(f"vramfit.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"vramfit.{name}":
                raise
            continue
        mod.add_parser(sub)
    return p


EXTENSION_MODULES = ("quant_cli", "bench", "report", "plan", "serve.cli")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except VramfitError as e:
        print(f"vramfit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
