"""Model registry and component builders.

A model is a name -> hub id + bundled architecture configs (package data, a few numbers each).
Components come from one of three weight sources:

* ``hub``    -- ``from_pretrained`` of the hub id (the real model; needs the files in the HF cache here);
* a local diffusers-format directory -- ``from_pretrained`` of that directory (also what ``vramfit export``
  and ``vramfit quantize`` write);
* ``random`` -- the exact architecture with seeded random weights, generated tensor by tensor straight on
  the target device and dtype (no full-size fp32 copy anywhere). Memory and latency do not depend on weight
  values, so a random stand-in measures like the real model.

Every component is built from its own seed, so building one stage at a time (``offload=staged``) gives the
same weights as building everything at once.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError

CONFIG_DIR = Path(__file__).parent / "configs"
COMPONENTS = ("text_encoder", "text_encoder_2", "transformer", "vae")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hub_id: str | None
    description: str
    always_random: bool = False
    default_steps: int = 28
    default_guidance: float = 3.5
    default_size: int = 1024
    max_sequence_length: int = 512  # T5 tokens the pipeline reads (diffusers' max_sequence_length)
    # largest image in pixels: FLUX.1's published range is 0.1-2.0 MP; 2048x1024 (2.10 MP) keeps the common
    # 2 MP sizes (1920x1088, 1440x1440) inside. --allow-large lifts it with a warning.
    max_pixels: int = 2048 * 1024
    extra: dict = field(default_factory=dict)

    @property
    def config_dir(self) -> Path:
        return CONFIG_DIR / self.name

    def config(self, component: str) -> dict:
        fn = "scheduler_config.json" if component == "scheduler" else "config.json"
        return json.loads((self.config_dir / component / fn).read_text())


REGISTRY: dict[str, ModelSpec] = {
    "flux-dev": ModelSpec("flux-dev", "black-forest-labs/FLUX.1-dev", "FLUX.1 [dev], 12B guidance-distilled"),
    "flux-schnell": ModelSpec(
        "flux-schnell", "black-forest-labs/FLUX.1-schnell", "FLUX.1 [schnell], 12B timestep-distilled",
        default_steps=4, default_guidance=0.0, max_sequence_length=256,
    ),
    "flux-tiny": ModelSpec(
        "flux-tiny", None, "FLUX architecture family, a few MB, random weights (CPU tests, demo)",
        always_random=True, default_steps=4, default_size=128, max_sequence_length=64, max_pixels=512 * 512,
    ),
}


def get_model(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise InputError(f"unknown model {name!r}; known models: {', '.join(REGISTRY)}")
    return REGISTRY[name]


# ----------------------------------------------------------------------------------------------------------
# weights sources


@dataclass(frozen=True)
class Weights:
    """Where weights come from: kind is 'random', 'hub' or 'dir' (then path is set)."""

    kind: str
    seed: int = 0
    path: str | None = None

    def describe(self) -> dict:
        d = {"kind": self.kind}
        if self.kind == "random":
            d["seed"] = self.seed
        if self.path:
            d["path"] = self.path
            marker = Path(self.path) / "vramfit.json"
            if marker.exists():  # a checkpoint vramfit wrote: say what it really holds
                d["checkpoint"] = json.loads(marker.read_text())
        return d


def resolve_weights(spec: ModelSpec, weights: str | None, seed: int = 0) -> Weights:
    """Turn the ``--weights`` argument into a Weights, checking it before any heavy work."""
    if weights is None:
        weights = "random" if spec.always_random else "hub"
    if weights == "random":
        return Weights("random", seed=seed)
    if weights == "hub":
        if spec.hub_id is None:
            raise InputError(f"{spec.name} has no hub checkpoint (it is a random stand-in); use --weights random, "
                             f"or a directory written by `vramfit export {spec.name}`")
        return Weights("hub", path=spec.hub_id)
    p = Path(weights)
    if not p.exists():
        raise InputError(f"--weights {weights!r}: not 'hub', 'random' or an existing directory")
    if not (p / "model_index.json").exists() and not (p / "transformer").is_dir():
        raise InputError(f"--weights {weights!r}: not a diffusers-format directory (no model_index.json)")
    return Weights("dir", path=str(p.resolve()))


# ----------------------------------------------------------------------------------------------------------
# tokenizers: built locally and deterministically for stand-ins (byte-level, no merges, no download)


def build_tokenizer(which: str, vocab_size: int, max_length: int):
    """A byte-level tokenizer with the special-token layout of the real one.

    CLIP: bytes at 0..255, ``<|startoftext|>`` and ``<|endoftext|>`` at the top of the vocab (the real CLIP-L
    puts them at 49406/49407, and the legacy pooling takes the argmax id as end of text); pad = end of text.
    T5: pad=0, eos=1, unk=2 as in T5, bytes from 3.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    byte_chars.sort()
    if which == "clip":
        vocab = {c: i for i, c in enumerate(byte_chars)}
        bos, eos = "<|startoftext|>", "<|endoftext|>"
        vocab[bos], vocab[eos] = vocab_size - 2, vocab_size - 1
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
        )
        specials = dict(bos_token=bos, eos_token=eos, pad_token=eos, unk_token=eos)
    elif which == "t5":
        vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
        vocab.update({c: i + 3 for i, c in enumerate(byte_chars)})
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        specials = dict(eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    else:
        raise ValueError(which)
    assert max(vocab.values()) < vocab_size, "tokenizer ids must fit the text encoder's vocabulary"
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **specials)


