"""``vramfit plan`` and ``vramfit probe``: arguments, the printed plan."""

from __future__ import annotations

import json
import sys

from .check import check_rows
from .choice import _brief, _short, plan_for
from .data import Shape, gpu_profile, gpu_table, local_profile, parse_size
from ..errors import InputError

DEFAULT_TOP = 10
SERVE_HORIZON = 1000  # images a server is planned for: its cold start is paid once over a long run


def print_plan(plan: dict, top: int | None = DEFAULT_TOP, file=None) -> None:
    """The header, the first ``top`` candidates (None or 0: all), counts and the chosen recipe."""
    file = file or sys.stdout
    _header(plan, file)
    rows = plan["candidates"]
    shown = rows if not top else rows[:top]
    for r in shown:
        print(_line(r), file=file)
    if top and len(rows) > top:
        print(f"  ... {len(rows) - top} more (all of them: --top 0, or --json)", file=file)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print("candidates: " + ", ".join(f"{v} {k}" for k, v in counts.items()), file=file)
    if plan["chosen"]:
        p = rows[0]["predicted"]
        print(f"chosen: {plan['chosen']}\n  predicted peak {p['peak_vram_gb']:.2f} GB VRAM, {p['peak_host_gb']:.1f} GB "
              f"host RAM, {p['step_s']:.3f} s/step, {p['warm_s']:.2f} s per image (+{p['cold_s']:.1f} s cold start"
              f"{', compile cache counted' if p['compile_cached'] else ''}), fidelity {p['fidelity']} (expected "
              f"error {p['expected_error']}: {p['error_source']})"
              + (f"; assumed: {', '.join(p['assumed'])}" if p["assumed"] else ""), file=file)
    else:
        need = plan["min_vram_gb"]
        print("no candidate fits: " + (f"the smallest budget that works is {need:.2f} GB" if need else
                                       "no candidate meets the other bounds (RAM, --max-error)"), file=file)


def _header(plan: dict, file) -> None:
    g, b, rq = plan["gpu"], plan["budget"], plan["request"]
    ram = (f", {b['ram_gb']:.1f} GB host RAM ({b['ram_source']})" if b["ram_gb"] else ", host RAM not limited (--ram)")
    print(f"plan: {plan['model']} {rq['width']}x{rq['height']}, {rq['steps']} steps, batch {rq['batch']}, "
          f"{rq['text_tokens']} text tokens, horizon {rq['images']} image(s) | GPU {g['profile']} "
          f"(bf16 {g['tflops']['bf16']} TFLOP/s, host link {g['h2d_pinned_gbps']}/{g['h2d_pageable_gbps']} GB/s "
          f"pinned/pageable, compute capability {g.get('capability')}, libraries {g['libraries']}) | budget "
          f"{b['vram_gb']:.2f} GB VRAM" + ram + (f", max error {b['max_error']}" if b["max_error"] is not None else ""),
          file=file)
    print(f"fits = peak x (1+{b['margin']:.0%}) + {b['reserve_gb']} GB reserve <= budget; time = cold start + "
          f"{rq['images']} x per-image time; * = rests on an assumption (--json 'assumed'), error* = never measured; "
          f"[unmeasured] = a backend/offload factor never measured on any GPU: ranked after measured recipes within "
          f"10 %", file=file)
    print(f"  {'VRAM GB':>8}{'RAM GB':>8}{'s/step':>8}{'image s':>9}{'cold s':>8}{'total s':>9}{'error':>7}  "
          f"{'status':<13}recipe (what differs from all-bf16, no offload) / why not", file=file)


def _line(r: dict) -> str:
    mark = "=>" if r["status"] == "chosen" else "  "
    p = r["predicted"]
    why = f"  -- {_brief(r['reason'])}" if r["reason"] else ""
    if not p:
        return f"{mark}{'':>57}  {r['status']:<13}{_short(r['recipe'])}{why}"
    err_assumed = any(a.startswith("expected error") for a in p["assumed"])
    star = "*" if any(not a.startswith("expected error") for a in p["assumed"]) else " "
    tag = " [unmeasured]" if p["unmeasured"] else ""
    return (f"{mark}{p['peak_vram_gb']:>8.2f}{p['peak_host_gb']:>8.1f}{p['step_s']:>8.3f}{p['warm_s']:>9.2f}"
            f"{p['cold_s']:>8.1f}{p['total_s']:>9.1f}{star}{p['expected_error']:>6.3f}{'*' if err_assumed else ' '} "
            f"{r['status']:<13}{_short(r['recipe'])}{tag}{why}")
