"""Quantization backends: what each recipe value is, where it runs, how it is applied, what it costs.

Every value is applied through its library's own API so the modules are that library's real quantized modules:

* ``bnb-*``      bitsandbytes ``Linear4bit``/``Params4bit`` and ``Linear8bitLt``/``Int8Params`` (the classes
                 diffusers' and transformers' bitsandbytes quantizers install);
* ``torchao-*``  ``torchao.quantization.quantize_`` with its config classes (tensor-subclass weights);
* ``quanto-*``   ``optimum.quanto.quantize`` + ``freeze`` (``QLinear`` with ``QTensor`` weights);
* ``fp8-layerwise*``  diffusers layerwise casting (fp8 storage, bf16 compute; hooks upcast per layer);
* ``gguf-*``     a GGUF file in the community's FLUX layout, loaded by diffusers' GGUF quantizer
                 (``GGUFLinear``/``GGUFParameter``), see ``gguf_io``.

Two ways to get a quantized component, both supported:
``quantize_component`` quantizes a module already in memory (random stand-ins, or after a bf16 load), and
``quantization_config`` gives the diffusers/transformers config for quantize-on-load with ``from_pretrained``.
For diffusers models quantized in memory the matching diffusers quantizer is attached
(``model.hf_quantizer``, ``config.quantization_config``), so ``save_pretrained`` writes a pre-quantized
checkpoint that ``from_pretrained`` reloads exactly as diffusers would have written it.

Measured on CPU (torch 2.13, 2 cores; see tests/test_quant.py): torchao int8wo/int8dq/fp8wo, quanto
int8/int4/fp8, fp8 layerwise casting, bitsandbytes nf4/fp4/int8 (bitsandbytes 0.50 has CPU kernels) and every
GGUF type run on CPU. torchao int4wo and fp8dq need CUDA (errors quoted in BACKENDS' notes).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass

import torch

from .errors import RecipeError

COMPONENTS = ("text_encoder", "text_encoder_2", "transformer", "vae")
OFFLOADS = ("none", "model", "sequential", "group-block", "group-leaf", "staged", "stream")
COMPILES = ("off", "regional", "full")
# Components whose class is a diffusers ModelMixin (the rest are transformers PreTrainedModels).
DIFFUSERS_COMPONENTS = ("transformer", "vae")
_LINEAR_COMPONENTS = ("transformer", "text_encoder", "text_encoder_2")
_VAE_WHY = ("the VAE is convolutions; only its mid-block attention has Linear layers (<1% of its weights), so "
            "Linear quantizers save nothing there")


@dataclass(frozen=True)
class QuantSpec:
    value: str  # recipe value, e.g. "bnb-nf4"
    family: str  # "bnb" | "torchao" | "quanto" | "layerwise" | "gguf"
    library: str  # pip distribution providing the kernels, e.g. "bitsandbytes"
    needs_cuda: bool  # cannot run on CPU
    components: tuple  # components it may apply to
    bits: float  # bits per weight of quantized linears, scales included (typical FLUX shapes)
    serializable: bool  # save_pretrained of the quantized model works (safetensors) and reloads
    note: str = ""


_BNB_LOAD_NOTE = ("bitsandbytes 0.50.2 quantizes and runs on CPU in memory, but diffusers 0.42.1's "
                  "BitsAndBytes quantizer (quantize-on-load, reloading a saved checkpoint) refuses without a GPU: "
                  "'No GPU found. A GPU is needed for quantization.'")


def _gguf_specs() -> dict[str, QuantSpec]:
    from . import gguf_io

    sizes = {  # (block values, block bytes) from ggml; bits = 8 * bytes / values
        "q8_0": (32, 34), "q5_1": (32, 24), "q5_0": (32, 22), "q4_1": (32, 20), "q4_0": (32, 18),
        "q6_k": (256, 210), "q5_k": (256, 176), "q4_k": (256, 144), "q3_k": (256, 110), "q2_k": (256, 84),
        "bf16": (1, 2), "f16": (1, 2),
    }
    writable = set(gguf_io.supported_qtypes())
    out = {}
    for q, (n, b) in sizes.items():
        note = "GGUF file in the FLUX (BFL) key layout, loaded by diffusers' GGUF quantizer; dequantized per matmul"
        if q == "f16":
            note = ("load-only: diffusers loads F16 tensors as plain weights (cast to the compute dtype), so an F16 "
                    "file gives an unquantized bf16 transformer")
        elif q not in writable:
            note = (f"load-only: community files of this type load (--weights file.gguf), but vramfit cannot "
                    f"write it (gguf-py 0.19 has no {q.upper()} quantizer)")
        out[f"gguf-{q}"] = QuantSpec(f"gguf-{q}", "gguf", "gguf", False, ("transformer",), 8 * b / n, False, note)
    return out


BACKENDS: dict[str, QuantSpec] = {
    "bnb-nf4": QuantSpec("bnb-nf4", "bnb", "bitsandbytes", False, _LINEAR_COMPONENTS, 4.5, True,
                         "NF4, blocksize 64, fp32 absmax, no double quant. " + _BNB_LOAD_NOTE),
    "bnb-fp4": QuantSpec("bnb-fp4", "bnb", "bitsandbytes", False, _LINEAR_COMPONENTS, 4.5, True,
                         "FP4, blocksize 64, fp32 absmax. " + _BNB_LOAD_NOTE),
    "bnb-int8": QuantSpec("bnb-int8", "bnb", "bitsandbytes", False, _LINEAR_COMPONENTS, 8.0, True,
                          "LLM.int8 (threshold 6.0, fp32 row scales); cannot be moved by model offload. "
                          + _BNB_LOAD_NOTE),
    "torchao-int8wo": QuantSpec("torchao-int8wo", "torchao", "torchao", False, _LINEAR_COMPONENTS, 8.0, True,
                                "int8 weight-only, per-row scales (Int8Tensor)"),
    "torchao-int4wo": QuantSpec("torchao-int4wo", "torchao", "torchao", True, _LINEAR_COMPONENTS, 4.25, True,
                                "int4 weight-only, group 128, tinygemm layout (Int4TilePackedTo4dTensor); the default "
                                "'plain' layout needs the mslk kernels ('Requires mslk >= 1.0.0'), the tinygemm layout "
                                "needs CUDA ('Torch not compiled with CUDA enabled' on CPU). ~9x slower than bf16 "
                                "without torch.compile"),
    "torchao-fp8wo": QuantSpec("torchao-fp8wo", "torchao", "torchao", False, _LINEAR_COMPONENTS, 8.0, True,
                               "float8 e4m3 weight-only (Float8Tensor), upcast per matmul"),
    "torchao-fp8dq": QuantSpec("torchao-fp8dq", "torchao", "torchao", True, _LINEAR_COMPONENTS, 8.0, True,
                               "float8 dynamic activation + float8 weight, per-row scales; needs CUDA compute "
                               "capability >= 8.9 ('Float8 dynamic quantization requires CUDA compute capability "
                               ">=8.9 or MI300+ or XPU.')"),
    "torchao-fp8dq-tensor": QuantSpec("torchao-fp8dq-tensor", "torchao", "torchao", True, _LINEAR_COMPONENTS, 8.0,
                                      True, "float8 dynamic activation + float8 weight, one scale per tensor "
                                      "(flux-fast's default granularity); needs CUDA compute capability >= 8.9"),
    "torchao-int8dq": QuantSpec("torchao-int8dq", "torchao", "torchao", False, _LINEAR_COMPONENTS, 8.0, True,
                                "int8 dynamic activation + int8 weight, per-row (Int8Tensor)"),
    "quanto-int8": QuantSpec("quanto-int8", "quanto", "optimum-quanto", False, _LINEAR_COMPONENTS, 8.0, True,
                             "qint8 weights, per-row bf16 scales. diffusers' Quanto quantizer is deprecated (removal in 1.0)"),
    "quanto-int4": QuantSpec("quanto-int4", "quanto", "optimum-quanto", False, _LINEAR_COMPONENTS, 4.25, True,
                             "qint4 weights, group 128, bf16 scale + shift. diffusers' Quanto quantizer is deprecated"),
    "quanto-fp8": QuantSpec("quanto-fp8", "quanto", "optimum-quanto", False, _LINEAR_COMPONENTS, 8.0, True,
                            "qfloat8 (e4m3) weights, per-row bf16 scales. diffusers' Quanto quantizer is deprecated"),
    "fp8-layerwise": QuantSpec("fp8-layerwise", "layerwise", "diffusers", False, COMPONENTS, 8.0, False,
                               "diffusers layerwise casting: float8_e4m3fn storage, bf16 compute; norms, embeddings "
                               "and proj_in/out stay bf16. Applied after loading (no quantization config)"),
    "fp8-layerwise-e5m2": QuantSpec("fp8-layerwise-e5m2", "layerwise", "diffusers", False, COMPONENTS, 8.0, False,
                                    "as fp8-layerwise with float8_e5m2 storage (more range, less precision)"),
    **_gguf_specs(),
}

# What to suggest when a value cannot run on CPU.
_CPU_ALTERNATIVE = {"torchao-int4wo": "quanto-int4 or gguf-q4_1", "torchao-fp8dq": "torchao-fp8wo or quanto-fp8",
                    "torchao-fp8dq-tensor": "torchao-fp8wo or quanto-fp8"}


def get_spec(value: str) -> QuantSpec:
    if value not in BACKENDS:
        raise RecipeError(f"unknown quantization {value!r}; known: {', '.join(BACKENDS)}")
    return BACKENDS[value]


def library_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


_IMPORT_NAME = {"bitsandbytes": "bitsandbytes", "torchao": "torchao", "optimum-quanto": "optimum.quanto",
                "gguf": "gguf", "diffusers": "diffusers"}


def _installed(dist: str) -> bool:
    try:
        return importlib.util.find_spec(_IMPORT_NAME[dist]) is not None and library_version(dist) is not None
    except ModuleNotFoundError:
        return False


def unavailable_reason(value: str, device_type: str) -> str | None:
    """None when ``value`` can run on ``device_type`` here; else why, with an alternative."""
    spec = get_spec(value)
    if not _installed(spec.library):
        return (f"{value} needs the {spec.library} package, which is not installed (pip install {spec.library}). "
                f"Alternative: {'fp8-layerwise (needs only diffusers)' if spec.family != 'layerwise' else 'bf16'}")
    if spec.needs_cuda and device_type != "cuda":
        return (f"{value} needs CUDA; it cannot run on {device_type} ({spec.note}). "
                f"Alternative on {device_type}: {_CPU_ALTERNATIVE.get(value, 'quanto-int8')}")
    if value.startswith("torchao-fp8dq") and device_type == "cuda" and torch.cuda.is_available():
        cc = torch.cuda.get_device_capability()
        if cc < (8, 9):
            return (f"{value} needs compute capability >= 8.9 (this GPU: {cc[0]}.{cc[1]}). "
                    "Alternative: torchao-fp8wo or torchao-int8dq")
    return None


# ----------------------------------------------------------------------------------------------------------
# quantization configs (quantize-on-load)


def _torchao_config(value: str):
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        PerRow,
        PerTensor,
    )

    # set_inductor_config=False: by default every torchao config calls recommended_inductor_config_setter(), which
    # turns on inductor's coordinate-descent tuning for the whole process, unrecorded and never undone: 237 of the
    # 258 s that the first compile of fp8dq + regional took on the H200 (session 9, compile_phases_s). vramfit
    # applies those flags itself (runtime.TORCHAO_INDUCTOR: journaled, in the manifest) with compile=...+cdtune only:
    # without them the same compile took 14.6 s for a step 1 % slower (session 10).
    kw = {"set_inductor_config": False}
    if value == "torchao-int8wo":
        return Int8WeightOnlyConfig(**kw)
    if value == "torchao-int4wo":
        # tinygemm layout: runs on CUDA with torch's own kernels; the default "plain" layout needs mslk
        return Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d", **kw)
    if value == "torchao-fp8wo":
        return Float8WeightOnlyConfig(**kw)
    if value == "torchao-fp8dq":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), **kw)
    if value == "torchao-fp8dq-tensor":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor(), **kw)
    if value == "torchao-int8dq":
        return Int8DynamicActivationInt8WeightConfig(**kw)
    raise ValueError(value)


_QUANTO_WEIGHTS = {"quanto-int8": "int8", "quanto-int4": "int4", "quanto-fp8": "float8"}
_BNB_4BIT = {"bnb-nf4": "nf4", "bnb-fp4": "fp4"}


def _check_component(value: str, component: str) -> QuantSpec:
    spec = get_spec(value)
    if component not in COMPONENTS:
        raise RecipeError(f"unknown component {component!r}; components: {', '.join(COMPONENTS)}")
    if component not in spec.components:
        why = _VAE_WHY if component == "vae" else f"{value} applies to {', '.join(spec.components)} only"
        alt = "fp8-layerwise" if component == "vae" else "a torchao-, quanto- or bnb- value"
        raise RecipeError(f"{component}={value}: {why}. Alternative: {component}={alt}")
    return spec


def quantization_config(value: str, component: str, compute_dtype=torch.bfloat16):
    """The quantization config for quantize-on-load: ``from_pretrained(..., quantization_config=<this>)``.

    diffusers configs for ``transformer``/``vae``, transformers configs for the text encoders. For ``gguf-*`` the
    diffusers ``GGUFQuantizationConfig`` for ``from_single_file`` of a GGUF file (transformer only).
    For ``fp8-layerwise*`` returns None: layerwise casting is not a quantizer, it is applied after loading
    (``quantize_component``).
    """
    spec = _check_component(value, component)
    if spec.family == "layerwise":
        return None
    if spec.family == "gguf":
        from diffusers import GGUFQuantizationConfig

        return GGUFQuantizationConfig(compute_dtype=compute_dtype)
    if component in DIFFUSERS_COMPONENTS:
        import diffusers as lib
    else:
        import transformers as lib
    if spec.family == "bnb":
        if value == "bnb-int8":
            return lib.BitsAndBytesConfig(load_in_8bit=True)
        return lib.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=_BNB_4BIT[value],
                                      bnb_4bit_compute_dtype=compute_dtype)
    if spec.family == "torchao":
        return lib.TorchAoConfig(quant_type=_torchao_config(value))
    if spec.family == "quanto":
        if component in DIFFUSERS_COMPONENTS:
            return lib.QuantoConfig(weights_dtype=_QUANTO_WEIGHTS[value])
        return lib.QuantoConfig(weights=_QUANTO_WEIGHTS[value])
    raise ValueError(value)


def config_source(value: str, component: str) -> tuple[list[str], str]:
    """``quantization_config(value, component)`` as Python source: (import lines, expression). ``vramfit code``
    prints it; tests/test_code.py evaluates it and compares with ``quantization_config``'s object."""
    spec = _check_component(value, component)
    if spec.family in ("layerwise", "gguf"):
        raise ValueError(f"{value} has no from_pretrained quantization config")
    lib = "diffusers" if component in DIFFUSERS_COMPONENTS else "transformers"
    if spec.family == "bnb":
        imports = [f"from {lib} import BitsAndBytesConfig as {_alias(lib, 'BitsAndBytesConfig')}"]
        name = _alias(lib, "BitsAndBytesConfig")
        if value == "bnb-int8":
            return imports, f"{name}(load_in_8bit=True)"
        return imports, (f"{name}(load_in_4bit=True, bnb_4bit_quant_type={_BNB_4BIT[value]!r}, "
                         "bnb_4bit_compute_dtype=torch.bfloat16)")
    if spec.family == "torchao":
        ao_cls, ao_args = {
            "torchao-int8wo": ("Int8WeightOnlyConfig", ""),
            "torchao-int4wo": ("Int4WeightOnlyConfig", "group_size=128, int4_packing_format='tile_packed_to_4d'"),
            "torchao-fp8wo": ("Float8WeightOnlyConfig", ""),
            "torchao-fp8dq": ("Float8DynamicActivationFloat8WeightConfig", "granularity=PerRow()"),
            "torchao-fp8dq-tensor": ("Float8DynamicActivationFloat8WeightConfig", "granularity=PerTensor()"),
            "torchao-int8dq": ("Int8DynamicActivationInt8WeightConfig", ""),
        }[value]
        ao_imports = ao_cls + "".join(f", {g}" for g in ("PerRow", "PerTensor") if g + "()" in ao_args)
        # as _torchao_config: torchao's inductor flags come as the recipe's recorded dynamo settings instead
        ao_args = ", ".join(a for a in (ao_args, "set_inductor_config=False") if a)
        name = _alias(lib, "TorchAoConfig")
        return ([f"from {lib} import TorchAoConfig as {name}", f"from torchao.quantization import {ao_imports}"],
                f"{name}(quant_type={ao_cls}({ao_args}))")
    if spec.family == "quanto":
        name = _alias(lib, "QuantoConfig")
        key = "weights_dtype" if lib == "diffusers" else "weights"
        return [f"from {lib} import QuantoConfig as {name}"], f"{name}({key}={_QUANTO_WEIGHTS[value]!r})"
    raise ValueError(value)


