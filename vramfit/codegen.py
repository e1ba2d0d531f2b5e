"""``vramfit code RECIPE``: print plain diffusers/transformers Python that runs the same recipe, with no vramfit in it.

The printed program makes the calls ``vramfit generate --weights hub|DIR`` makes, in the same order, built from
the same functions (``apply.component_quantization_config`` for the configs, ``quant.config_source`` for their
source, ``apply._dynamo_for`` for the dynamo flags, ``quant.layerwise_skip_patterns`` for fp8 casting):
dynamo settings -> ``FluxPipeline.from_pretrained(path, quantization_config=PipelineQuantizationConfig(...),
torch_dtype=...)`` -> fp8 layerwise casting -> placement or offload -> VAE decode mode, attention, compile ->
``pipe(...)`` with a CPU generator (as run.py). ``generate`` splits the call at diffusers' own seams and is
bit-identical to ``FluxPipeline.__call__``, so the image of the printed program equals generate's.

Steps diffusers has no call for (``offload=staged``/``stream``, vramfit's compile cache, ``cache=`` keys) are
printed as a comment naming them, followed by the nearest stock equivalent; what cannot be expressed at all is
refused with the reason and an alternative.
"""

from __future__ import annotations

import sys

from .errors import InputError, RecipeError

DEFAULT_PROMPT = "a red fox in the snow, photograph"


def add_parser(sub) -> None:
    c = sub.add_parser("code", help="print plain diffusers/transformers Python that runs a recipe (no vramfit import)")
    c.add_argument("recipe", help="a recipe string or preset, e.g. nf4+model-offload")
    c.add_argument("--model", default="flux-dev")
    c.add_argument("--weights", default=None, help="hub (default for real models) | a local diffusers-format "
                   "directory (e.g. written by vramfit export)")
    c.add_argument("--gguf", default=None, help="take the transformer from this GGUF file (from_single_file)")
    c.add_argument("--form", default="mapping", choices=("mapping", "backend"),
                   help="PipelineQuantizationConfig form: quant_mapping={...} or quant_backend=... (one backend)")
    c.add_argument("--prompt", default=DEFAULT_PROMPT)
    c.add_argument("--steps", type=int, default=None)
    c.add_argument("--height", type=int, default=None)
    c.add_argument("--width", type=int, default=None)
    c.add_argument("--guidance", type=float, default=None)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="cuda", help="the device the printed code runs on (cuda | cpu | cuda:N)")
    c.add_argument("--image", default="image.png", help="where the printed code saves its image")
    c.add_argument("--out", default=None, help="write the code to this .py file instead of stdout")
    c.set_defaults(func=cmd_code)


def cmd_code(args) -> int:
    from pathlib import Path

    import torch

    from . import models
    from .cli import atomic_write, resolve_recipe
    from .run import request_for

    spec = models.get_model(args.model)
    if args.weights == "random" or (args.weights is None and spec.always_random):
        raise InputError(f"random stand-in weights exist only inside vramfit; the printed code loads a checkpoint "
                         f"with from_pretrained. Alternative: `vramfit export {spec.name} --out DIR`, then "
                         f"`vramfit code ... --model {spec.name} --weights DIR`")
    weights = models.resolve_weights(spec, args.weights)
    recipe = resolve_recipe(args.recipe, weights)
    if args.gguf:
        if not Path(args.gguf).is_file():
            raise InputError(f"--gguf {args.gguf!r}: no such file")
        from .gguf_io import read_gguf_type

        recipe = recipe.with_(transformer=read_gguf_type(args.gguf))
    req = request_for(spec, args.prompt, args.steps, args.height, args.width, args.guidance, args.seed)
    req.validate()
    code = generate_code(spec, weights, recipe, req, torch.device(args.device), form=args.form,
                         image=args.image, gguf_file=args.gguf)
    if args.out:
        atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(code))
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(code)
    return 0


class _Code:
    def __init__(self):
        self.imports: list[str] = ["import torch"]
        self.lines: list[str] = []

    def need(self, line: str) -> None:
        if line not in self.imports:
            self.imports.append(line)

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def text(self, header: list[str]) -> str:
        return "\n".join([*header, *self.imports, "", *self.lines]) + "\n"


