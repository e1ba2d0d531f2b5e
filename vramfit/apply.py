"""Turn a Recipe into real diffusers/transformers calls, and record what was actually applied.

Every function here appends to a ``Manifest``: one entry per step that ran, with the API call used and a
check that it took effect (hooks present, modules compiled, ...). A step that cannot run is refused before
any heavy work with a RecipeError that gives the reason and an alternative -- never skipped.
"""

from __future__ import annotations

import functools
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
    if offload == "stream" and compile == "full":
        from . import stream

        yield stream.COMPILE_FULL_WHY, "offload=stream with compile=regional (compiles the slot templates)"
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
NOT_IN_THIS_BUILD: dict[str, str] = {}  # recipe keys parsed but not yet applied (runtime.py applies the speed keys)


def _unbuilt(recipe: Recipe):
    default = Recipe()
    for key, shown in NOT_IN_THIS_BUILD.items():
        if getattr(recipe, key) != getattr(default, key):
            yield f"{shown} is not implemented in this build", f"leave {key} at {getattr(default, key)}"
    if recipe.offload_kind == "stream" and importlib.util.find_spec("vramfit.stream") is None:
        yield "offload=stream: the streaming executor is not part of this build", "offload=group-leaf or offload=model"


@functools.lru_cache(maxsize=None)
def _square_128_linears(model_name: str, component: str) -> tuple[str, ...]:
    """Names of the component's Linear layers whose weight is exactly 128x128 (read from a meta-device build)."""
    m = models.empty_component(models.get_model(model_name), component, torch.bfloat16)
    return tuple(n for n, mod in m.named_modules()
                 if isinstance(mod, torch.nn.Linear) and tuple(mod.weight.shape) == (128, 128))


def model_problems(spec: ModelSpec, components: dict[str, str]):
    """Yield (reason, alternative) for what a backend cannot do with this model's layer shapes."""
    for comp, value in components.items():
        if value == "torchao-fp8dq-tensor" and comp in ("transformer", "text_encoder_2"):
            names = _square_128_linears(spec.name, comp)
            if names:  # seen on the H200 with flux-tiny (torchao 0.18.0, float8_tensor.py)
                yield (f"{comp}=torchao-fp8dq-tensor on {spec.name}: torchao takes the per-tensor scale of a 128x128 "
                       f"weight for 128x128 block scaling and its matmul fails ('input_tensor must be 1x128 "
                       f"scaled'); {spec.name} has {len(names)} such layers (e.g. {names[0]})"), \
                    f"{comp}=torchao-fp8dq (per-row scales) or torchao-fp8wo"


def check(recipe: Recipe, device: torch.device, spec: ModelSpec | None = None) -> dict:
    """Refuse what cannot run on this device (and, given ``spec``, with this model's layers), with reason and
    alternative. Returns dynamo settings to apply."""
    for reason, alt in _unbuilt(recipe):
        raise RecipeError(f"{reason}. Alternative: {alt}")
    if spec is not None:
        for reason, alt in model_problems(spec, recipe.components):
            raise RecipeError(f"{reason}. Alternative: {alt}")
    missing = _attention_missing(recipe.attention, device.type)
    if missing:
        raise RecipeError(f"attention={recipe.attention} cannot run here: {missing}. Alternative: attention=native")
    from . import runtime

    for reason, alt in problems(recipe.components, recipe.offload_kind, recipe.compile_scope, recipe.attention,
                                device.type):
        raise RecipeError(f"{reason}. Alternative: {alt}")
    for reason, alt in runtime.problems(recipe, device.type):
        raise RecipeError(f"{reason}. Alternative: {alt}")
    return _dynamo_for(recipe, quant_module() if recipe.quantized() else None, device.type)


