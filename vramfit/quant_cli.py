"""Commands around quantization: ``recipes`` (compatibility matrix), ``quantize`` (save a pre-quantized
pipeline), ``export-gguf`` (write the transformer as a GGUF file in the community's FLUX key layout)."""

from __future__ import annotations

import json

from .errors import InputError


def add_parser(sub) -> None:
    r = sub.add_parser("recipes", help="list recipe values and the compatibility matrix (generated from the checks)")
    r.add_argument("--json", action="store_true")
    r.add_argument("--all", action="store_true", help="print every refused combination with its reason")
    r.set_defaults(func=cmd_recipes)

    q = sub.add_parser("quantize", help="write a pre-quantized diffusers-format pipeline")
    q.add_argument("model")
    q.add_argument("--weights", default=None, help="hub | random | a local diffusers-format directory")
    q.add_argument("--weights-seed", type=int, default=0)
    q.add_argument("--recipe", required=True, help="component values, e.g. transformer=torchao-int8wo")
    q.add_argument("--device", default="auto")
    q.add_argument("--out", required=True)
    q.set_defaults(func=cmd_quantize)

    g = sub.add_parser("export-gguf", help="write the transformer as a GGUF file (FLUX/BFL key layout)")
    g.add_argument("model")
    g.add_argument("--weights", default=None)
    g.add_argument("--weights-seed", type=int, default=0)
    g.add_argument("--type", required=True, help="q8_0 | q5_1 | q5_0 | q4_1 | q4_0 | q4_k | q2_k | bf16")
    g.add_argument("--out", required=True, help="FILE.gguf")
    g.set_defaults(func=cmd_export_gguf)


def cmd_recipes(args) -> int:
    import torch

    from . import apply, quant
    from .recipe import COMPILES, OFFLOADS, PRESETS

    rows = apply.compat_matrix()
    here = "cuda" if torch.cuda.is_available() else "cpu"
    attention = apply.attention_support(here)
    if args.json:
        print(json.dumps({"backends": {k: vars(v) for k, v in quant.BACKENDS.items()}, "matrix": rows,
                          "presets": PRESETS, "attention": {"device": here, "backends": attention}},
                         indent=2, default=str))
        return 0
    print("values (per component: transformer, text_encoder_2, text_encoder, vae):")
    print(f"  {'value':<20}{'library':<16}{'bits':>6}  {'CUDA only':<10}{'saves':<7}components")
    for v, s in quant.BACKENDS.items():
        print(f"  {v:<20}{s.library:<16}{s.bits:>6.2f}  {'yes' if s.needs_cuda else 'no':<10}"
              f"{'yes' if s.serializable else 'no':<7}{','.join(s.components)}")
    print("\ncompatibility on a CUDA GPU (ok = runs; x = refused up front), value on the transformer "
          "(text_encoder_2 where the value does not apply to it); each cell: compile off/regional/full")
    print(f"  {'':<20}" + "".join(f"{o:>14}" for o in OFFLOADS))
    index = {(r["value"], r["offload"], r["compile"]): r for r in rows}
    for v in dict.fromkeys(r["value"] for r in rows):
        cells = []
        for o in OFFLOADS:
            cells.append("/".join("ok" if index[(v, o, c)]["ok"] else "x" for c in COMPILES))
        print(f"  {v:<20}" + "".join(f"{c:>14}" for c in cells))
    ok = [a["backend"] for a in attention if a["ok"]]
    print(f"\nattention= backends that run on this machine ({here}): {', '.join(ok)}")
    print(f"  {len(attention) - len(ok)} of {len(attention)} diffusers backends cannot run here"
          + (":" if args.all else " (--all names each and why)"))
    if args.all:
        for a in attention:
            if not a["ok"]:
                print(f"  - {a['backend']}: {a['reason']}")
    refused = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows) - len(refused)} of {len(rows)} combinations run; refused ones, by reason:")
    seen = set()
    for r in refused:
        key = r["reason"].split(". Alternative")[0]
        if key in seen and not args.all:
            continue
        seen.add(key)
        print(f"  - {r['value']} + offload={r['offload']} compile={r['compile']}: {r['reason']}")
    return 0