def _alias(lib: str, cls: str) -> str:
    # diffusers and transformers both name their classes BitsAndBytesConfig/TorchAoConfig/QuantoConfig
    return ("Diffusers" if lib == "diffusers" else "Transformers") + cls


# PipelineQuantizationConfig(quant_backend=...) names (diffusers' AUTO_QUANTIZATION_CONFIG_MAPPING keys)
_PIPELINE_BACKEND = {"bnb-nf4": "bitsandbytes_4bit", "bnb-fp4": "bitsandbytes_4bit", "bnb-int8": "bitsandbytes_8bit"}


def pipeline_backend_source(value: str) -> tuple[str, str]:
    """(quant_backend, quant_kwargs source) of the ``PipelineQuantizationConfig(quant_backend=...)`` form.

    Only bitsandbytes has it with diffusers 0.42.1 + transformers 5: for torchao and quanto diffusers refuses,
    'The signatures of the __init__ methods of the quantization config classes in `diffusers` and
    `transformers` don't match' (and quanto's keyword differs: weights_dtype vs weights)."""
    spec = get_spec(value)
    if value not in _PIPELINE_BACKEND:
        raise RecipeError(
            f"{value}: PipelineQuantizationConfig(quant_backend=...) cannot express it: diffusers {library_version('diffusers')} "
            f"refuses the {spec.library} backend form because the diffusers and transformers config classes take "
            "different arguments. Alternative: --form mapping (quant_mapping={component: config})")
    _, expr = config_source(value, "transformer")
    kwargs = expr[expr.index("(") + 1:-1]
    items = ", ".join(f"{k.strip()!r}: {v.strip()}" for k, v in (kv.split("=", 1) for kv in kwargs.split(", ")))
    return _PIPELINE_BACKEND[value], "{" + items + "}"


