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


def check_out_dir(out: str) -> Path:
    from .validate import try_write

    p = Path(out)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise InputError(f"--out {out!r} exists and is not an empty directory; choose a new directory "
                         f"(nothing there is overwritten)")
    try_write(p.parent if str(p.parent) else Path("."), f"--out {out!r}")  # the checkpoint is renamed in from there
    return p


def save_pipeline_dir(pipe, out: Path, marker: dict) -> int:
    """``save_pretrained`` into a temporary directory beside ``out`` plus ``vramfit.json`` (what the checkpoint
    holds), then rename it to ``out``: a failure leaves nothing half-written. Returns the bytes written."""
    import shutil

    out.parent.mkdir(parents=True, exist_ok=True)  # `--out ckpt/tiny` with no ckpt/ yet (the write check passed)
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
    from .run import Runner
    from .validate import check_number, check_out_path

    spec = models.get_model(args.model)
    check_number("--weights-seed", args.weights_seed, 0, SEED_MAX, integer=True)
    if args.max_error is not None:
        check_number("--max-error", args.max_error, 0.0)
    weights = models.resolve_weights(spec, args.weights, seed=args.weights_seed)
    recipe = resolve_recipe(args.recipe, weights)
    if args.gguf:
        if not Path(args.gguf).is_file():
            raise InputError(f"--gguf {args.gguf!r}: no such file")
        from .gguf_io import read_gguf_type

        recipe = recipe.with_(transformer=read_gguf_type(args.gguf))
    if recipe.offload_kind == "stream" and recipe.stream_k is None and not args.vram:
        from . import stream

        recipe = stream.resolve(recipe)  # no budget: every block streamed; the record prints the resolved stream:K
    if args.vram:
        if args.recipe or args.gguf:
            raise InputError("--vram picks the recipe itself; drop --recipe/--gguf, or drop --vram to run yours")
        check_budget(args.vram, "--vram")  # a bad budget fails here, before any heavy work
    if args.ram:
        if not args.vram:
            raise InputError("--ram is a planning budget: use it with --vram (or with vramfit plan)")
        check_budget(args.ram, "--ram")
    jobs, notes = plan_images(args, spec, weights)
    out = check_out_path(args.out, ".png")
    outputs = output_paths(out, len(jobs))
    for note in notes:
        print(f"vramfit: warning: {note}", file=sys.stderr)
    device = measure.resolve_device(args.device)
    several = len(jobs) > 1
    # one bar over the images; the per-step bar of a single image would interleave with it
    step_bar = not args.no_progress and not several
    runners = []

    def make_runner(r):
        runners.append(Runner(spec, weights, r, device, gguf_file=args.gguf, progress=step_bar))
        return runners[-1]

    if not args.vram:
        make_runner(recipe)
        print(f"vramfit: {spec.name} | weights {weights.kind}{' ' + weights.path if weights.path else ''} | "
              f"{device} | recipe {recipe}", file=sys.stderr)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="images", unit="image", file=sys.stderr, leave=False,
               disable=args.no_progress or not several)
    index, plan_record, oom = [], None, None
    try:
        for k, (job, (png, rec_path)) in enumerate(zip(jobs, outputs)):
            try:
                if args.vram and not runners:
                    from . import plan

                    result, plan_record = plan.generate_with_budget(
                        spec, weights, args.vram, job["request"], device, make_runner,
                        log=lambda m: bar.write(m, file=sys.stderr), gpu=args.gpu, max_error=args.max_error,
                        ram=args.ram, images=len(jobs))
                else:
                    result = runners[-1].generate(job["request"])
            except Exception as e:  # noqa: BLE001 -- out-of-memory becomes one line; anything else propagates
                if not is_oom(e):
                    raise
                oom = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__
                break  # the message is raised outside the except, so the traceback no longer holds the pipeline
            rec = result.record
            if plan_record is not None:
                rec["plan"] = plan_record
            if job["notes"]:
                rec["notes"] = job["notes"]
            if job["prompt_read"] is not None:  # the pipeline cuts the prompt itself; this is what T5 read
                rec["prompt_read_by_t5"] = job["prompt_read"]
            rec["output"] = {"image": str(png), "json": str(rec_path)}
            if several:
                rec["output"].update(index=k, of=len(jobs), prompt_line=job["line"])
            atomic_write(png, lambda tmp: result.image.save(tmp, format="PNG"))
            atomic_write(rec_path, lambda tmp: Path(tmp).write_text(json.dumps(rec, indent=2) + "\n"))
            index.append({"index": k, "prompt_line": job["line"], "prompt": job["request"].prompt,
                          "seed": job["request"].seed, "image": str(png), "json": str(rec_path),
                          "latents_sha256": rec["latents"]["sha256"], "s_per_step": rec["timings"]["s_per_step"]})
            if several:
                write_index(out, spec, weights, rec, index, len(jobs))
            if k == 0:
                bar.clear()
                print_summary(rec)
            else:
                bar.write(f"wrote      {png} and {rec_path} (seed {job['request'].seed}, "
                          f"{rec['timings']['total_s']:.2f} s)")
            bar.update(1)
            del result
    finally:
        bar.close()
    if oom is not None:
        used = runners[-1].recipe if runners else recipe
        for r in runners:
            r.close()
        runners.clear()
        raise VramfitError(oom_message(args, spec, used, device, oom, done=len(index)))
    if args.json:
        print(json.dumps(rec if not several else read_index(out)))
    return 0


