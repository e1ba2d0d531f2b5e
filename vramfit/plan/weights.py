"""Weights on the meta device: exact bytes of every component under every recipe value, and how they split into
the groups each offload strategy moves."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from .data import GGUF_BLOCKS, PRECISION_BYTES, COMPONENTS

@dataclass(frozen=True)
class Layout:
    """How a component's bytes are split among the groups each offload strategy moves."""

    total: int
    leaves: tuple  # group-leaf groups in registration (~execution) order: (bytes, is_embedding)
    blocks: tuple  # group-block groups: bytes of each element of a top-level ModuleList, in order
    unmatched: int  # group-block's one unstreamed group: everything outside those blocks
    largest_leaf: int  # accelerate sequential offload moves one leaf module at a time
    pinned_all: int  # sum of next_pow2(storage) over all storages: pinned copies (CachingHostAllocator rounds)
    pinned_blocks: int  # same over the block groups only
    stream_blocks: tuple = ()  # offload=stream: bytes of each block in execution order (transformer: its 57
    # double + single blocks; T5: encoder.block's 24); everything else of the component stays resident
    stream_recast: tuple = ()  # per stream block, the bytes layerwise casting keeps in fp8 (cast back after
    # each layer into new tensors); empty for every other family
    stream_mods: tuple = ()  # per stream block, the bytes of its adaLN modulation layers (stream.MODULATION):
    # offload=stream copies them once per generation, not every step (eager runs)
    stream_mod_out: tuple = ()  # per stream block, the modulation layers' output features (cached per step)


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else n