def pipeline_quantization_config(configs: dict, values: dict[str, str], form: str = "mapping"):
    """diffusers' ``PipelineQuantizationConfig`` for loading the whole pipeline at once, in either form:
    ``mapping`` = ``quant_mapping={component: config}`` (one config per component, any backends);
    ``backend`` = ``quant_backend=..., quant_kwargs=..., components_to_quantize=[...]`` (one backend and kwargs
    shared by every quantized component; refused with the reason otherwise). None when nothing is quantized on load.
    ``configs``: component -> ``quantization_config(...)``; ``values``: component -> recipe value."""
    from diffusers import PipelineQuantizationConfig

    if not configs:
        return None
    if form == "mapping":
        return PipelineQuantizationConfig(quant_mapping=dict(configs))
    if form != "backend":
        raise RecipeError(f"--form {form!r}: choose mapping or backend")
    distinct = sorted({values[c] for c in configs})
    if len(distinct) > 1:
        raise RecipeError(
            f"form=backend shares one backend and its arguments across components, and this recipe quantizes with "
            f"{' and '.join(distinct)}. Alternative: --form mapping, or one value for "
            f"{', '.join(sorted(configs))}")
    backend, kwargs_src = pipeline_backend_source(distinct[0])
    kwargs = eval(kwargs_src, {"torch": torch})  # the same source vramfit code prints
    return PipelineQuantizationConfig(quant_backend=backend, quant_kwargs=kwargs,
                                      components_to_quantize=sorted(configs))