def _attention_missing(attention: str, device_type: str) -> str | None:
    """What this machine lacks for a diffusers attention backend (its package, version or device), in diffusers' own
    words (``_check_attention_backend_requirements``), or None. Checked on CUDA only: on other devices ``problems``
    refuses every GPU-only backend first."""
    if device_type != "cuda" or attention == "native":
        return None
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:  # it takes the enum: a plain string got to its message as an AttributeError (`backend.value`)
        _check_attention_backend_requirements(AttentionBackendName(attention))
    except (RuntimeError, ImportError, ValueError) as e:
        return str(e).rstrip(". ")
    if attention.endswith("_hub"):  # its kernel is downloaded from the Hugging Face Hub when the backend is set
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return (f"the {attention} backend downloads its kernel from the Hugging Face Hub, and this process is "
                    "offline (HF_HUB_OFFLINE=1)")
    return None


def attention_support(device_type: str) -> list[dict]:
    """Every diffusers attention backend and whether a recipe with it runs on ``device_type`` here, with the reason
    and the alternative where not: the same checks ``check`` refuses with (``vramfit recipes`` prints them)."""
    from .recipe import attention_backends

    rows = []
    for backend in attention_backends():
        found = [f"{r}. Alternative: {a}" for r, a in problems({}, "none", "off", backend, device_type)]
        missing = None if found else _attention_missing(backend, device_type)
        if missing:
            found.append(f"attention={backend} cannot run here: {missing}. Alternative: attention=native")
        rows.append({"backend": backend, "ok": not found, "reason": "; ".join(found)})
    return rows


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
    if recipe.compile_cdtune:
        from .runtime import TORCHAO_INDUCTOR

        # torchao's recommended flags (coordinate-descent tuning), which its configs would otherwise set
        # process-wide unrecorded: only with +cdtune. H200 2026-12-02 (session 10), fp8dq + fused QKV + regional:
        # 14.6 s of compile and 0.1048 s/step without them, 199.8 s and 0.1037 s/step with them (session 9)
        settings.update(TORCHAO_INDUCTOR)
    if recipe.compile_scope == "full" and recipe.compile_autotune:
        from .runtime import FLUX_FAST_INDUCTOR

        settings.update(FLUX_FAST_INDUCTOR)  # flux-fast's inductor flags, with its fullgraph max-autotune compile
    if recipe.compile_atengemm:
        settings["torch._inductor.config.max_autotune_gemm_backends"] = "ATEN"
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
        try:
            old = getattr(obj, attr)
        except AttributeError:
            # torch renamed cache_size_limit to recompile_limit; some builds hide the old name (seen on CPU torch 2.13
            # in a full test run: "torch._dynamo.config.cache_size_limit does not exist")
            if attr != "cache_size_limit" or not hasattr(obj, "recompile_limit"):
                raise
            attr = "recompile_limit"
            old = getattr(obj, attr)
        _DYNAMO_JOURNAL.append((obj, attr, old, k))
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


def component_quantization_config(recipe: Recipe, weights: Weights, component: str):
    """The quantize-on-load config of one component (``from_pretrained(quantization_config=...)``), or None: for
    precisions, for steps applied after loading (fp8 layerwise casting is not a quantizer; GGUF is a file format
    loaded by ``from_single_file``), and for a component the checkpoint holds pre-quantized (it loads as saved).
    The one source of the configs, for the pipeline-level ``PipelineQuantizationConfig`` and for per-component
    loading (staged, and later serve and stream)."""
    value = getattr(recipe, component)
    q = quant_module() if value not in PRECISIONS else None
    if q is None or applied_after_load(value):
        return None
    if models.saved_quantization(weights, component) is not None:
        return None
    return q.quantization_config(value, component)