def generate_code(spec, weights, recipe, req, device, form: str = "mapping", image: str = "image.png",
                  gguf_file: str | None = None) -> str:
    """The program as a string; raises RecipeError/InputError for what it cannot express."""
    import torch

    from . import apply, models
    from .gguf_io import DIFFUSERS_CONVERTER_INNER_DIM

    q = apply.quant_module()
    offload, compile_scope, vae_decode = recipe.offload_kind, recipe.compile_scope, recipe.vae_decode
    for reason, alt in apply._unbuilt(recipe):
        # what generate refuses is refused here too; stream and cache= are vramfit's own steps: printed as a
        # comment with the nearest stock equivalent
        if not (reason.startswith("offload=stream") or reason.startswith("cache=")):
            raise RecipeError(f"{reason}. Alternative: {alt}")
    for reason, alt in apply.problems(recipe.components, offload if offload != "stream" else "group-block",
                                      compile_scope, recipe.attention, device.type):
        raise RecipeError(f"{reason}. Alternative: {alt}")
    dev = str(device)
    c = _Code()
    header = [f"# Generated by `vramfit code` for recipe: {recipe}",
              f"# model {spec.name}, weights {weights.path}; plain diffusers/transformers, nothing of vramfit.",
              f"# Same calls as `vramfit generate --weights {weights.path if weights.kind == 'dir' else 'hub'}`."]

    # dynamo flags first: generate applies them before loading (some are read at the first compile)
    dynamo = apply._dynamo_for(recipe, q if recipe.quantized() else None, device.type)
    if dynamo:
        c.need("import torch._dynamo")
        c.add("# dynamo/inductor settings this recipe needs under torch.compile")
        for k, v in dynamo.items():
            target = k if k.startswith("torch.") else f"torch._dynamo.config.{k}"
            c.add(f"{target} = {v!r}")
        c.add("")

    # quantization configs: the same per-component configs generate's loader uses
    configs = {comp: cfg for comp in models.COMPONENTS
               if (cfg := apply.component_quantization_config(recipe, weights, comp)) is not None}
    if configs:
        # builds the real object too, so a form diffusers refuses is refused here with its reason
        q.pipeline_quantization_config(configs, recipe.components, form)
        c.need("from diffusers import PipelineQuantizationConfig")
        if form == "mapping":
            items = []
            for comp in configs:
                imports, expr = q.config_source(getattr(recipe, comp), comp)
                for line in imports:
                    c.need(line)
                items.append(f"        {comp!r}: {expr},")
            c.add("quantization_config = PipelineQuantizationConfig(", "    quant_mapping={", *items, "    }", ")")
        else:
            backend, kwargs = q.pipeline_backend_source(next(iter({getattr(recipe, x) for x in configs})))
            c.add("quantization_config = PipelineQuantizationConfig(",
                  f"    quant_backend={backend!r},", f"    quant_kwargs={kwargs},",
                  f"    components_to_quantize={sorted(configs)!r},", ")")
    prequantized = [comp for comp in models.COMPONENTS if models.saved_quantization(weights, comp) is not None]
    if prequantized:
        c.add(f"# {', '.join(prequantized)}: pre-quantized in the checkpoint, loaded as saved")

    dtypes = {comp: _dtype_src(getattr(recipe, comp)) for comp in models.COMPONENTS}
    if len(set(dtypes.values())) == 1:
        torch_dtype = dtypes["transformer"]
    else:
        torch_dtype = "{" + ", ".join(f"{k!r}: {v}" for k, v in dtypes.items()) + ", 'default': torch.bfloat16}"
    load_args = [repr(weights.path)]
    if configs:
        load_args.append("quantization_config=quantization_config")
    load_args.append(f"torch_dtype={torch_dtype}")
    device_map = apply.pipeline_device_map(recipe, device, configs, weights, gguf_file)
    if device_map:
        c.add("# device_map: every weight lands on the GPU as it is read (and is quantized there)")
        load_args.append(f"device_map={device_map!r}")
    c.need("from diffusers import FluxPipeline")
    if recipe.transformer.startswith("gguf-"):
        if not gguf_file:
            raise RecipeError(f"transformer={recipe.transformer} without a GGUF file: vramfit quantizes to GGUF in "
                              "memory, which diffusers has no call for. Alternative: `vramfit export-gguf "
                              f"{spec.name} --type {recipe.transformer.removeprefix('gguf-')} --out FILE.gguf`, then "
                              "--gguf FILE.gguf")
        tcfg = spec.config("transformer")
        if tcfg["num_attention_heads"] * tcfg["attention_head_dim"] != DIFFUSERS_CONVERTER_INNER_DIM:
            raise RecipeError(f"{spec.name}'s GGUF file needs vramfit's key conversion (diffusers' FLUX GGUF converter "
                              f"assumes FLUX.1's width {DIFFUSERS_CONVERTER_INNER_DIM}). Alternative: flux-dev or "
                              "flux-schnell, or a recipe without gguf-")
        c.need("from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig")
        c.add("transformer = FluxTransformer2DModel.from_single_file(",
              f"    {str(gguf_file)!r}, config={weights.path!r}, subfolder='transformer',",
              "    quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16), torch_dtype=torch.bfloat16,",
              ")")
        load_args.append("transformer=transformer")
    c.add("pipe = FluxPipeline.from_pretrained(", *(f"    {a}," for a in load_args), ")")

    # after loading: fp8 layerwise casting is not a quantizer
    for comp in models.COMPONENTS:
        value = getattr(recipe, comp)
        if value.startswith("fp8-layerwise"):
            storage = "torch.float8_e5m2" if value.endswith("e5m2") else "torch.float8_e4m3fn"
            if comp in ("transformer", "vae"):
                c.add(f"pipe.{comp}.enable_layerwise_casting(storage_dtype={storage}, compute_dtype=torch.bfloat16)")
            else:
                c.need("from diffusers.hooks import apply_layerwise_casting")
                skip = q.layerwise_skip_patterns(models.empty_component(spec, comp, torch.bfloat16))
                c.add(f"apply_layerwise_casting(pipe.{comp}, storage_dtype={storage}, compute_dtype=torch.bfloat16,",
                      f"                        skip_modules_pattern={skip!r})")
        elif value.startswith("gguf-") or value in ("bf16", "fp16", "fp32") or comp in configs or comp in prequantized:
            continue
        else:
            raise RecipeError(f"{comp}={value}: no from_pretrained config and no post-load call to print")

    _offload(c, recipe, offload, dev, device)
    _runtime(c, spec, recipe, vae_decode, compile_scope)

    c.add("", "image = pipe(",
          f"    prompt={req.prompt!r},",
          f"    height={req.height}, width={req.width},",
          f"    num_inference_steps={req.steps}, guidance_scale={req.guidance!r},",
          f"    max_sequence_length={req.max_sequence_length},",
          f"    generator=torch.Generator('cpu').manual_seed({req.seed}),  # CPU noise: the same on every device",
          ").images[0]",
          f"image.save({image!r})")
    return c.text(header)