def value_of_saved_config(saved: dict | None) -> str | None:
    """The recipe value a checkpoint's saved ``quantization_config`` (config.json) stands for; None if unknown."""
    if not saved:
        return None
    method = saved.get("quant_method")
    if method == "bitsandbytes":
        if saved.get("load_in_8bit"):
            return "bnb-int8"
        if saved.get("load_in_4bit"):
            return {"nf4": "bnb-nf4", "fp4": "bnb-fp4"}.get(saved.get("bnb_4bit_quant_type"))
        return None
    if method == "quanto":
        w = saved.get("weights_dtype", saved.get("weights"))
        return {v: k for k, v in _QUANTO_WEIGHTS.items()}.get(w)
    if method == "torchao":
        qt = saved.get("quant_type")
        t = qt.get("default", qt).get("_type") if isinstance(qt, dict) else None
        gran = qt.get("default", qt).get("_data", {}).get("granularity") if isinstance(qt, dict) else None
        # the config normalizes granularity to an (activation, weight) pair: serialized as a list of two
        grans = gran if isinstance(gran, list) else [gran]
        if t == "Float8DynamicActivationFloat8WeightConfig" and any(
                isinstance(g, dict) and g.get("_type") == "PerTensor" for g in grans):
            return "torchao-fp8dq-tensor"
        return {"Int8WeightOnlyConfig": "torchao-int8wo", "Int4WeightOnlyConfig": "torchao-int4wo",
                "Float8WeightOnlyConfig": "torchao-fp8wo", "Float8DynamicActivationFloat8WeightConfig": "torchao-fp8dq",
                "Int8DynamicActivationInt8WeightConfig": "torchao-int8dq"}.get(t)
    return None


# ----------------------------------------------------------------------------------------------------------
# storage accounting