def load_component(
    spec: ModelSpec, weights: Weights, recipe: Recipe, component: str, device: torch.device,
    manifest: Manifest, gguf_file: str | None = None, run_device: torch.device | None = None,
) -> torch.nn.Module:
    """Build or load one component as the recipe says, quantized if asked, placed on ``device``. ``run_device``:
    the device the run computes on, where it differs from ``device`` (offload=stream places fp8 layerwise-cast
    components in host memory, ``stream.load_device``); None: ``device``."""
    from . import runtime

    value = getattr(recipe, component)
    dtype = DTYPES.get(value, torch.bfloat16)  # quantized components compute in bf16
    q = quant_module() if value not in PRECISIONS else None
    fuse = component == "transformer" and runtime.on(recipe, "fuse_qkv", "off")
    if component == "transformer" and gguf_file:
        if fuse:
            raise RecipeError("fuse_qkv=on with a GGUF transformer: its weights stay packed GGUF bytes. "
                              "Alternative: fuse_qkv=off")
        module = _load_gguf(spec, gguf_file, value, device, manifest)
        return module
    if weights.kind == "random":
        # a stand-in to be quantized is built in host memory and quantized onto the device layer by layer, as
        # quantize-on-load does with real checkpoints: the bf16 component never sits whole on the GPU
        build_on = torch.device("cpu") if q is not None else device
        # fp8 layerwise casting loads in host memory under offload=stream, so ``device`` is the CPU on a GPU run too
        layerwise = q is not None and q.get_spec(value).family == "layerwise"
        runs_on = torch.device(run_device) if layerwise and run_device is not None else device
        streamed = (q is not None and recipe.offload_kind == "stream" and runs_on.type == "cuda"
                    and component in ("transformer", "text_encoder_2"))
        if streamed:
            # offload=stream: each block is quantized on the GPU and parked in host memory as soon as its values
            # are drawn, so host memory never holds the bf16 component (23.8 GB for FLUX.1-dev's transformer:
            # host RSS peaked at 29.0 GB for NF4 stream on the H200 before this). fp8 layerwise casting: each block
            # is cast in host memory as soon as it is drawn, with no device round trip (drawn whole first, the
            # fp8-layerwise transformer + T5 stand-in peaked at 30.8 GB of host RSS on the H200 for 20.7 GB pinned)
            return _build_random_blockwise(spec, weights, component, value, dtype, device, manifest, fuse, park=True)
        if q is not None and _resident_blockwise(value, component):
            # drawn on the device block by block, each block fused (fuse_qkv=on) and quantized there as soon as it is
            # drawn: the device holds the quantized component plus one bf16 block, as quantize-on-load does, and no
            # weight crosses the host link (built in host memory and quantized onto the GPU layer by layer, the
            # fp8dq + fused-QKV stand-in took 31 s to load on the H200, session 10)
            return _build_random_blockwise(spec, weights, component, value, dtype, device, manifest, fuse, park=False)
        module = models.build_random_component(spec, component, weights.seed, build_on, dtype)
        manifest.add("load", component=component, source=f"random seed={weights.seed}", dtype=str(dtype),
                     device=str(build_on), generated_on=str(models.random_generation_device(build_on)),
                     **_describe(module))
        if fuse:  # before quantizing, as flux-fast does: the fused layers are quantized like the others
            runtime.fuse_qkv(module, manifest)
        if q is not None:
            entry = q.quantize_component(module, component, value, device)
            manifest.add(**{"component": component, **entry})
        return module
    # hub id or local directory: the real from_pretrained path, quantizing on load where the backend can.
    # A pre-quantized checkpoint (vramfit quantize) carries its quantization_config: it loads as saved.
    prequantized = models.saved_quantization(weights, component) is not None
    qconfig = component_quantization_config(recipe, weights, component)
    if recipe.offload_kind == "stream" and qconfig is not None and not fuse:
        from . import stream

        if stream.blockwise_from_host(value, component):
            return _load_streamed(spec, weights, recipe, component, value, dtype, device, manifest)
    if fuse:
        runtime.check_load(recipe, weights.kind, prequantized, qconfig is not None)
    kwargs = models.pretrained_load_kwargs(component, dtype, device, qconfig)
    module = models.load_pretrained_component(weights.path, component, dtype, device, quantization_config=qconfig)
    manifest.add("load", component=component, source=weights.path, dtype=str(dtype), device=str(device),
                 api=f"{type(module).__name__}.from_pretrained(subfolder={component!r})"
                 + (f", quantization_config={type(qconfig).__name__}" if qconfig is not None else "")
                 + (f", device_map={kwargs['device_map']}" if "device_map" in kwargs else "")
                 + (" (pre-quantized checkpoint: no re-quantization)" if prequantized else ""),
                 placed="by the backend while loading" if models.placed_by_backend(module) else f"module.to({str(device)!r})",
                 **_describe(module))
    if fuse:
        runtime.fuse_qkv(module, manifest)
    _after_load(module, component, value, device, manifest, qconfig)
    if recipe.offload_kind == "stream" and device.type == "cuda":
        from . import measure, stream

        if component in stream.BLOCK_LISTS:  # loaded whole on the GPU (quantize-on-load): blocks out before the next
            moved = stream.park_blocks(module, component)
            measure.free_memory(device)
            manifest.add("stream-park", component=component, bytes_to_host=moved,
                         api="vramfit.stream.park_blocks: the streamed blocks moved to host memory right after "
                             "from_pretrained, before the next component loads")
    return module


