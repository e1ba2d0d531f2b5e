"""Why is a quantized transformer slow under torch.compile? One process, one variant: the FLUX.1-dev transformer's
real layer shapes with fewer blocks (seeded random weights), quantized by vramfit, regionally compiled
(``compile_repeated_blocks(fullgraph=True)``, as ``compile=regional`` does), timed eager vs compiled at 1024² inputs
(4096 image + 512 text tokens), and the compiled call profiled (top CUDA kernels and CPU ops).

    python benchmarks/compile_probe.py --value torchao-int8wo --set torch._inductor.config.prologue_fusion=False --out probe.jsonl

One JSON line per variant goes to --out (appended) and stdout. Compile caches are per process, so each variant
runs in a fresh one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_setting(text: str):
    key, _, raw = text.partition("=")
    value = {"True": True, "False": False}.get(raw, raw)
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            pass
    return key, value


def inputs(cfg, device, img=4096, txt=512):
    g = torch.Generator(device).manual_seed(0)
    bf = torch.bfloat16
    return dict(
        hidden_states=torch.randn(1, img, cfg["in_channels"], generator=g, device=device, dtype=bf),
        encoder_hidden_states=torch.randn(1, txt, cfg["joint_attention_dim"], generator=g, device=device, dtype=bf),
        pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], generator=g, device=device, dtype=bf),
        timestep=torch.full((1,), 0.5, device=device, dtype=bf),
        img_ids=torch.zeros(img, 3, device=device), txt_ids=torch.zeros(txt, 3, device=device),
        guidance=torch.full((1,), 3.5, device=device, dtype=bf), return_dict=False,
    )


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        fn()
    sync(device)
    return round(time.perf_counter() - t0, 4)


def top(prof, key: str, n: int = 8) -> list[dict]:
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:n]
    return [{"name": e.key[:120], "ms": round(getattr(e, key) / 1000, 3), "calls": e.count} for e in rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--value", default="torchao-int8wo", help="transformer recipe value (bf16 = unquantized)")
    ap.add_argument("--layers", type=int, default=1, help="double-stream blocks (FLUX.1-dev has 19)")
    ap.add_argument("--single", type=int, default=2, help="single-stream blocks (FLUX.1-dev has 38)")
    ap.add_argument("--vramfit-settings", action="store_true",
                    help="apply what vramfit's compile=regional applies for this value on this device")
    ap.add_argument("--set", action="append", default=[], help="torch._dynamo.config KEY=VALUE or torch.PATH=VALUE")
    ap.add_argument("--calls", type=int, default=3, help="compiled calls after the first (compiling) one")
    ap.add_argument("--tokens", default="4096,512", help="image,text tokens (1024²: 4096,512)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from vramfit import models, quant

    device = torch.device(args.device)
    img, txt = (int(x) for x in args.tokens.split(","))
    row: dict = {"value": args.value, "layers": args.layers, "single": args.single, "tokens": [img, txt],
                 "torch": torch.__version__,
                 "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    from vramfit.apply import Manifest, apply_dynamo_settings

    settings = dict(parse_setting(t) for t in args.set)
    if args.vramfit_settings:
        settings.update(quant.dynamo_settings({"transformer": args.value}, "none", "regional", device.type))
    apply_dynamo_settings(settings, Manifest())
    row["settings"] = settings
    try:
        cfg = {k: v for k, v in models.get_model("flux-dev").config("transformer").items() if not k.startswith("_")}
        cfg.update(num_layers=args.layers, num_single_layers=args.single)
        with init_empty_weights(include_buffers=False):
            tr = FluxTransformer2DModel.from_config(cfg)
        tr.eval().requires_grad_(False)
        quantized = args.value != "bf16"
        models.materialize_random(tr, 3, torch.device("cpu") if quantized else device, torch.bfloat16)
        if quantized:
            entry = quant.quantize_component(tr, "transformer", args.value, device)
            row["classes"] = entry["classes"]
        kw = inputs(cfg, device, img, txt)
        row["eager_s"] = [timed(lambda: tr(**kw), device) for _ in range(3)]
        row["mkldnn_enabled_at_compile"] = torch.backends.mkldnn.enabled
        tr.compile_repeated_blocks(fullgraph=True)
        row["first_compiled_s"] = timed(lambda: tr(**kw), device)
        row["compiled_s"] = [timed(lambda: tr(**kw), device) for _ in range(args.calls)]
        from torch._dynamo.utils import counters

        row["dynamo"] = {k: dict(v) for k, v in counters.items() if k in ("stats", "recompiles", "graph_break")}
        row["woq_rewrites"] = counters["inductor"].get("woq_matcher_count", 0)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            with torch.no_grad():
                tr(**kw)
            sync(device)
        row["top_cuda"] = top(prof, "self_device_time_total")
        row["top_cpu"] = top(prof, "self_cpu_time_total")
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001  a failing variant is a row with its error
        row.update(status="error", error=f"{type(e).__name__}: {str(e)[:800]}")
    line = json.dumps(row)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0 if row["status"] == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main())