def _tensor_parts(t: torch.Tensor):
    """Plain tensors holding ``t``'s data: the tensor itself, or a subclass's inner tensors, or bitsandbytes'
    quantization state (absmax, code, nested state) next to the packed data."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()  # torchao (qdata, scale, ...) and quanto (_data, _scale, _shift)
        for n in names:
            inner = getattr(t, n)
            if isinstance(inner, torch.Tensor):
                yield from _tensor_parts(inner)
        return
    yield t
    qs = getattr(t, "quant_state", None)  # bnb Params4bit
    if qs is not None:
        yield from _quant_state_parts(qs)
    scb = getattr(t, "SCB", None)  # bnb Int8Params row scales
    if isinstance(scb, torch.Tensor):
        yield scb


def _quant_state_parts(qs):
    for name in ("absmax", "code", "offset"):
        v = getattr(qs, name, None)
        if isinstance(v, torch.Tensor):
            yield v
    if getattr(qs, "state2", None) is not None:
        yield from _quant_state_parts(qs.state2)


def _storage_key(t: torch.Tensor):
    if t.device.type == "meta":
        return ("meta", id(t))
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr())


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameters and buffers as actually stored, quantization state included.

    Counts each underlying storage once (tied weights, views, bnb's CB == data), whole storage size: bnb
    Params4bit data + quant_state (absmax, code, nested state), Int8Params data + SCB, torchao tensor-subclass
    inner tensors (qdata, scale, zero_point ...), quanto QTensor _data/_scale/_shift, GGUFParameter raw bytes.
    Meta tensors count numel x element size. On CPU, bitsandbytes 4-bit repacks a layer at its first eval
    forward (absmax to bf16), so the count is of the storage as it is now.
    """
    seen: set = set()
    total = 0
    tensors = [*module.parameters(), *module.buffers()]
    for m in module.modules():
        # bnb Linear8bitLt: the first forward moves the weight's CB/SCB onto the module's MatmulLtState
        st = getattr(m, "state", None)
        for name in ("CB", "SCB"):
            v = getattr(st, name, None)
            if isinstance(v, torch.Tensor):
                tensors.append(v)
    for t in tensors:
        for part in _tensor_parts(t):
            key = _storage_key(part)
            if key in seen:
                continue
            seen.add(key)
            if part.device.type == "meta":
                total += part.numel() * part.element_size()
            else:
                total += part.untyped_storage().nbytes()
    return total


def quantized_classes(module: torch.nn.Module) -> dict[str, int]:
    """{"Linear4bit/Params4bit": n, "Linear/Int8Tensor": n, "QLinear/WeightQBytesTensor": n, ...}: quantized
    layers by module class / weight class (layers whose weight is a plain float tensor are not counted)."""
    out: dict[str, int] = {}
    for m in module.modules():
        w = m._parameters.get("weight") if hasattr(m, "_parameters") else None
        if w is None:
            continue
        if type(w) in (torch.Tensor, torch.nn.Parameter) and w.dtype.is_floating_point and w.element_size() >= 2:
            continue
        k = f"{type(m).__name__}/{type(w).__name__}"
        if hasattr(w, "quant_type") and hasattr(w.quant_type, "name"):  # GGUFParameter: say which GGUF type
            k += f"[{w.quant_type.name}]"
        if type(w) in (torch.Tensor, torch.nn.Parameter):  # plain storage in a low-precision dtype (fp8 casting)
            k = f"{type(m).__name__}/{str(w.dtype).removeprefix('torch.')}"
        out[k] = out.get(k, 0) + 1
    return out


# ----------------------------------------------------------------------------------------------------------
# in-memory quantization


def _not_convert_keys(module: torch.nn.Module) -> list[str]:
    """Module names the libraries' own quantize-on-load paths leave unquantized, so that in-memory quantization
    matches them: transformers skips ``_keep_in_fp32_modules`` (T5's ``wo``: T5 casts activations to ``wo``'s
    weight dtype, which would be uint8/fp8) plus its default skips; diffusers skips its keep-in-fp32 modules."""
    keep = list(getattr(module, "_keep_in_fp32_modules", None) or [])
    if hasattr(module, "all_tied_weights_keys"):  # transformers PreTrainedModel
        from transformers.quantizers.base import HfQuantizer

        return HfQuantizer.get_modules_to_not_convert(module, None, keep)
    return keep


def _repeated_units(module: torch.nn.Module) -> list[str]:
    """Names of the elements of the outermost ModuleLists (transformer blocks, T5 layers), in order."""
    units: list[str] = []
    for name, m in module.named_modules():
        if any(name.startswith(u + ".") for u in units):
            continue
        if isinstance(m, torch.nn.ModuleList):
            units += [f"{name}.{i}" for i in range(len(m))]
    return units


def _quanto_by_unit(module, weights, skip: list[str], device) -> int:
    """optimum-quanto's ``quantize`` + ``freeze`` one block at a time: each block moves to the device, is quantized
    there (quanto quantizes on the weights' device) and frozen before the next, so the bf16 component never sits
    whole on the device (moving it first cost a 30 GB load peak for flux-dev on the H200)."""
    from optimum.quanto import freeze, quantize
    from optimum.quanto.nn import QModuleMixin

    def names(root: torch.nn.Module, prefix: str) -> list[str]:
        return [n for n, m in root.named_modules()
                if n and not isinstance(m, QModuleMixin) and not _skipped(prefix + n, skip)]

    units = _repeated_units(module)
    for u in units:
        unit = module.get_submodule(u).to(device)
        todo = names(unit, u + ".")
        if todo:
            quantize(unit, weights=weights, include=todo)
            freeze(unit)  # replaces float weights by QTensors (quantize alone only wraps the modules)
    module.to(device)
    rest = [n for n in names(module, "") if not any(n == u or n.startswith(u + ".") for u in units)]
    if rest:
        quantize(module, weights=weights, include=rest)
    freeze(module)
    return len(units)


def _skipped(name: str, keys: list[str]) -> bool:
    return any(name == k or name.endswith("." + k) or name.startswith(k + ".") for k in keys)


def _replace_linears(module: torch.nn.Module, make, skip: list[str], prefix: str = "") -> None:
    for name, child in list(module.named_children()):
        full = prefix + name
        if _skipped(full, skip):
            continue
        if type(child) is torch.nn.Linear:
            setattr(module, name, make(child))
        else:
            _replace_linears(child, make, skip, full + ".")