def _load_streamed(spec, weights: Weights, recipe: Recipe, component: str, value: str, dtype, device,
                   manifest: Manifest) -> torch.nn.Module:
    """offload=stream from a checkpoint: quantize-on-load would bring the whole quantized component onto the GPU
    (the transformer: 6.7 GB in NF4, 12 GB in int8; T5: 4.3 GB in NF4) before its blocks could move out. Instead the
    bf16 weights load into host memory (``from_pretrained`` maps the safetensors file) and
    ``stream.quantize_streamed`` quantizes one block at a time on the device -- the same library call per linear as
    quantize-on-load, and what the random stand-in does (``stream.blockwise_from_host`` says for which values)."""
    from . import stream

    host = torch.device("cpu")
    module = models.load_pretrained_component(weights.path, component, dtype, host)
    manifest.add("load", component=component, source=weights.path, dtype=str(dtype), device=str(host),
                 api=f"{type(module).__name__}.from_pretrained(subfolder={component!r}) into host memory, bf16 "
                     "(offload=stream: quantized block by block below, not on load)", **_describe(module))
    entry = stream.quantize_streamed(module, component, value, device)
    entry["when"] = "after from_pretrained, one block at a time (offload=stream)"
    manifest.add(**{"component": component, **entry})
    return module


def _after_load(module, component: str, value: str, device, manifest: Manifest, qconfig) -> None:
    """Steps a recipe value applies after ``from_pretrained``: fp8 layerwise casting (not a quantizer) and GGUF
    quantization in memory (no GGUF file given); a quantize-on-load or pre-quantized component has none."""
    q = quant_module() if value not in PRECISIONS else None
    if q is not None and qconfig is None and not _is_prequantized(module):
        entry = q.quantize_component(module, component, value, device)
        entry["when"] = "after from_pretrained (not a quantization config)"
        manifest.add(**{"component": component, **entry})


def _load_gguf(spec: ModelSpec, gguf_file: str, value: str, device, manifest: Manifest):
    from .gguf_io import load_gguf_transformer

    module = load_gguf_transformer(gguf_file, spec.config_dir / "transformer", torch.bfloat16, device)
    manifest.add("load", component="transformer", source=f"gguf:{gguf_file}", value=value,
                 api="FluxTransformer2DModel.from_single_file(quantization_config=GGUFQuantizationConfig)",
                 **_describe(module))
    return module


def _resident_blockwise(value: str, component: str) -> bool:
    """The resident stand-ins drawn block by block on their device (``_build_random_blockwise(park=False)``):
    torchao's, whose per-linear ``quantize_`` gives the same bytes per block as on the whole component."""
    from . import stream

    return component in stream.BLOCK_LISTS and quant_module().get_spec(value).family == "torchao"