def _dtype_src(value: str) -> str:
    return {"fp16": "torch.float16", "fp32": "torch.float32"}.get(value, "torch.bfloat16")


def _offload(c: _Code, recipe, offload: str, dev: str, device) -> None:
    def group(comment: str | None = None):
        if comment:
            c.add(comment)
        c.add(f"pipe.enable_group_offload(onload_device=torch.device({dev!r}), offload_device=torch.device('cpu'),",
              "                          offload_type='block_level', num_blocks_per_group=1, use_stream=True)")

    if offload == "none":
        c.add(f"pipe.to({dev!r})")
    elif offload == "model":
        c.add(f"pipe.enable_model_cpu_offload(device={dev!r})")
    elif offload == "sequential":
        c.add(f"pipe.enable_sequential_cpu_offload(device={dev!r})")
    elif offload in ("group-block", "group-leaf"):
        if offload == "group-leaf":
            c.add(f"pipe.enable_group_offload(onload_device=torch.device({dev!r}), offload_device=torch.device('cpu'),",
                  "                          offload_type='leaf_level', use_stream=True)")
        else:
            group()
    elif offload == "staged":
        c.add("# offload=staged (vramfit: build the encoders -> encode -> free them -> transformer -> denoise -> free ->",
              "# VAE -> decode; never two stages in memory) has no diffusers call. Nearest stock equivalent:")
        if device.type == "cuda":
            c.add("# model offload, one component on the GPU at a time", f"pipe.enable_model_cpu_offload(device={dev!r})")
        else:
            c.add("# on the CPU, everything resident", f"pipe.to({dev!r})")
    elif offload == "stream":
        group(f"# offload={recipe.offload} (vramfit's weight-streaming executor: resident blocks + a pinned ring) has "
              "no diffusers call.\n# Nearest stock equivalent: group offload with CUDA streams, one block per group")
    else:
        raise RecipeError(f"offload={offload}: vramfit code does not know how to print it. Alternative: offload=model "
                          "or offload=group-block")


def _runtime(c: _Code, spec, recipe, vae_decode: str, compile_scope: str) -> None:
    if vae_decode == "tiling":
        from .runtime import vae_tiles

        t = vae_tiles(spec.config("vae"))
        c.add("pipe.vae.enable_tiling()",
              f"# tiles of {t['tile_px']} px: diffusers' default tile ({t['native_px']} px) would not split a "
              f"{t['native_px']}x{t['native_px']} image",
              f"pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = {t['tile_px']}, {t['tile_latent']}")
    elif vae_decode == "slicing":
        c.add("pipe.vae.enable_slicing()")
    if recipe.attention != "native":
        c.add(f"pipe.transformer.set_attention_backend({recipe.attention!r})")
    cache = recipe.cache
    if cache != "none":
        kind, _, arg = cache.partition(":")
        stock = {"fbc": ("FirstBlockCacheConfig", f"threshold={arg}"),
                 "taylorseer": ("TaylorSeerCacheConfig", f"cache_interval={arg}" if arg else ""),
                 "magcache": ("MagCacheConfig", f"threshold={arg}" if arg else "")}.get(kind)
        c.add(f"# cache={cache}: vramfit's step cache; nearest stock equivalent, diffusers' own cache hook:")
        if stock:
            c.need(f"from diffusers import {stock[0]}")
            c.add(f"pipe.transformer.enable_cache({stock[0]}({stock[1]}))")
    if compile_scope == "regional":
        c.add("# in place: assigning a compiled wrapper would break offload hooks",
              "pipe.transformer.compile_repeated_blocks(fullgraph=True)")
    elif compile_scope == "full":
        c.add("pipe.transformer.compile(fullgraph=True)")
    if compile_scope != "off":
        c.add("# vramfit's compile cache (torch.compiler.save/load_cache_artifacts) is not part of this program; "
              "the first call compiles")