def _bnb_quantize(module, value, device, compute_dtype):
    import bitsandbytes as bnb

    def make(lin: torch.nn.Linear):
        has_bias = lin.bias is not None
        if value == "bnb-int8":
            # what transformers'/diffusers' BitsAndBytesConfig(load_in_8bit=True) installs (threshold 6.0)
            new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, has_bias, has_fp16_weights=False,
                                      threshold=6.0, device="meta")
            # Int8Params.to(device) from CPU quantizes (int8_vectorwise_quant) on the target device
            new.weight = bnb.nn.Int8Params(lin.weight.data.cpu(), requires_grad=False,
                                           has_fp16_weights=False).to(device)
        else:
            new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, has_bias, compute_dtype=compute_dtype,
                                    compress_statistics=False, quant_type=_BNB_4BIT[value], device="meta")
            # Params4bit.to(device) quantizes (quantize_4bit) on the target device
            new.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=False,
                                           quant_type=_BNB_4BIT[value], module=new).to(device)
            if lin.in_features < new.weight.blocksize:
                # bitsandbytes 0.50.2 bug: the CPU fast path (_convert_weight_packed_for_cpu, taken in eval mode
                # on AVX512-BF16 CPUs) reshapes absmax to [out, in // blocksize] and fails when in < blocksize
                # ("shape '[128, 0]' is invalid"); such layers (FLUX's 32-wide pooled-text input in flux-tiny)
                # use the generic kernel instead
                new.support_avx512bf16_for_cpu = False
        if has_bias:
            new.bias = torch.nn.Parameter(lin.bias.data.to(device), requires_grad=False)
        new.requires_grad_(False)
        return new

    # linears first, one at a time from wherever they are (each is quantized on the device as it moves), then
    # the rest (norms, embeddings): the bf16 component never sits whole on the device
    _replace_linears(module, make, _not_convert_keys(module))
    module.to(device)
    return ("bitsandbytes.nn.Linear8bitLt/Int8Params(has_fp16_weights=False, threshold=6.0)" if value == "bnb-int8"
            else f"bitsandbytes.nn.Linear4bit/Params4bit(quant_type={_BNB_4BIT[value]!r}, blocksize=64, "
                 "compress_statistics=False)")


def layerwise_skip_patterns(module) -> tuple:
    """Module-name patterns fp8 layerwise casting leaves in the compute dtype on a transformers text encoder."""
    return ("norm", "embed", "position", "shared", *(rf"(^|\.){k}$" for k in _not_convert_keys(module)))


def _layerwise(module, component, value, device, compute_dtype):
    storage = torch.float8_e5m2 if value.endswith("e5m2") else torch.float8_e4m3fn
    # cast where the weights are, then move the fp8 weights: the bf16 component never sits whole on the device
    if hasattr(module, "enable_layerwise_casting"):  # diffusers ModelMixin: honours the model's skip patterns
        module.enable_layerwise_casting(storage_dtype=storage, compute_dtype=compute_dtype)
        module.to(device)
        return f"ModelMixin.enable_layerwise_casting(storage_dtype={storage}, compute_dtype={compute_dtype})"
    from diffusers.hooks import apply_layerwise_casting

    # transformers text encoders: diffusers' hook on any nn.Module; keep norms, embeddings and the model's
    # keep-in-fp32 modules (T5's wo: T5 casts its input to wo's weight dtype) in the compute dtype
    skip = layerwise_skip_patterns(module)
    apply_layerwise_casting(module, storage_dtype=storage, compute_dtype=compute_dtype, skip_modules_pattern=skip)
    module.to(device)
    return (f"diffusers.hooks.apply_layerwise_casting(storage_dtype={storage}, compute_dtype={compute_dtype}, "
            f"skip_modules_pattern={skip})")


def _attach_diffusers_quantizer(module, config) -> None:
    """Record on a diffusers model quantized in memory what ``from_pretrained`` would have recorded, so that
    ``save_pretrained`` serializes it through the quantizer (torchao flattens its tensor subclasses for
    safetensors) and writes ``quantization_config`` into config.json for the reload."""
    from diffusers.quantizers import DiffusersAutoQuantizer

    q = DiffusersAutoQuantizer.from_config(config, pre_quantized=False)
    if config.quant_method == "torchao":
        q.offload = False  # set by validate_environment (not called here): no cpu/disk device_map was involved
    q.modules_to_not_convert = []
    module.hf_quantizer = q
    module.is_quantized = True
    module.quantization_method = config.quant_method
    module.register_to_config(quantization_config=config)


def _gguf_quantize(module, value, device, compute_dtype):
    import tempfile
    from pathlib import Path

    from . import gguf_io

    qtype = value.removeprefix("gguf-")
    if qtype not in gguf_io.supported_qtypes():
        raise RecipeError(f"transformer={value}: {BACKENDS[value].note}. Alternative: gguf-q4_k, gguf-q4_1 or "
                          "gguf-q8_0, or load a community file with --weights file.gguf")
    with tempfile.TemporaryDirectory(prefix="vramfit-gguf-") as tmp:
        cfg_dir = Path(tmp) / "transformer"
        cfg_dir.mkdir()
        module.save_config(cfg_dir)
        path = Path(tmp) / f"transformer-{qtype}.gguf"
        gguf_io.export_gguf(module, qtype, path)
        loaded = gguf_io.load_gguf_transformer(path, cfg_dir, compute_dtype, device)
    # in place: the caller's object takes the loaded GGUF modules (same class and config, GGUF weights)
    for name in list(module._modules):
        module._modules[name] = loaded._modules[name]
    for name in list(module._parameters):
        module._parameters[name] = loaded._parameters[name]
    for name in list(module._buffers):
        module._buffers[name] = loaded._buffers[name]
    module.hf_quantizer = loaded.hf_quantizer
    module.is_quantized = True
    module.quantization_method = loaded.quantization_method
    return (f"gguf_io.export_gguf(qtype={qtype!r}) -> FluxTransformer2DModel.from_single_file("
            f"quantization_config=GGUFQuantizationConfig(compute_dtype={compute_dtype}))")