def _build_random_blockwise(spec: ModelSpec, weights: Weights, component: str, value: str, dtype, device,
                            manifest: Manifest, fuse: bool, park: bool) -> torch.nn.Module:
    """The random stand-in quantized block by block while it is drawn (``stream.StreamedQuantizer.block_done`` as
    ``models.materialize_random``'s ``unit_done``): the same values and bytes as building it whole, fusing its q/k/v
    (``fuse``) and then quantizing it. ``park`` (offload=stream): drawn in host memory, each block quantized on the
    device and parked back in host memory, which never holds more than one bf16 block; else drawn on the device and
    kept there, which holds the quantized blocks plus one bf16 block. fp8 layerwise casting needs no device: each
    block is cast where it is drawn (host memory with ``park``) and the hooks come from diffusers' casting of the
    whole component at the end (``StreamedQuantizer.finish``)."""
    from . import stream

    module = models.empty_component(spec, component, dtype)
    params = sum(p.numel() for p in module.parameters())
    # what the drawn values weigh in ``dtype`` (a diffusers model's meta parameters are float32 whatever ``dtype``)
    bf16_bytes = params * torch.empty((), dtype=dtype).element_size()
    q = stream.StreamedQuantizer(module, component, value, device, park=park, fuse=fuse)
    on = torch.device("cpu") if park else torch.device(device)
    models.materialize_random(module, models.component_seed(weights.seed, component), on, dtype, units=q.blocks,
                              unit_done=q.block_done)
    manifest.add("load", component=component, source=f"random seed={weights.seed}", dtype=str(dtype),
                 device=str(on), generated_on=str(models.random_generation_device(on)), **{"class": type(module).__name__},
                 params=params, weight_bytes=bf16_bytes,
                 built="block by block, each block " + ("fused, " if fuse else "")
                       + (f"cast to {str(q.storage).removeprefix('torch.')} as soon as it is drawn" if q.layerwise
                          else "quantized and parked as soon as it is drawn" if park
                          else f"quantized on {on} as soon as it is drawn"))
    entry = q.finish()
    if fuse:
        q.record_fusion(manifest)
    manifest.add(**{"component": component, **entry})
    return module


