"""Turn a Recipe into real diffusers/transformers calls, and record what was actually applied.

Every function here appends to a ``Manifest``: one entry per step that ran, with the API call used and a
check that it took effect (hooks present, modules compiled, ...). A step that cannot run is refused before
any heavy work with a RecipeError that gives the reason and an alternative -- never skipped.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field

import torch

from . import models
from .errors import RecipeError
from .models import ModelSpec, Weights
from .recipe import PRECISIONS, Recipe

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ACCELERATOR_OFFLOADS = ("model", "sequential", "group-block", "group-leaf")
CPU_ATTENTION = ("native", "_native_math", "flex")


@dataclass
class Manifest:
    steps: list[dict] = field(default_factory=list)

    def add(self, step: str, **info) -> dict:
        entry = {"step": step, **info}
        self.steps.append(entry)
        return entry

    def find(self, step: str) -> list[dict]:
        return [s for s in self.steps if s["step"] == step]


def quant_module():
    """The quantization backends, or None while they are not part of this build."""
    try:
        return importlib.import_module("vramfit.quant")
    except ImportError:
        return None


# ----------------------------------------------------------------------------------------------------------
# checks before any heavy work


def problems(components: dict[str, str], offload: str, compile: str, attention: str, device_type: str,
             installed: bool = True):
    """Yield (reason, alternative) for every reason this combination cannot run on ``device_type``.
    ``installed=False`` leaves out what depends on this machine (libraries installed here, the local GPU): the
    planner judges a named GPU that way.

    The one rule set behind both the refusals (``check``) and ``vramfit recipes``' matrix (``compat_matrix``).
    """
    if device_type != "cuda":
        if offload in ACCELERATOR_OFFLOADS:
            yield (f"offload={offload} needs a CUDA GPU: it keeps weights in host memory and moves them onto the GPU "
                   f"when they are used, and this machine has no GPU"), \
                "offload=none, or offload=staged (loads each stage's components only for that stage)"
        if attention not in CPU_ATTENTION:
            yield f"attention={attention} needs a CUDA GPU (its kernels are GPU-only)", "attention=native"
    if compile != "off" and offload == "sequential":
        yield ("compile with offload=sequential: accelerate moves every leaf module's weights inside its forward, "
               "which splits the compiled graph at every layer"), \
            "offload=group-block with compile=regional, or offload=model with compile=regional"
    quantized = {c: v for c, v in components.items() if v not in PRECISIONS}
    if not quantized:
        return
    q = quant_module()
    if q is None:
        if not installed:
            return
        comp, value = next(iter(quantized.items()))
        yield f"{comp}={value}: quantization is not yet supported in this build", \
            f"{comp}=bf16 with offload=model or offload=group-block to fit less memory"
        return
    # the CPU-offload refusal above already covers quant's own accelerator-offload rule
    seen_cpu_offload = device_type != "cuda" and offload in ACCELERATOR_OFFLOADS
    for reason, alt in q._problems(components, offload, compile, device_type, installed=installed):
        if seen_cpu_offload and reason.startswith(f"offload={offload} moves weights"):
            continue
        yield reason, alt


# Recipe keys whose applying code is not part of this build yet: refused (never silently ignored) until it is.
NOT_IN_THIS_BUILD = {
    "compile_vae": "compile_vae=on", "fuse_qkv": "fuse_qkv=on", "cache": "cache=...", "host_sync": "host_sync=avoid",
}


def _unbuilt(recipe: Recipe):
    default = Recipe()
    for key, shown in NOT_IN_THIS_BUILD.items():
        if getattr(recipe, key) != getattr(default, key):
            yield f"{shown} is not implemented in this build", f"leave {key} at {getattr(default, key)}"
    if recipe.compile_graphs or recipe.compile_autotune:
        yield (f"compile={recipe.compile}: CUDA graphs / max-autotune are not implemented in this build",
               f"compile={recipe.compile_scope}")
    if recipe.offload_kind == "stream" and importlib.util.find_spec("vramfit.stream") is None:
        yield "offload=stream: the streaming executor is not part of this build", "offload=group-leaf or offload=model"


def check(recipe: Recipe, device: torch.device) -> dict:
    """Refuse what cannot run on this device, with reason and alternative. Returns dynamo settings to apply."""
    for reason, alt in _unbuilt(recipe):
        raise RecipeError(f"{reason}. Alternative: {alt}")
    if device.type == "cuda" and recipe.attention != "native":
        try:
            from diffusers.models.attention_dispatch import _check_attention_backend_requirements

            _check_attention_backend_requirements(recipe.attention)
        except (RuntimeError, ImportError, ValueError) as e:
            raise RecipeError(f"attention={recipe.attention} cannot run here: {e}. Alternative: attention=native")
    for reason, alt in problems(recipe.components, recipe.offload_kind, recipe.compile_scope, recipe.attention,
                                device.type):
        raise RecipeError(f"{reason}. Alternative: {alt}")
    return _dynamo_for(recipe, quant_module() if recipe.quantized() else None, device.type)


def compat_matrix(device_type: str = "cuda") -> list[dict]:
    """Every value (on the transformer, or on text_encoder_2 where it does not apply there) x offload x compile,
    judged by ``problems``: the code that enforces the refusals generates the table."""
    from .recipe import COMPILES, OFFLOADS, QUANT_VALUES

    q = quant_module()
    rows = []
    for value in ("bf16", "fp16", *QUANT_VALUES):
        comp = "transformer"
        if q is not None and value in q.BACKENDS and "transformer" not in q.BACKENDS[value].components:
            comp = q.BACKENDS[value].components[0]
        for offload in OFFLOADS:
            for compile in COMPILES:
                found = list(problems({comp: value}, offload, compile, "native", device_type))
                rows.append({"value": value, "component": comp, "offload": offload, "compile": compile,
                             "ok": not found, "reason": "; ".join(f"{r}. Alternative: {a}" for r, a in found)})
    return rows


def _dynamo_for(recipe: Recipe, q, device_type: str = "cuda") -> dict:
    if recipe.compile == "off":
        return {}
    settings = (dict(q.dynamo_settings(recipe.components, recipe.offload_kind, recipe.compile_scope, device_type))
                if q else {})
    if recipe.offload != "none" and "cache_size_limit" not in settings:
        # offload hooks add guards on module devices; the default limit of 8 recompiles falls back to eager
        settings["cache_size_limit"] = 64
    return settings


# (object, attribute, previous value) of every setting apply_dynamo_settings changed, in order: a recipe that
# fails (generate --vram falls back on out-of-memory) must not leave its compiler settings on for the next one
_DYNAMO_JOURNAL: list[tuple] = []


def _dynamo_target(key: str):
    import torch._dynamo

    obj, attr = torch._dynamo.config, key
    if key.startswith("torch."):
        *path, attr = key.split(".")[1:]
        obj = torch
        for part in path:
            obj = getattr(obj, part)
    return obj, attr


def dynamo_mark() -> int:
    """A point to return to with ``restore_dynamo_settings``."""
    return len(_DYNAMO_JOURNAL)


def restore_dynamo_settings(mark: int) -> dict:
    """Undo every setting ``apply_dynamo_settings`` changed since ``mark``, newest first; returns {key: value put
    back}."""
    restored = {}
    while len(_DYNAMO_JOURNAL) > mark:
        obj, attr, old, key = _DYNAMO_JOURNAL.pop()
        setattr(obj, attr, old)
        restored[key] = old
    return restored


def apply_dynamo_settings(settings: dict, manifest: Manifest) -> None:
    """Plain keys are ``torch._dynamo.config`` attributes; ``torch.``-prefixed keys are full attribute paths.
    The previous values are journaled (``dynamo_mark`` / ``restore_dynamo_settings``)."""
    if not settings:
        return
    for k, v in settings.items():
        obj, attr = _dynamo_target(k)
        _DYNAMO_JOURNAL.append((obj, attr, getattr(obj, attr), k))
        setattr(obj, attr, v)
    manifest.add("dynamo-config", settings=settings,
                 api="torch._dynamo.config.<key> = <value>; torch.<path> = <value> for full paths")


def weight_bytes(module: torch.nn.Module) -> int:
    q = quant_module()
    if q is not None:
        return q.weight_bytes(module)
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def load_component(
    spec: ModelSpec, weights: Weights, recipe: Recipe, component: str, device: torch.device,
    manifest: Manifest, gguf_file: str | None = None,
) -> torch.nn.Module:
    """Build or load one component as the recipe says, on ``device``, quantized if asked."""
    value = getattr(recipe, component)
    dtype = DTYPES.get(value, torch.bfloat16)  # quantized components compute in bf16
    q = quant_module() if value not in PRECISIONS else None
    if component == "transformer" and gguf_file:
        from .gguf_io import load_gguf_transformer

        module = load_gguf_transformer(gguf_file, spec.config_dir / "transformer", torch.bfloat16, device)
        manifest.add("load", component=component, source=f"gguf:{gguf_file}", value=value,
                     api="FluxTransformer2DModel.from_single_file(quantization_config=GGUFQuantizationConfig)",
                     **_describe(module))
        return module
    if weights.kind == "random":
        # a stand-in to be quantized is built in host memory and quantized onto the device layer by layer, as
        # quantize-on-load does with real checkpoints: the bf16 component never sits whole on the GPU
        build_on = torch.device("cpu") if q is not None else device
        module = models.build_random_component(spec, component, weights.seed, build_on, dtype)
        manifest.add("load", component=component, source=f"random seed={weights.seed}", dtype=str(dtype),
                     device=str(build_on), generated_on=str(models.random_generation_device(build_on)),
                     **_describe(module))
        if q is not None:
            manifest.add(**{"component": component, **q.quantize_component(module, component, value, device)})
        return module
    # hub id or local directory: the real from_pretrained path, quantizing on load where the backend can.
    # A pre-quantized checkpoint (vramfit quantize) carries its quantization_config: it loads as saved.
    prequantized = models.saved_quantization(weights, component) is not None
    qconfig = q.quantization_config(value, component) if q is not None and not prequantized else None
    module = models.load_pretrained_component(weights.path, component, dtype, device, quantization_config=qconfig)
    manifest.add("load", component=component, source=weights.path, dtype=str(dtype), device=str(device),
                 api=f"{type(module).__name__}.from_pretrained(subfolder={component!r})"
                 + (f", quantization_config={type(qconfig).__name__}" if qconfig is not None else "")
                 + (" (pre-quantized checkpoint: no re-quantization)" if prequantized else ""),
                 **_describe(module))
    if q is not None and qconfig is None and not _is_prequantized(module):
        # backends applied after load (fp8 layerwise casting), or a pre-quantized checkpoint
        manifest.add(**{"component": component, **q.quantize_component(module, component, value, device)})
    return module


def _is_prequantized(module) -> bool:
    cfg = getattr(module, "config", None)
    if isinstance(cfg, dict):
        return cfg.get("quantization_config") is not None
    return getattr(cfg, "quantization_config", None) is not None


def _describe(module: torch.nn.Module) -> dict:
    d = {
        "class": type(module).__name__,
        "params": sum(p.numel() for p in module.parameters()),
        "weight_bytes": weight_bytes(module),
    }
    q = quant_module()
    classes = q.quantized_classes(module) if q is not None else {}
    if classes:  # quantized on load (or a pre-quantized checkpoint): say which real classes hold the weights
        d["quantized_classes"] = classes
    return d


# ----------------------------------------------------------------------------------------------------------
# the whole pipeline


def assemble(spec: ModelSpec, weights: Weights, components: dict) -> "FluxPipeline":  # noqa: F821
    """A FluxPipeline over whatever components are given (others None: staged runs hold one stage at a time)."""
    from diffusers import FluxPipeline

    tokenizer, tokenizer_2 = models.load_tokenizers(spec, weights)
    scheduler = models.load_scheduler(spec, weights)
    pipe = FluxPipeline(
        scheduler=scheduler, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        vae=components.get("vae"), text_encoder=components.get("text_encoder"),
        text_encoder_2=components.get("text_encoder_2"), transformer=components.get("transformer"),
    )
    # The VAE may not be loaded yet (staged): its scale factor comes from the config, as diffusers would compute it
    pipe.vae_scale_factor = 2 ** (len(spec.config("vae")["block_out_channels"]) - 1)
    from diffusers.image_processor import VaeImageProcessor

    pipe.image_processor = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor * 2)
    return pipe


def load_device_for(recipe: Recipe, device: torch.device, component: str) -> torch.device:
    """Where a component is placed before the offload strategy takes over: in host memory when the strategy
    keeps it there, unless its quantization only runs on the GPU (CUDA-only kernels; bitsandbytes quantizes as
    it moves to the GPU), in which case the quantized component passes through the GPU once while loading."""
    value = getattr(recipe, component)
    if recipe.offload not in ACCELERATOR_OFFLOADS:
        return device  # resident or staged
    if value in PRECISIONS:
        return torch.device("cpu")
    q = quant_module()
    spec = q.get_spec(value) if q is not None else None
    if spec is not None and not spec.needs_cuda and spec.family != "bnb":
        return torch.device("cpu")
    return device


def build_pipeline(spec, weights, recipe: Recipe, device: torch.device, manifest: Manifest, gguf_file=None):
    comps = {
        c: load_component(spec, weights, recipe, c, load_device_for(recipe, device, c), manifest, gguf_file)
        for c in models.COMPONENTS
    }
    pipe = assemble(spec, weights, comps)
    apply_offload(pipe, recipe, device, manifest)
    apply_runtime_options(pipe, recipe, manifest)
    return pipe


def apply_offload(pipe, recipe: Recipe, device: torch.device, manifest: Manifest) -> None:
    o = recipe.offload
    if o in ("none", "staged"):
        return
    if o == "model":
        pipe.enable_model_cpu_offload(device=device)
        ok = all(hasattr(getattr(pipe, c), "_hf_hook") for c in models.COMPONENTS)
        manifest.add("offload", strategy=o, api=f"pipe.enable_model_cpu_offload(device={str(device)!r})",
                     verified=ok, hooks=len(pipe._all_hooks))
    elif o == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
        n = sum(1 for c in models.COMPONENTS for m in getattr(pipe, c).modules() if hasattr(m, "_hf_hook"))
        manifest.add("offload", strategy=o, api=f"pipe.enable_sequential_cpu_offload(device={str(device)!r})",
                     verified=n > 0, hooked_modules=n)
    else:
        kind = "block_level" if o == "group-block" else "leaf_level"
        kwargs = dict(onload_device=device, offload_device=torch.device("cpu"), offload_type=kind, use_stream=True)
        if kind == "block_level":
            kwargs["num_blocks_per_group"] = 1  # must be 1 with streams
        pipe.enable_group_offload(**kwargs)
        from diffusers.hooks import HookRegistry

        n = sum(
            1 for c in models.COMPONENTS for m in getattr(pipe, c).modules()
            if getattr(m, "_diffusers_hook", None) is not None and isinstance(m._diffusers_hook, HookRegistry)
            and m._diffusers_hook.get_hook("group_offloading") is not None
        )
        manifest.add("offload", strategy=o,
                     api=f"pipe.enable_group_offload(offload_type={kind!r}, use_stream=True"
                     + (", num_blocks_per_group=1)" if kind == "block_level" else ")"),
                     verified=n > 0, hooked_modules=n)
    if not manifest.steps[-1]["verified"]:
        raise RuntimeError(f"offload={o} was requested but no offload hooks are installed")


def apply_runtime_options(pipe, recipe: Recipe, manifest: Manifest, components=None) -> None:
    """VAE decode mode, attention backend and compile: applied to whichever components are loaded."""
    loaded = components if components is not None else {c: getattr(pipe, c) for c in models.COMPONENTS}
    vae = loaded.get("vae")
    if vae is not None and recipe.vae_decode != "none":
        if recipe.vae_decode == "tiling":
            vae.enable_tiling()
            manifest.add("vae", mode="tiling", api="vae.enable_tiling()", verified=bool(vae.use_tiling))
        else:
            vae.enable_slicing()
            manifest.add("vae", mode="slicing", api="vae.enable_slicing()", verified=bool(vae.use_slicing))
    tr = loaded.get("transformer")
    if tr is None:
        return
    if recipe.attention != "native":
        tr.set_attention_backend(recipe.attention)
        manifest.add("attention", backend=recipe.attention, api=f"transformer.set_attention_backend({recipe.attention!r})")
    if recipe.compile == "regional":
        # in place (module.compile): assigning a compiled wrapper would break offload hooks (DESIGN pitfalls)
        tr.compile_repeated_blocks(fullgraph=True)
        n = sum(1 for m in tr.modules() if getattr(m, "_compiled_call_impl", None) is not None)
        manifest.add("compile", mode="regional", api="transformer.compile_repeated_blocks(fullgraph=True)",
                     compiled_modules=n, verified=n > 0)
    elif recipe.compile == "full":
        tr.compile(fullgraph=True)
        ok = getattr(tr, "_compiled_call_impl", None) is not None
        manifest.add("compile", mode="full", api="transformer.compile(fullgraph=True)", compiled_modules=int(ok),
                     verified=ok)