def quantize_component(module: torch.nn.Module, component: str, value: str, device,
                       compute_dtype=torch.bfloat16) -> dict:
    """Quantize an in-memory (bf16) component in place with the library's own API; returns the manifest entry.

    ``gguf-*`` (transformer only) goes through a real GGUF file: exported with ``gguf_io.export_gguf`` to a
    temporary directory and loaded by diffusers' ``from_single_file``; the loaded modules replace the module's
    children (the caller's object stays the same). For ``flux-dev`` this is slow (numpy quantization);
    ``vramfit export-gguf`` once and ``--weights file.gguf`` is the fast path.
    """
    spec = _check_component(value, component)
    device = torch.device(device)
    reason = unavailable_reason(value, device.type)
    if reason:
        raise RecipeError(f"{component}={value}: {reason}")
    if spec.family == "gguf" and component != "transformer":
        raise RecipeError(f"{component}={value}: GGUF files hold the FLUX transformer only")
    is_diffusers = hasattr(module, "save_config") and hasattr(module, "register_to_config")

    if spec.family == "bnb":
        api = _bnb_quantize(module, value, device, compute_dtype)
    elif spec.family == "torchao":
        from torchao.quantization import quantize_

        cfg = _torchao_config(value)
        skip = _not_convert_keys(module)
        # quantize_(device=...) moves each matched linear to the device just before quantizing it; the rest
        # follows after, so the bf16 component never sits whole on the device
        quantize_(module, cfg, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and not _skipped(fqn, skip),
                  device=device)
        module.to(device)
        api = f"torchao.quantization.quantize_(module, {type(cfg).__name__}(..., set_inductor_config=False))"
    elif spec.family == "quanto":
        from optimum.quanto import qfloat8, qint4, qint8

        w = {"quanto-int8": qint8, "quanto-int4": qint4, "quanto-fp8": qfloat8}[value]
        units = _quanto_by_unit(module, w, _not_convert_keys(module), device)
        api = (f"optimum.quanto.quantize(unit, weights={w.name}); optimum.quanto.freeze(unit), for each of "
               f"{units} blocks moved to the device one at a time, then the rest")
    elif spec.family == "layerwise":
        api = _layerwise(module, component, value, device, compute_dtype)
    elif spec.family == "gguf":
        api = _gguf_quantize(module, value, device, compute_dtype)
    else:
        raise ValueError(value)

    if is_diffusers and spec.family in ("bnb", "torchao", "quanto"):
        _attach_diffusers_quantizer(module, quantization_config(value, component, compute_dtype))
    module.eval().requires_grad_(False)

    classes = quantized_classes(module)
    return {
        "step": "quantize",
        "component": component,
        "value": value,
        "library": f"{spec.library}=={library_version(spec.library)}",
        "api": api,
        "quantized_modules": sum(classes.values()),
        "classes": classes,
        "weight_bytes": weight_bytes(module),
    }


# ----------------------------------------------------------------------------------------------------------
# combinations


def _problems(components: dict[str, str], offload: str, compile: str, device_type: str, installed: bool):
    """Yield (reason, alternative) for every known breakage of this combination."""
    if offload not in OFFLOADS:
        yield f"unknown offload {offload!r}", f"one of {', '.join(OFFLOADS)}"
        return
    if compile not in COMPILES:
        yield f"unknown compile {compile!r}", f"one of {', '.join(COMPILES)}"
        return
    specs = {}
    for comp, value in components.items():
        if value in ("bf16", "fp16", "fp32"):
            continue
        try:
            specs[comp] = _check_component(value, comp)
        except RecipeError as e:
            msg, _, alt = str(e).partition(" Alternative: ")
            yield msg, alt
            continue
        if installed:
            r = unavailable_reason(value, device_type)
            if r:
                msg, _, alt = r.partition(" Alternative")
                yield f"{comp}={value}: {msg.rstrip('. ')}", alt.partition(": ")[2] or "bf16"
        elif specs[comp].needs_cuda and device_type != "cuda":
            yield f"{comp}={value} needs CUDA ({specs[comp].note})", _CPU_ALTERNATIVE.get(value, "quanto-int8")

    if device_type != "cuda" and offload in ("model", "sequential", "group-block", "group-leaf"):
        # diffusers: "`enable_model_cpu_offload` requires accelerator, but not found" (same for sequential);
        # group offload onto the CPU would copy CPU to CPU
        yield (f"offload={offload} moves weights between CPU and an accelerator; on {device_type} there is none "
               "('enable_model_cpu_offload requires accelerator, but not found')"), "offload=none or offload=staged"

    for comp, spec in specs.items():
        v = spec.value
        if offload == "sequential" and spec.family in ("bnb", "gguf", "quanto"):
            why = {"bnb": "bitsandbytes 4-bit fails with 'Blockwise quantization only supports 16/32-bit floats'",
                   "gguf": "GGUFParameter's quant_type is lost when accelerate re-creates the parameter",
                   "quanto": "quanto's QTensor metadata is lost when accelerate re-creates the parameter"}[spec.family]
            yield (f"{comp}={v} with offload=sequential: accelerate's per-parameter offload hooks break quantized "
                   f"weights ({why})"), \
                f"{comp}={v} with offload=model, or {comp}=fp8-layerwise with offload=group-block"
        # bnb-int8 with offload=model is allowed: diffusers 0.42.1 refuses `.to()` of an 8-bit model only with
        # bitsandbytes < 0.48, and on the H200 (2026-12-02) model offload over a resident flux-tiny bnb-int8 pipeline
        # gave the resident latents (tests/test_gpu.py's probe); the matrix runs the cell on the real loading path
        # (sequential stays refused for every bnb value, above)
        if v == "quanto-fp8" and offload == "stream" and device_type == "cuda":
            yield (f"{comp}=quanto-fp8 with offload=stream: on CUDA optimum-quanto 0.2.7 packs fp8 weights as "
                   "MarlinF8PackedTensor, which exists only on the GPU (`assert data.device.type == \"cuda\"` when "
                   "its bytes are rebuilt in host memory, seen on the H200): the streaming executor cannot keep "
                   "them in host memory"), \
                f"{comp}=fp8-layerwise or {comp}=torchao-fp8wo with offload=stream, or {comp}=quanto-fp8 with " \
                "offload=model"
        if v in ("bnb-nf4", "bnb-fp4") and offload in ("group-block", "group-leaf"):
            yield (f"{comp}={v} with offload={offload}: CUDA illegal memory access inside diffusers 0.42.1 group "
                   "offload, seen on H200"), f"{comp}={v} with offload=model, or {comp}=fp8-layerwise with offload={offload}"
        if v == "bnb-int8" and offload in ("group-block", "group-leaf"):
            yield (f"{comp}=bnb-int8 with offload={offload}: group offload moves parameters with `param.data = ...`, "
                   "which leaves Int8Params.SCB (row scales) on the offload device (diffusers 0.42.1 "
                   "hooks/group_offloading.py; from reading the code, not run)"), \
                f"{comp}=torchao-int8wo with offload={offload}"
        if v == "torchao-int4wo" and offload in ("group-block", "group-leaf"):
            yield (f"{comp}=torchao-int4wo with offload={offload}: diffusers 0.42.1 group offload asks each weight "
                   "is_pinned(), which torchao 0.18.0's Int4TilePackedTo4dTensor does not implement "
                   "(NotImplementedError, seen on the H200)"), \
                f"{comp}=torchao-int4wo with offload=model or offload=stream, or {comp}=torchao-int8wo with " \
                f"offload={offload}"
        if spec.family == "quanto" and offload in ("group-block", "group-leaf"):
            yield (f"{comp}={v} with offload={offload}: quanto weights are wrapper tensor subclasses; diffusers "
                   "0.42.1 group offload moves them with `param.data = ...` (it special-cases only torchao), which "
                   "leaves _data/_scale on the offload device (from reading the code, not run)"), \
                f"{comp}=torchao-int8wo or fp8-layerwise with offload={offload}"