def load_pipeline(spec: ModelSpec, weights: Weights, recipe: Recipe, device: torch.device, manifest: Manifest,
                  gguf_file: str | None = None, form: str = "mapping"):
    """The whole pipeline at once from a hub id or a local directory, through diffusers' own pipeline-level
    quantization: ``FluxPipeline.from_pretrained(path, quantization_config=PipelineQuantizationConfig(...),
    torch_dtype=...)`` with the per-component configs of ``component_quantization_config``, in either of
    diffusers' forms (``form``: mapping | backend). Steps that are not quantizers (fp8 layerwise casting) run after
    loading; then every component is placed where the offload strategy wants it (``models.place``)."""
    from diffusers import FluxPipeline

    q = quant_module()
    configs = {c: cfg for c in models.COMPONENTS
               if (cfg := component_quantization_config(recipe, weights, c)) is not None}
    pq = q.pipeline_quantization_config(configs, recipe.components, form) if configs else None
    dtypes = {c: DTYPES.get(getattr(recipe, c), torch.bfloat16) for c in models.COMPONENTS}
    torch_dtype = dtypes["transformer"] if len(set(dtypes.values())) == 1 else {**dtypes, "default": torch.bfloat16}
    kwargs: dict = {"torch_dtype": torch_dtype}
    if pq is not None:
        kwargs["quantization_config"] = pq
    device_map = pipeline_device_map(recipe, device, configs, weights, gguf_file)
    if device_map:
        kwargs["device_map"] = device_map
    extra = {}
    if gguf_file:
        extra["transformer"] = _load_gguf(spec, gguf_file, recipe.transformer,
                                          load_device_for(recipe, device, "transformer"), manifest)
    with _no_load_progress_bars():
        pipe = FluxPipeline.from_pretrained(weights.path, **kwargs, **extra)
    if pq is not None:
        quantized = {c: (_describe(getattr(pipe, c)).get("quantized_classes") or {}) for c in configs}
        form_api = ("quant_mapping={" + ", ".join(f"{c!r}: {type(cfg).__name__}(...)" for c, cfg in configs.items())
                    + "}") if form == "mapping" else (
            f"quant_backend={pq.quant_backend!r}, quant_kwargs={{...}}, components_to_quantize={pq.components_to_quantize}")
        manifest.add("pipeline-quantization", form=form,
                     api=f"FluxPipeline.from_pretrained(path, quantization_config=PipelineQuantizationConfig("
                         f"{form_api}), torch_dtype=...)" + (f", device_map={kwargs['device_map']!r}"
                                                            if "device_map" in kwargs else ""),
                     configs={c: {"value": getattr(recipe, c), "class": f"{type(cfg).__module__.split('.')[0]}."
                                  f"{type(cfg).__name__}", "config": _config_dict(cfg)} for c, cfg in configs.items()},
                     quantized_classes=quantized, verified=all(quantized.values()))
        if not manifest.steps[-1]["verified"]:
            raise RuntimeError(f"PipelineQuantizationConfig was passed but {[c for c, v in quantized.items() if not v]} "
                               "came back unquantized")
    for c in models.COMPONENTS:
        module = getattr(pipe, c).eval().requires_grad_(False)
        if c == "transformer" and gguf_file:
            continue
        value = getattr(recipe, c)
        target = load_device_for(recipe, device, c)
        prequantized = models.saved_quantization(weights, c) is not None
        manifest.add("load", component=c, source=weights.path, dtype=str(dtypes[c]), device=str(target),
                     api=f"FluxPipeline.from_pretrained -> {type(module).__name__}"
                     + (" via PipelineQuantizationConfig" if c in configs else "")
                     + (" (pre-quantized checkpoint: no re-quantization)" if prequantized else ""),
                     **_describe(module))
        _after_load(module, c, value, target, manifest, configs.get(c))
        models.place(module, target)
    return pipe


class _no_load_progress_bars:
    """diffusers' "Loading pipeline components" and transformers' "Loading weights" bars are not vramfit's lines
    (quiet start-up): off while loading, restored after."""

    def __enter__(self):
        from diffusers.utils import logging as dl
        from transformers.utils import logging as tl

        self.state = [(lib, lib.is_progress_bar_enabled()) for lib in (dl, tl)]
        for lib, _ in self.state:
            lib.disable_progress_bar()

    def __exit__(self, *exc):
        for lib, was in self.state:
            if was:
                lib.enable_progress_bar()


def pipeline_device_map(recipe: Recipe, device: torch.device, configs: dict, weights: Weights | None = None,
                        gguf_file: str | None = None) -> str | None:
    """``device_map`` for ``FluxPipeline.from_pretrained``: "cuda" when every component ends up on the GPU
    (no offload strategy) or a quantizer runs on CUDA only (torchao int4 tinygemm packing, fp8 dynamic); each
    weight then lands on the GPU and is quantized there (see ``models.pretrained_load_kwargs``), and an offload
    strategy moves the components out afterwards. diffusers takes only the device type here ("cuda" = the
    current CUDA device). None: load into host memory (offload strategies keep the weights there)."""
    if device.type != "cuda":
        return None
    if weights is not None and any((models.saved_quantization(weights, c) or {}).get("quant_method") == "quanto"
                                   for c in models.COMPONENTS):
        # a pre-quantized quanto checkpoint with a device_map fails inside diffusers 0.42.1's allocator warm-up
        # ("Parameter or buffer with name=...weight._data not found", seen on the H200): it loads into host
        # memory and `models.place` moves the packed weights after
        return None
    if any(models.quantizes_on_cuda_only(cfg) for cfg in configs.values()):
        return device.type
    if any(applied_after_load(getattr(recipe, c)) and not (c == "transformer" and gguf_file)
           for c in models.COMPONENTS):
        # a step applied after loading (fp8 layerwise casting, GGUF quantized in memory) would find the bf16
        # component whole on the GPU with device_map (fp8-layerwise: a 33.8 GB load peak for a 25 GB pipeline and
        # 17 % slower steps than the stand-in, which is cast in host memory: H200, 2026-12-02); into host memory,
        # then the step, then placed
        return None
    resident = all(load_device_for(recipe, device, c).type == "cuda" for c in models.COMPONENTS)
    return device.type if resident else None