def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="predict memory and speed of every recipe for a budget; pick the fastest that fits")
    p.add_argument("model", nargs="?", default="flux-dev")
    p.add_argument("--vram", default=None, help="GPU memory budget: 8GB, 8 GiB, 24000MB or auto (default: free "
                                                "memory of a probed GPU, else the profile's memory)")
    p.add_argument("--ram", default=None, help="host RAM budget (default: this machine's RAM when planning for it; "
                                               "a named --gpu profile's typical host RAM, assumed)")
    p.add_argument("--gpu", default=None, help="a GPU profile (4090, 3090, 4070, 4060, h100, h200, l4, a10) or "
                                               "'local' to probe this machine (the default when it has a GPU)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--allow-large", action="store_true", help="plan a size above the model's maximum (warning)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--images", type=int, default=1, help="planning horizon: images one process will make (the cold "
                                                         "start, e.g. compile, is paid once over them)")
    p.add_argument("--max-error", type=float, default=None, help="largest expected relative output error")
    p.add_argument("--weights", default="hub", choices=("hub", "random"), help="where staged loads read from")
    p.add_argument("--top", type=int, default=DEFAULT_TOP, help=f"print the first N candidates (default "
                                                                f"{DEFAULT_TOP}; 0: all)")
    p.add_argument("--check", default=None, nargs="+", metavar="RESULTS.jsonl",
                   help="compare predictions with measured rows of one or more files (bench rows, schema "
                        "vramfit.bench/1, and run records, vramfit.run/1)")
    p.add_argument("--in-sample-only", action="store_true", help="with --check: skip the leave-one-out refits")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    q = sub.add_parser("probe", help="measure this machine (GPU memory, host link, matmul rates) and cache it")
    q.add_argument("--refresh", action="store_true", help="measure again instead of using the cache")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_probe)


def cmd_plan(args) -> int:
    if args.check:
        return check_rows(args.check, out_of_sample=not args.in_sample_only)
    from .. import models

    spec = models.get_model(args.model)
    vram = parse_size(args.vram) if args.vram else None  # bad budgets are refused before anything is probed
    ram = parse_size(args.ram, "--ram") if args.ram else None
    gpu = args.gpu
    if gpu is None:
        import torch

        if not torch.cuda.is_available():
            raise InputError("this machine has no CUDA GPU to probe: name the GPU to plan for with --gpu (profiles: "
                             + ", ".join(g["aliases"][0] for g in gpu_table()) + ")")
        gpu = "local"
    prof = local_profile() if gpu == "local" else gpu_profile(gpu)
    if vram is None:  # auto / not given: free memory of a probed GPU, else the card's memory (reserve: fit rule)
        vram = prof.get("vram_free_gb") or prof["vram_gb"]
    h = spec.default_size if args.height is None else args.height  # --height 0 is an error, not the default
    w = spec.default_size if args.width is None else args.width
    from ..validate import STEPS_MAX, check_number, check_size

    for note in check_size(spec, h, w, allow_large=args.allow_large):  # the same limits as `vramfit generate`
        print(f"vramfit: warning: {note}", file=sys.stderr)
    if args.top < 0:
        raise InputError(f"--top {args.top}: must be >= 0 (0 prints every candidate)")
    for name, hi in (("steps", STEPS_MAX), ("batch", None), ("images", None)):
        v = getattr(args, name)
        if v is not None:
            check_number(f"--{name}", v, 1, hi, integer=True)
    if args.max_error is not None:
        check_number("--max-error", args.max_error, 0.0)
    shape = Shape(h, w, args.steps or spec.default_steps, args.batch, spec.max_sequence_length, args.images)
    plan = plan_for(spec.name, shape, prof, vram, ram, max_error=args.max_error, weights_kind=args.weights)
    if args.json:
        print(json.dumps(plan))
    else:
        print_plan(plan, top=args.top)
    if plan["chosen"] is None:
        need = plan["min_vram_gb"]
        print(f"vramfit: nothing fits {vram:.2f} GB"
              + (f"; the smallest budget that works is {need:.2f} GB" if need else ""), file=sys.stderr)
        return 1
    return 0


def cmd_probe(args) -> int:
    import torch

    from .. import probe

    if not torch.cuda.is_available():
        raise InputError("probe measures a CUDA GPU and this machine has none; plan for a named profile with "
                         "vramfit plan --gpu 4090 (profiles: " + ", ".join(g["aliases"][0] for g in gpu_table()) + ")")
    p = probe.probe(torch.device("cuda"), refresh=args.refresh)
    if args.json:
        print(json.dumps(p))
        return 0
    print(f"GPU        {p['name']} (driver {p.get('driver')}), {p['vram_total_gb']:.2f} GB, "
          f"{p['vram_free_gb']:.2f} GB free")
    print(f"host       {p.get('host_ram_gb')} GB RAM; host->GPU {p['h2d_pinned_gbps']} GB/s pinned, "
          f"{p['h2d_pageable_gbps']} GB/s pageable")
    print("matmul     " + ", ".join(f"{k} {v} TFLOP/s" if v else f"{k} unsupported" for k, v in p["tflops"].items()))
    print(f"cached     {p['cached']} ({p.get('measured_at')}; --refresh to measure again)")
    return 0