def check_combination(components: dict[str, str], offload: str, compile: str, device_type: str) -> None:
    """Raise RecipeError("reason. Alternative: ...") for a combination known to break; None if it should run.

    ``components``: component -> value (``bf16``/``fp16``/``fp32`` or a BACKENDS value). Also checks that each
    value's library is installed and that values needing CUDA are not asked of another device.
    """
    for reason, alt in _problems(components, offload, compile, device_type, installed=True):
        raise RecipeError(f"{reason}. Alternative: {alt}")


# More than the 57 FLUX.1 blocks: with offload hooks a block instance can recompile once; never let dynamo fall
# back to eager silently when it hits the default limit of 8.
OFFLOAD_COMPILE_CACHE_LIMIT = 128


# torch.compile on CUDA rewrites torchao int8 weight-only's ``mm(x, w_int8.to(bf16)) * scale`` into
# ``aten._weight_int8pack_mm`` (inductor's weight-only-quantization pattern, registered with its mkldnn passes),
# a kernel made for few rows: on the H200 a FLUX.1-dev step then took 65 s instead of 0.24 s eager
# (benchmarks/results/2026-11-21-h200, torchao-int8wo+compile). With mkldnn off inductor does not register that
# pattern and keeps the dequantize + cuBLAS mm. Process-wide and fixed at the first compile of the process. The
# compiled-graph caches do not key on that switch (a graph compiled earlier with the rewrite would be reused,
# seen on CPU), so they are off too: every process compiles afresh.
WOQ_INT8_REWRITE_OFF = {"torch.backends.mkldnn.enabled": False, "torch.compiler.config.force_disable_caches": True}


def dynamo_settings(components: dict[str, str], offload: str, compile: str, device_type: str = "cuda") -> dict:
    """``torch._dynamo.config`` values this combination needs (plain keys), plus full ``torch.`` attribute paths for
    other switches; the caller applies and records them.

    bitsandbytes under torch.compile produces data-dependent output shapes (capture_dynamic_output_shape_ops);
    offload hooks make dynamo recompile blocks, so the recompile limit goes up; torchao int8 weight-only on CUDA
    must not be rewritten into ``_weight_int8pack_mm`` (``WOQ_INT8_REWRITE_OFF``).
    """
    if compile == "off":
        return {}
    out: dict = {}
    if any(v.startswith("bnb-") for v in components.values()):
        out["capture_dynamic_output_shape_ops"] = True
    if offload not in ("none", "staged"):
        out["cache_size_limit"] = OFFLOAD_COMPILE_CACHE_LIMIT
    if device_type == "cuda" and components.get("transformer") == "torchao-int8wo":
        out.update(WOQ_INT8_REWRITE_OFF)
    return out


def compat_matrix() -> list[dict]:
    """Every value x offload x compile on a CUDA device, judged by ``check_combination``'s own rules (value on
    the transformer, or on text_encoder_2 where it does not apply to the transformer)."""
    rows = []
    for value, spec in BACKENDS.items():
        comp = "transformer" if "transformer" in spec.components else spec.components[0]
        for offload in OFFLOADS:
            for compile in COMPILES:
                problems = list(_problems({comp: value}, offload, compile, "cuda", installed=False))
                reason = "; ".join(f"{r}. Alternative: {a}" for r, a in problems)
                rows.append({"value": value, "offload": offload, "compile": compile, "ok": not problems,
                             "reason": reason})
    return rows