def applied_after_load(value: str) -> bool:
    """A recipe value that is not a quantize-on-load config but a step run on the loaded bf16 weights: fp8
    layerwise casting (not a quantizer) and GGUF (a file format: quantized in memory when no file is given)."""
    if value in PRECISIONS:
        return False
    q = quant_module()
    return q is not None and q.get_spec(value).family in ("layerwise", "gguf")


def _config_dict(cfg) -> dict:
    try:
        d = cfg.to_dict()
    except Exception:  # noqa: BLE001 - a config that cannot serialize is recorded by its repr
        return {"repr": repr(cfg)}
    return {k: (v if isinstance(v, (str, int, float, bool, type(None))) else str(v)) for k, v in d.items()}


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
    hooked = sum(hasattr(m, "_hf_hook") for m in module.modules())
    if hooked:  # accelerate hooks a device_map load may leave: Python work on every forward of those modules
        d["accelerate_hooks"] = hooked
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
    if recipe.offload_kind == "stream":
        from . import stream

        return stream.load_device(value, device, component)
    if recipe.offload not in ACCELERATOR_OFFLOADS:
        return device  # resident or staged
    if value in PRECISIONS:
        return torch.device("cpu")
    q = quant_module()
    spec = q.get_spec(value) if q is not None else None
    if spec is not None and not spec.needs_cuda and spec.family != "bnb":
        return torch.device("cpu")
    return device


def build_pipeline(spec, weights, recipe: Recipe, device: torch.device, manifest: Manifest, gguf_file=None,
                   form: str = "mapping"):
    """Everything at once (every offload strategy but staged): a hub id or a directory through ``load_pipeline``
    (pipeline-level quantization), random stand-ins component by component; then offload and runtime options."""
    # component by component: random stand-ins; fuse_qkv (fused before any quantizing, which the pipeline-level
    # load cannot do); stream (each component placed where the executor wants it, see stream.load_device)
    if weights.kind == "random" or recipe.fuse_qkv == "on" or recipe.offload_kind == "stream":
        comps = {
            c: load_component(spec, weights, recipe, c, load_device_for(recipe, device, c), manifest, gguf_file,
                              run_device=device)
            for c in models.COMPONENTS
        }
        pipe = assemble(spec, weights, comps)
    else:
        pipe = load_pipeline(spec, weights, recipe, device, manifest, gguf_file, form)
    apply_offload(pipe, recipe, device, manifest)
    apply_runtime_options(pipe, recipe, manifest)
    return pipe


def apply_offload(pipe, recipe: Recipe, device: torch.device, manifest: Manifest) -> None:
    o = recipe.offload
    if o in ("none", "staged"):
        return
    if recipe.offload_kind == "stream":
        from . import stream

        stream.apply_stream(pipe, recipe, device, manifest)
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
    """VAE decode mode, attention backend, step cache, compile, host-sync removal (``runtime``): applied to whichever
    components are loaded, each verified."""
    from . import runtime

    loaded = components if components is not None else {c: getattr(pipe, c) for c in models.COMPONENTS}
    runtime.apply(pipe, recipe, manifest, loaded)