def _q_linear_parts(value: str, o: int, i: int) -> list[int]:
    """Storages of one quantized Linear weight (bias kept in bf16 is counted separately)."""
    n = o * i
    if value in ("bnb-nf4", "bnb-fp4"):  # packed nibbles, fp32 absmax per block of 64, 16-entry fp32 code
        return [-(-n // 2), -(-n // 64) * 4, 64]
    if value == "bnb-int8":  # int8 + fp32 row scales (SCB)
        return [n, o * 4]
    if value in ("torchao-int8wo", "torchao-int8dq"):  # Int8Tensor: qdata, fp32 scale, int8 zero point per row
        return [n, o * 4, o]
    if value in ("torchao-fp8wo", "torchao-fp8dq"):  # Float8Tensor: e4m3 + fp32 per-row scale
        return [n, o * 4]
    if value == "torchao-fp8dq-tensor":  # Float8Tensor: e4m3 + one fp32 scale per tensor
        return [n, 4]
    if value == "torchao-int4wo":  # tinygemm: packed int4 + bf16 (scale, zero) per group of 128 (CUDA only)
        return [n // 2, (i // 128) * o * 4]
    if value in ("quanto-int8", "quanto-fp8"):  # 8-bit data, bf16 row scale, 2 scalar bf16 buffers (QLinear)
        return [n, o * 2, 2, 2]
    if value == "quanto-int4":  # nibbles, bf16 scale + shift per group of 128 (per row if not divisible)
        groups = i // 128 if i % 128 == 0 else 1
        return [n // 2, o * groups * 2, o * groups * 2, 2, 2]
    raise ValueError(value)


def _gguf_types(module, qtype: str) -> dict[str, str]:
    """GGUF tensor type of every transformer parameter, decided as ``gguf_io.export_gguf`` decides it on the
    BFL-layout tensor the parameter belongs to (fused qkv tensors are judged whole)."""
    from .. import gguf_io

    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    out = {}
    for _bfl, diffs, how in gguf_io._rules_for(dict(module.config)):
        first = shapes[diffs[0]]
        shape = ((sum(shapes[d][0] for d in diffs),) + first[1:]) if how == "cat" else first
        numel = math.prod(shape)
        if len(shape) == 1 or numel <= gguf_io.SMALL_TENSOR_THRESHOLD:
            t = "f32"
        elif shape[-1] % GGUF_BLOCKS[qtype][0]:
            t = "bf16"
        else:
            t = qtype
        for d in diffs:
            out[d] = t
    return out


@lru_cache(maxsize=None)
def _meta_module(model: str, component: str, dtype):
    """The component on the meta device in ``dtype`` (built once per process: only counted, never changed)."""
    from .. import models, quant

    m = models.empty_component(models.get_model(model), component, dtype)
    if component in quant.DIFFUSERS_COMPONENTS:
        from diffusers.utils import logging as dlogging

        # diffusers' from_config builds fp32; loading casts to the recipe's dtype. Casting a meta module with
        # .to() makes diffusers warn about keep-in-fp32 modules; FLUX has none, so the warning is noise here.
        level = dlogging.get_verbosity()
        dlogging.set_verbosity_error()
        try:
            m.to(dtype)
        finally:
            dlogging.set_verbosity(level)
    return m


@lru_cache(maxsize=None)
def layout(model: str, component: str, value: str) -> Layout:
    """Exact storage of ``component`` under recipe ``value``, from the architecture alone (meta device)."""
    import torch

    from .. import quant

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(value, torch.bfloat16)
    m = _meta_module(model, component, dtype)
    fam = quant.get_spec(value).family if value not in PRECISION_BYTES else "plain"
    if fam != "plain":
        quant._check_component(value, component)
    if fam == "layerwise":  # the real casting, on meta: exactly the layers and skips the library chooses
        import copy

        m = copy.deepcopy(m)  # casting changes the module; the cached one stays as built
        quant._layerwise(m, component, value, torch.device("meta"), torch.bfloat16)
    skip = quant._not_convert_keys(m) if fam in ("bnb", "torchao", "quanto") else []
    gguf = _gguf_types(m, value.removeprefix("gguf-")) if fam == "gguf" else {}

    def quantized(name: str, mod) -> bool:
        if fam == "bnb":  # _replace_linears: exact nn.Linear, no skipped ancestor
            parts = name.split(".")
            return type(mod) is torch.nn.Linear and not any(
                quant._skipped(".".join(parts[:k]), skip) for k in range(1, len(parts) + 1))
        if fam in ("torchao", "quanto"):  # quantize_ filter_fn / quanto exclude list
            return isinstance(mod, torch.nn.Linear) and not quant._skipped(name, skip)
        return False

    seen: set = set()
    own: dict[str, list[int]] = {}  # module name -> storages of its own parameters and buffers
    cast: dict[str, int] = {}  # module name -> bytes of its own parameters in a float8 storage dtype (layerwise)
    for name, mod in m.named_modules():
        parts: list[int] = []
        q = quantized(name, mod)
        for pname, p in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if id(p) in seen:  # tied (T5's shared / embed_tokens): one storage
                continue
            seen.add(id(p))
            full = f"{name}.{pname}" if name else pname
            if q and pname == "weight":
                parts += _q_linear_parts(value, p.shape[0], p.shape[1])
            elif fam == "gguf" and full in gguf:
                t = gguf[full]
                if t in ("f32", "bf16", "f16"):  # F32 side tensors load cast to the compute dtype (bf16)
                    parts.append(p.numel() * 2)
                else:
                    n, b = GGUF_BLOCKS[t]
                    parts.append(p.numel() // n * b)
            else:
                parts.append(p.numel() * p.element_size())
                if fam == "layerwise" and p.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                    cast[name] = cast.get(name, 0) + p.numel()
        own[name] = parts

    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS as leaf_types

    def under(prefix: str) -> list[int]:
        return [b for n, ps in own.items() if n == prefix or n.startswith(prefix + ".") for b in ps]

    leaves, covered = [], set()
    for name, mod in m.named_modules():
        if isinstance(mod, leaf_types):
            leaves.append((sum(under(name)), isinstance(mod, torch.nn.Embedding)))
            covered.update(n for n in own if n == name or n.startswith(name + "."))
    for name, ps in own.items():  # parameters of non-leaf modules: one group per parent (group-leaf)
        if name not in covered and ps:
            leaves.append((sum(ps), False))
    blocks, block_parts, prefixes = [], [], []
    for cname, child in m.named_children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            for i in range(len(child)):
                ps = under(f"{cname}.{i}")
                blocks.append(sum(ps))
                block_parts += ps
                prefixes.append(f"{cname}.{i}")
    allp = [b for ps in own.values() for b in ps]
    total = sum(allp)

    def cast_under(prefix: str) -> int:
        return sum(b for n, b in cast.items() if n == prefix or n.startswith(prefix + "."))

    from ..stream import MODULATION

    def mods_under(prefix: str) -> tuple[int, int]:
        nb = out_f = 0
        for path in MODULATION.get(component, ()):
            name = f"{prefix}.{path}"
            if name in own:
                nb += sum(own[name])
                out_f += m.get_submodule(name).out_features
        return nb, out_f

    stream = tuple(blocks)
    if not stream and hasattr(m, "encoder") and hasattr(m.encoder, "block"):  # T5: blocks nest in encoder.block
        prefixes = [f"encoder.block.{i}" for i in range(len(m.encoder.block))]
        stream = tuple(sum(under(p)) for p in prefixes)
    return Layout(total=total, leaves=tuple(leaves), blocks=tuple(blocks), unmatched=total - sum(blocks),
                  largest_leaf=max((b for b, _ in leaves), default=0), pinned_all=sum(map(_pow2, allp)),
                  pinned_blocks=sum(map(_pow2, block_parts)), stream_blocks=stream,
                  stream_recast=tuple(cast_under(p) for p in prefixes) if cast else (),
                  stream_mods=tuple(mods_under(p)[0] for p in prefixes),
                  stream_mod_out=tuple(mods_under(p)[1] for p in prefixes))


def weight_bytes(model: str, recipe) -> dict[str, int]:
    return {c: layout(model, c, getattr(recipe, c)).total for c in COMPONENTS}



STREAMED = ("transformer", "text_encoder_2")  # offload=stream moves these components' blocks


def family(value: str) -> str:
    """'plain' for bf16/fp16/fp32, else the quantization backend's family (bnb, torchao, quanto, layerwise, gguf)."""
    if value in PRECISION_BYTES:
        return "plain"
    from .. import quant

    return quant.get_spec(value).family


def backend_family(value: str) -> str:
    """bf16 | fp16 | fp32 | the quantization family of a recipe value (bnb, torchao, quanto, layerwise, gguf)."""
    from .. import quant

    return quant.BACKENDS[value].family if value in quant.BACKENDS else value