def stand_in_tokenizers(spec: ModelSpec):
    clip_cfg, t5_cfg = spec.config("text_encoder"), spec.config("text_encoder_2")
    return (
        build_tokenizer("clip", clip_cfg["vocab_size"], clip_cfg["max_position_embeddings"]),
        build_tokenizer("t5", t5_cfg["vocab_size"], spec.max_sequence_length),
    )


# ----------------------------------------------------------------------------------------------------------
# component construction


def component_class(component: str):
    if component == "transformer":
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel
    if component == "vae":
        from diffusers import AutoencoderKL

        return AutoencoderKL
    if component == "text_encoder":
        from transformers import CLIPTextModel

        return CLIPTextModel
    if component == "text_encoder_2":
        from transformers import T5EncoderModel

        return T5EncoderModel
    raise ValueError(component)


def empty_component(spec: ModelSpec, component: str, dtype: torch.dtype) -> torch.nn.Module:
    """The component with parameters on the meta device (no memory), buffers real on CPU."""
    from accelerate import init_empty_weights

    cls = component_class(component)
    cfg = spec.config(component)
    with init_empty_weights(include_buffers=False):
        if component.startswith("text_encoder"):
            from transformers import AutoConfig

            cfg = {k: v for k, v in cfg.items() if k not in ("architectures",)}
            config = AutoConfig.for_model(**cfg)
            model = cls._from_config(config, dtype=dtype)
            # T5's encoder.embed_tokens *is* shared (as the plain constructor builds it); under
            # init_empty_weights each registration makes a new meta parameter, so re-tie explicitly.
            model.set_input_embeddings(model.get_input_embeddings())
        else:
            model = cls.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    return model.eval().requires_grad_(False)


_COMPONENT_SEED_OFFSET = {"text_encoder": 1, "text_encoder_2": 2, "transformer": 3, "vae": 4}


def random_generation_device(target: torch.device) -> torch.device:
    """Random values are drawn on CUDA when the machine has one (fast; the same on every run of that machine),
    whatever the final device, so that every offload strategy sees the same weights."""
    if target.type == "cuda" or torch.cuda.is_available():
        return torch.device("cuda", target.index if target.type == "cuda" and target.index is not None else 0)
    return torch.device("cpu")


def _init_param(name: str, module: torch.nn.Module, shape, dtype, gen_device, g) -> torch.Tensor:
    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    is_norm = isinstance(module, norm_types) or "norm" in type(module).__name__.lower()
    if len(shape) <= 1:
        if is_norm and name == "weight":
            return torch.ones(shape, dtype=dtype, device=gen_device)
        if is_norm or name == "bias":
            return torch.zeros(shape, dtype=dtype, device=gen_device)
        return torch.ones(shape, dtype=dtype, device=gen_device)
    if isinstance(module, torch.nn.Embedding):
        return torch.empty(shape, dtype=dtype, device=gen_device).normal_(0.0, 1.0, generator=g)
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    bound = fan_in**-0.5
    return torch.empty(shape, dtype=dtype, device=gen_device).uniform_(-bound, bound, generator=g)