SEED_MAX = 2**63 - 1


def check_budget(text: str, what: str) -> float | None:
    from . import plan
    from .validate import BUDGET_MAX_GB, check_number

    gb_ = plan.parse_size(text, what)
    if gb_ is not None:
        check_number(what, gb_, 0.0, BUDGET_MAX_GB)
    return gb_


def read_prompts(path: str) -> list[tuple[int, str]]:
    """``--prompts FILE``: one prompt a line (line number, text); blank lines are skipped."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--prompts {path!r}: cannot read it ({e.__class__.__name__}: {e}). Give a UTF-8 text "
                         f"file with one prompt a line") from None
    lines = [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise InputError(f"--prompts {path!r}: no prompts in it (one prompt a line; blank lines are skipped)")
    return lines


def plan_images(args, spec, weights) -> tuple[list[dict], list[str]]:
    """Every image this command makes, checked before anything loads: a prompt's tokens (with the model's own
    tokenizers), its size and numbers. Image i of a prompt uses seed s+i, so it equals ``--seed s+i``.
    Returns the jobs and the warnings to say once."""
    from .run import request_for
    from .validate import IMAGES_MAX, check_number, check_prompt

    check_number("--n", args.n, 1, IMAGES_MAX, integer=True)
    check_number("--seed", args.seed, 0, SEED_MAX, integer=True)
    if args.seed + args.n - 1 > SEED_MAX:
        raise InputError(f"--seed {args.seed} with --n {args.n}: image i uses seed {args.seed}+i, and seeds end at "
                         f"2**63-1; give --seed {SEED_MAX - args.n + 1} or less")
    if args.prompts and args.prompt is not None:
        raise InputError("give a prompt or --prompts FILE, not both")
    if args.prompts:
        prompts = read_prompts(args.prompts)
    elif args.prompt is not None:
        prompts = [(None, args.prompt)]
    else:
        raise InputError("give a prompt (vramfit generate \"a red fox\") or --prompts FILE (one prompt a line)")
    size_notes = request_for(spec, prompts[0][1], args.steps, args.height, args.width, args.guidance, args.seed,
                             allow_large=args.allow_large).validate(spec)
    notes = list(size_notes)
    jobs = []
    for line, text in prompts:
        where = f"--prompts {args.prompts} line {line}: " if line is not None else ""
        try:
            seen, said = check_prompt(spec, weights, text, strict=args.strict)
        except InputError as e:
            raise InputError(where + str(e)) from None
        said = [where + s for s in said]
        notes += said
        for i in range(args.n):
            req = request_for(spec, text, args.steps, args.height, args.width, args.guidance, args.seed + i,
                              allow_large=args.allow_large)
            jobs.append({"request": req, "line": line, "notes": size_notes + said,
                         "prompt_read": seen if seen != text else None})
    return jobs, notes


def output_paths(out: Path, count: int) -> list[tuple[Path, Path]]:
    """One image: OUT.png + OUT.json. Several: OUT-0.png + OUT-0.json, OUT-1.png, ... numbered in order
    (prompt by prompt, then seed by seed), and OUT-index.json listing them all."""
    if count == 1:
        return [(out, out.with_suffix(".json"))]
    return [(out.with_name(f"{out.stem}-{k}.png"), out.with_name(f"{out.stem}-{k}.json")) for k in range(count)]


def index_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}-index.json")


def write_index(out: Path, spec, weights, rec: dict, images: list[dict], total: int) -> None:
    """Rewritten after every image, so an interrupted run still lists what it wrote."""
    data = {"schema": "vramfit.index/1", "model": spec.name, "weights": weights.describe(), "recipe": rec["recipe"],
            "images_planned": total, "images_written": len(images), "images": images}
    atomic_write(index_path(out), lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def read_index(out: Path) -> dict:
    return json.loads(index_path(out).read_text())


def is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def gpu_total_gb(device) -> float | None:
    import torch

    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(device).total_memory / 1e9


def oom_message(args, spec, recipe, device, detail: str, done: int = 0) -> str:
    """One line: what ran out, and the two commands that pick a recipe that fits."""
    total = gpu_total_gb(device)
    budget = f"{int(total)}GB" if total else "auto"
    argv = list(getattr(args, "argv", None) or [])
    cmd = []
    skip = False
    for a in argv:  # the user's own command, with --vram in place of --recipe/--gguf
        if skip:
            skip = False
            continue
        if a in ("--recipe", "--gguf", "--vram"):
            skip = True
            continue
        if a.startswith(("--recipe=", "--gguf=", "--vram=")):
            continue
        cmd.append(a)
    import shlex

    gen = " ".join(shlex.quote(a) for a in cmd) if cmd else f"generate ... --model {spec.name}"
    size = "".join(f" --{k} {getattr(args, k)}" for k in ("height", "width") if getattr(args, k) is not None)
    kept = f"; {done} image(s) written before it" if done else ""
    return (f"out of GPU memory running {recipe} ({detail}){kept}. Try: vramfit {gen} --vram {budget}, "
            f"or see vramfit plan {spec.name} --vram {budget}{size}")


def resolve_recipe(text: str, weights):
    """The user's recipe, made to say what a local checkpoint really holds: components saved quantized (read from
    each component's config.json, vramfit.json or not) load as saved and cannot be re-quantized or de-quantized on
    load, so the recipe takes their values, and a request for another value is refused."""
    from . import models
    from .recipe import Recipe

    recipe = Recipe.parse(text)
    saved = models.checkpoint_recipe(weights)
    asked = recipe.changed() if text else {}
    for comp, value in saved.items():
        if comp in asked and asked[comp] != value and models.saved_quantization(weights, comp) is not None:
            raise InputError(f"{weights.path} holds {comp}={value} (pre-quantized: {comp}/config.json has its "
                             f"quantization_config); the recipe asks {comp}={asked[comp]}. Alternative: drop that "
                             f"item, or quantize a bf16 checkpoint on load (vramfit export, then --weights DIR "
                             f"--recipe {comp}={asked[comp]})")
    keep = {c: v for c, v in saved.items() if c not in asked or models.saved_quantization(weights, c) is not None}
    return recipe.with_(**keep) if keep else recipe


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
    line = f"{s['step']} " + " ".join(str(s[k]) for k in keys)
    if s["step"] == "offload" and s.get("strategy") == "stream":
        mod = s.get("modulation") or {}
        b = s.get("bytes_streamed_per_step", 0)
        size = f"{b / 1e9:.2f} GB" if b >= 1e8 else f"{b / 1e6:.1f} MB"
        line = (f"offload {s.get('recipe_offload', 'stream')}, {size} streamed a step" + (f", modulation of {mod['hoisted_layers']} layers once per image"
                                      if mod.get("hoisted_layers") else ""))
    return line


def cmd_export(args) -> int:
    import torch

    from . import __version__, apply, models

    from .validate import check_number

    spec = models.get_model(args.model)
    check_number("--weights-seed", args.weights_seed, 0, SEED_MAX, integer=True)
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
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show other libraries' warnings and log lines (quiet by default)")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list the model registry with parameter counts (no weights needed)")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)

    g = sub.add_parser("generate", help="generate images with a recipe (one load) and record measurements")
    g.add_argument("prompt", nargs="?", default=None)
    g.add_argument("--prompts", default=None, metavar="FILE",
                   help="one prompt a line (blank lines skipped), all made after one load")
    g.add_argument("--n", type=int, default=1, help="images per prompt; image i uses seed SEED+i (= --seed SEED+i)")
    g.add_argument("--strict", action="store_true",
                   help="refuse a prompt longer than the model's T5 token limit instead of cutting it")
    g.add_argument("--allow-large", action="store_true",
                   help="run a size above the model's maximum (with a warning)")
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
    g.add_argument("--out", default="outputs/image.png",
                   help="PNG path; the run JSON is written beside it. Several images: OUT-0.png, OUT-0.json, "
                   "OUT-1.png ... and OUT-index.json")
    g.add_argument("--vram", default=None, help="a GPU-memory budget (8GB, 24GiB, auto): plan, then run the "
                   "fastest recipe predicted to fit; on out-of-memory fall back to the next")
    g.add_argument("--ram", default=None, help="with --vram: host RAM budget (default: this machine's RAM)")
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


EXTENSION_MODULES = ("quant_cli", "bench", "report", "plan", "codegen", "compile_cache", "serve.cli")


def main(argv: list[str] | None = None) -> int:
    from . import logs

    # before build_parser: the extension modules it imports must already find the libraries quiet
    argv = sys.argv[1:] if argv is None else list(argv)
    logs.configure(verbose=bool(argv) and argv[0] in ("-v", "--verbose"))
    args = build_parser().parse_args(argv)
    args.argv = argv  # an error's hint repeats the user's own command
    try:
        return args.func(args)
    except VramfitError as e:
        print(f"vramfit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