def cmd_quantize(args) -> int:
    import torch

    from . import __version__, apply, measure, models
    from .cli import check_out_dir, save_pipeline_dir
    from .recipe import Recipe

    spec = models.get_model(args.model)
    weights = models.resolve_weights(spec, args.weights, seed=args.weights_seed)
    recipe = Recipe.parse(args.recipe)
    if recipe.offload != "none" or recipe.compile != "off":
        raise InputError("quantize takes component values only (offload and compile are applied at run time)")
    if not recipe.quantized():
        raise InputError("the recipe quantizes nothing; e.g. --recipe transformer=torchao-int8wo")
    for comp, value in recipe.quantized().items():
        if value.startswith("gguf-"):
            raise InputError(f"{comp}={value}: GGUF is a single-file format; use `vramfit export-gguf "
                             f"{args.model} --type {value.removeprefix('gguf-')} --out FILE.gguf`")
    out = check_out_dir(args.out)
    device = measure.resolve_device(args.device)
    apply.check(recipe, device, spec)
    # Saved quantized: diffusers components (transformer, vae) whose backend serializes. Stored bf16 and
    # quantized again on load: layerwise casting (a runtime hook, not a format) and the text encoders --
    # transformers 5 does not recognise in-memory-quantized state dicts (quanto's weight._data/_scale load as
    # MISSING and get re-initialised), while its quantize-on-load from bf16 works for every backend.
    on_load = {c: v for c, v in recipe.quantized().items() if not savable(c, v)}
    stored = recipe.with_(**{c: "bf16" for c in on_load})
    manifest = apply.Manifest()
    comps = {c: apply.load_component(spec, weights, stored, c, device, manifest) for c in models.COMPONENTS}
    pipe = apply.assemble(spec, weights, comps)
    size = save_pipeline_dir(pipe, out, {
        "written_by": f"vramfit {__version__}", "model": spec.name, "source_weights": weights.describe(),
        "recipe": str(recipe.with_(offload="none")), "stored": stored.components, "applied_on_load": on_load,
        "manifest": manifest.steps})
    print(f"wrote {out} ({size / 1e6:.1f} MB): {recipe}")
    for c, v in on_load.items():
        why = "layerwise casting is a runtime hook" if v.startswith("fp8-layerwise") else \
            "transformers reloads text encoders by quantizing bf16 weights on load"
        print(f"  {c}={v}: stored bf16, quantized when loading ({why})")
    print(f"run it with: vramfit generate PROMPT --model {spec.name} --weights {out}")
    del torch
    return 0


def savable(component: str, value: str) -> bool:
    from . import quant

    return component in ("transformer", "vae") and quant.get_spec(value).serializable


def cmd_export_gguf(args) -> int:
    import torch

    from . import apply, gguf_io, models
    from .cli import atomic_write
    from .recipe import Recipe

    spec = models.get_model(args.model)
    weights = models.resolve_weights(spec, args.weights, seed=args.weights_seed)
    qtype = args.type.lower().removeprefix("gguf-")
    if qtype not in gguf_io.supported_qtypes():
        raise InputError(f"--type {args.type!r}: vramfit writes {', '.join(gguf_io.supported_qtypes())}")
    from .validate import check_out_path

    out = check_out_path(args.out, ".gguf")
    manifest = apply.Manifest()
    tr = apply.load_component(spec, weights, Recipe(), "transformer", torch.device("cpu"), manifest)
    info = {}
    atomic_write(out, lambda tmp: info.update(gguf_io.export_gguf(tr, qtype, tmp) or {}))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {qtype}); use it with "
          f"`vramfit generate PROMPT --model {spec.name} --gguf {out}`")
    return 0