def materialize_random(module: torch.nn.Module, seed: int, device: torch.device, dtype: torch.dtype,
                       units=(), unit_done=None) -> None:
    """Replace every meta parameter with seeded random values, one tensor at a time, in ``dtype`` on ``device``.

    Init: linear/conv weights U(±1/sqrt(fan_in)) (PyTorch's default bound for weights), biases 0, norm scales 1,
    embeddings N(0, 1). Peak extra memory is one tensor.

    ``units`` (submodule names, e.g. the transformer's blocks) and ``unit_done(name)``: called as soon as the last
    parameter of a unit is drawn, before anything after it, so the caller can quantize the unit and move it away
    while the rest is still to come. The values drawn are the same with or without it (one generator, one order).
    """
    gen_device = random_generation_device(device)
    g = torch.Generator(gen_device).manual_seed(seed)
    # only tied parameters (one meta Parameter registered twice, say T5's shared embedding) are remembered: holding
    # every drawn Parameter kept each quantized block's bf16 weights alive until the end (35.7 GB host peak for the
    # NF4-streamed stand-in on the H200, 2026-12-02, where 14 GB remained after loading)
    uses = Counter(id(p) for mod in module.modules() for p in mod._parameters.values() if p is not None)
    tied = {i for i, n in uses.items() if n > 1}
    done: dict[int, torch.nn.Parameter] = {}
    units = tuple(units)

    def unit_of(name: str):
        return next((u for u in units if name == u or name.startswith(u + ".")), None)

    current = None
    # by name, fetched one at a time: named_modules()'s generator remembers every module it yielded, which kept the
    # bf16 layers a quantized block had replaced alive to the end
    for mname in [n for n, _ in module.named_modules()]:
        mod = module.get_submodule(mname)
        if units:
            u = unit_of(mname)
            if u != current:
                if current is not None and unit_done is not None:
                    unit_done(current)
                current = u
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) in done:  # tied weights stay tied
                mod._parameters[name] = done[id(p)]
                continue
            t = _init_param(name, mod, tuple(p.shape), dtype, gen_device, g).to(device)
            new = torch.nn.Parameter(t, requires_grad=False)
            if id(p) in tied:
                done[id(p)] = new
            mod._parameters[name] = new
        for name, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[name] = b.to(device)
    if current is not None and unit_done is not None:
        unit_done(current)


def component_seed(seed: int, component: str) -> int:
    """The generator seed of one component of the stand-in with weights seed ``seed``."""
    return seed * 100 + _COMPONENT_SEED_OFFSET[component]


def build_random_component(spec: ModelSpec, component: str, seed: int, device, dtype) -> torch.nn.Module:
    device = torch.device(device)
    model = empty_component(spec, component, dtype)
    materialize_random(model, component_seed(seed, component), device, dtype)
    return model


def quant_method(module) -> str | None:
    """The quantization method recorded on a loaded component ("bitsandbytes", "torchao", "quanto", "gguf"), or
    None for a plain one (diffusers and transformers both store the config on ``module.config``)."""
    cfg = getattr(module, "config", None)
    saved = cfg.get("quantization_config") if isinstance(cfg, dict) else getattr(cfg, "quantization_config", None)
    if saved is None:
        return None
    m = saved.get("quant_method") if isinstance(saved, dict) else getattr(saved, "quant_method", None)
    return str(getattr(m, "value", m))


def placed_by_backend(module) -> bool:
    """True when the quantization backend put the weights on their device itself while loading and they must not
    be moved again: bitsandbytes quantizes as each weight lands on the GPU, and 8-bit models refuse ``.to()``."""
    return quant_method(module) == "bitsandbytes"


def place(module: torch.nn.Module, device) -> torch.nn.Module:
    """The one placement point of every loading path: move a loaded (possibly quantized) component onto
    ``device``, unless its backend placed it already (``placed_by_backend``). Quantized torchao/quanto weights
    are tensor subclasses whose ``.to()`` moves their packed inner tensors, so only quantized bytes travel."""
    if device is None or placed_by_backend(module):
        return module
    return module.to(device)


def pretrained_load_kwargs(component: str, dtype, device, quantization_config=None) -> dict:
    """``from_pretrained`` keyword arguments for one component (the same ones the pipeline-level path passes).

    Quantize-on-load runs per parameter: diffusers (``load_model_dict_into_meta``) and transformers read one
    tensor at a time from the safetensors file and hand it to the quantizer (``create_quantized_param``) on its
    target device, so the bf16 component never exists whole anywhere. Onto a GPU, ``device_map={"": device}``
    makes that device the GPU: each weight is quantized there as it lands (GPU peak = the quantized component +
    one bf16 tensor, and the GPU's kernels quantize 12 B parameters in seconds where the CPU takes minutes; some
    packings exist only on CUDA: torchao int4 tinygemm, fp8 dynamic). Into host memory (offload strategies) the
    quantizer runs on the CPU and ``place`` leaves the quantized result there.

    Measured on CPU (a 6-block slice of flux-dev's T5-XXL, 2.58 GB in bf16, torch 2.13, transformers 5): a plain
    bf16 load adds 0.19 GB of RSS (the safetensors file is mapped, tensors are paged in when first touched);
    torchao-int8wo quantize-on-load ends with RssAnon 1.42 GB = the quantized weights, plus RssFile 2.45 GB =
    the file's pages, read once and still mapped (clean page cache the OS can drop), peak RSS 4.26 GB; quanto-int8
    peaks at 3.64 GB. So host memory never holds a private bf16 copy of the component."""
    kwargs = {"subfolder": component, "low_cpu_mem_usage": True}
    kwargs["dtype" if component.startswith("text_encoder") else "torch_dtype"] = dtype
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device_map"] = {"": torch.device(device)}
    return kwargs


def quantizes_on_cuda_only(quantization_config) -> bool:
    """torchao int4 weight-only (tinygemm packing) and float8 dynamic quantization: configs whose quantization
    step needs the CUDA kernels, so quantizing on the CPU first is not an option."""
    qt = getattr(quantization_config, "quant_type", None)
    return type(qt).__name__ in ("Int4WeightOnlyConfig", "Float8DynamicActivationFloat8WeightConfig")


def load_pretrained_component(source: str, component: str, dtype, device, quantization_config=None):
    """The real loading path: ``from_pretrained(source, subfolder=component)`` (hub id or local directory),
    quantized on load when a config is given, then placed on ``device`` (``place``)."""
    cls = component_class(component)
    model = cls.from_pretrained(source, **pretrained_load_kwargs(component, dtype, device, quantization_config))
    model = model.eval().requires_grad_(False)
    return place(model, device)


def saved_quantization(weights: "Weights", component: str) -> dict | None:
    """The quantization_config stored in a local checkpoint's component config, if any (hub: not looked up)."""
    if weights.kind != "dir":
        return None
    cfg = Path(weights.path) / component / "config.json"
    if not cfg.exists():
        return None
    return json.loads(cfg.read_text()).get("quantization_config")


def checkpoint_recipe(weights: "Weights") -> dict[str, str]:
    """Component values a local checkpoint really holds, whatever wrote it.

    Each component's config.json ``quantization_config`` is what ``from_pretrained`` will load as saved (with or
    without vramfit.json beside it); vramfit.json (``vramfit quantize``) adds the components it stored in bf16 to
    be quantized on load. A quantization_config vramfit cannot name is refused: loading it as saved while the
    record claims another recipe would be a false record."""
    if weights.kind != "dir":
        return {}
    from ..quant import value_of_saved_config

    out: dict[str, str] = {}
    for comp in COMPONENTS:
        saved = saved_quantization(weights, comp)
        if saved is None:
            continue
        value = value_of_saved_config(saved)
        if value is None:
            raise InputError(
                f"{weights.path}/{comp}/config.json holds a quantization_config vramfit cannot name "
                f"(quant_method={saved.get('quant_method')!r}); it would load as saved and the run record could not "
                f"say what ran. Alternative: load it with diffusers directly, or write a checkpoint with "
                f"`vramfit export` / `vramfit quantize`")
        out[comp] = value
    marker = Path(weights.path) / "vramfit.json"
    if marker.exists():
        m = json.loads(marker.read_text())
        for comp, value in m.get("applied_on_load", {}).items():
            out.setdefault(comp, value)
    return out


def load_tokenizers(spec: ModelSpec, weights: Weights):
    if weights.kind == "random":
        return stand_in_tokenizers(spec)
    from transformers import AutoTokenizer

    return (
        AutoTokenizer.from_pretrained(weights.path, subfolder="tokenizer"),
        AutoTokenizer.from_pretrained(weights.path, subfolder="tokenizer_2"),
    )


def load_scheduler(spec: ModelSpec, weights: Weights):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if weights.kind == "random":
        cfg = {k: v for k, v in spec.config("scheduler").items() if not k.startswith("_")}
        return FlowMatchEulerDiscreteScheduler.from_config(cfg)
    return FlowMatchEulerDiscreteScheduler.from_pretrained(weights.path, subfolder="scheduler")


def count_params(spec: ModelSpec) -> dict[str, int]:
    """Parameter count per component, on the meta device (no weights)."""
    out = {}
    for comp in COMPONENTS:
        m = empty_component(spec, comp, torch.bfloat16)
        out[comp] = sum(p.numel() for p in m.parameters())
    return out


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
