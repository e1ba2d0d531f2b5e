"""The planner: will a recipe fit, and how fast will it run -- before any download.

Three models, all explained by the architecture and by committed measurements:

* **weights** -- exact bytes of every component under every recipe value, counted on the meta device from the
  bundled configs: which Linear layers each backend quantizes (the same skips as ``quant.quantize_component``:
  T5's ``wo``, norms, embeddings, layerwise casting's skip patterns) times each library's storage layout
  (bnb packed nibbles + fp32 absmax per 64 + code, int8 + SCB, torchao qdata + scale (+ zero point), quanto
  data + bf16 scales (+ shift) + two scalar buffers, GGUF block bytes, fp8 casting applied for real on meta).
* **memory** -- per stage: resident weights (what each offload strategy keeps on the GPU) + activation peak of
  the stage (calibrated per token / per megapixel from ``benchmarks/results``), max over stages; host RAM from
  what stays in host memory (pinned copies of streamed groups, rounded up to powers of two by PyTorch's
  pinned-memory allocator).
* **latency** -- transformer step = (linear FLOPs / dense rate of the compute dtype x backend factor + attention
  FLOPs / bf16 rate) / efficiency + per-step overhead; transfers = bytes moved x the backend family's
  moved-bytes factor / link rate (pinned for streams, pageable for accelerate); streamed group offload overlaps
  copy and compute except a calibrated fraction of the shorter one (diffusers synchronizes the host at every
  group), accelerate moves add; staged loads build (generate or read) bf16 weights and quantize them on load;
  compile and the first run's lazy initialisation are cold-start costs. Every constant lives in ``calibration/calibration.json`` (written by
  ``benchmarks/derive_calibration.py`` from measured JSONL) with its source; unmeasured ones say "assumed".

``vramfit plan MODEL --vram 8GB`` lists every candidate with its prediction and marks the chosen one;
``vramfit plan --check results.jsonl`` compares predictions with measured rows; ``vramfit probe`` measures this
machine. ``generate_with_budget`` runs the chosen candidate and falls back on CUDA out-of-memory.

JSON (``vramfit plan ... --json``), schema ``vramfit.plan/1``::

    {"schema": "vramfit.plan/1", "model": str, "gpu": {profile: name, vram_gb, h2d_pinned_gbps, ...},
     "request": {"height", "width", "steps", "batch", "text_tokens", "images"},
     "budget": {"vram_gb", "ram_gb" | null, "margin": 0.05, "reserve_gb", "max_error" | null},
     "chosen": recipe string | null, "min_vram_gb": GB the fastest-to-fit candidate needs (null if none can),
     "candidates": [{"recipe": str, "status": "chosen" | "fits" | "too-big" | "too-much-ram" | "too-lossy"
                                              | "refused",
                     "reason": str | null,
                     "needs_vram_gb": predicted peak x (1 + margin) + reserve,
                     "predicted": {"peak_vram_gb", "peak_host_gb", "weights_gb": {component: GB},
                                   "stage_peak_gb": {"encode", "denoise", "decode"},
                                   "step_s", "encode_s", "denoise_s", "decode_s", "warm_s", "cold_s",
                                   "total_s" (= cold_s + images x warm_s), "expected_error", "fidelity",
                                   "assumed": [what is not calibrated by a measurement]} | null}],
     "calibration": {source files and reference GPU}}

Exit codes of ``plan``: 0 a candidate fits, 1 none fits (the message names the smallest budget that works),
2 bad input. ``plan --check FILE...``: 0 every row within +-10 % peak VRAM and +-25 % latency, 1 otherwise.

``plan --check`` reads run records (``vramfit.run/1``) and bench rows (``vramfit.bench/1``) alike (see
``measured_row``). Peak VRAM is always the peak *while generating* (what the planner predicts; a bench row's
``memory.peak_gb``, a run record's ``generate_peak_allocated_gb``), never the load peak. A bench row's s/step is
its warm runs' denoise stage / steps (first step and in-denoise moves included) and is compared with the predicted
denoise stage / steps; a run record's is the median step, compared with ``step_s``. Bench rows with a status
other than ok are skipped with their exit reason; ``role: reference`` rows are bf16 rows (each one checked, from
its cold run when it has no warm run). Totals of rows with fewer steps than the model's default are shown, not
checked: fixed costs (cold start, encode, decode) dominate them.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import InputError, RecipeError, VramfitError

GB = 1e9
HERE = Path(__file__).parent
CALIBRATION_FILE = HERE / "calibration" / "calibration.json"
GPUS_FILE = HERE / "gpus.json"
STAGES = {"encode": ("text_encoder", "text_encoder_2"), "denoise": ("transformer",), "decode": ("vae",)}
COMPONENTS = ("text_encoder", "text_encoder_2", "transformer", "vae")
PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# GGUF (values per block, bytes per block), as ggml defines them (same table as quant._gguf_specs)
GGUF_BLOCKS = {"q8_0": (32, 34), "q5_1": (32, 24), "q5_0": (32, 22), "q4_1": (32, 20), "q4_0": (32, 18),
               "q6_k": (256, 210), "q5_k": (256, 176), "q4_k": (256, 144), "q3_k": (256, 110), "q2_k": (256, 84),
               "bf16": (1, 2), "f16": (1, 2)}
PCIE_GBPS_PER_LANE = {3: 0.985, 4: 1.969, 5: 3.938}  # theoretical, after 128b/130b encoding


# ----------------------------------------------------------------------------------------------------------
# budgets


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(gb|gib|mb|mib|tb|tib|g|m)\s*$", re.I)
_UNIT = {"gb": 1e9, "g": 1e9, "gib": 2**30, "mb": 1e6, "m": 1e6, "mib": 2**20, "tb": 1e12, "tib": 2**40}


def parse_size(text: str, what: str = "--vram") -> float | None:
    """'8GB', '8 GiB', '24000MB' -> GB (1e9 bytes); 'auto' -> None."""
    if text is None:
        return None
    if text.strip().lower() == "auto":
        return None
    m = _SIZE.match(str(text))
    if not m:
        raise InputError(f"{what} {text!r}: give a size with a unit, e.g. 8GB, 8 GiB, 24000MB, or auto")
    value = float(m.group(1)) * _UNIT[m.group(2).lower()] / GB
    if value <= 0:
        raise InputError(f"{what} {text!r}: must be more than zero")
    return value


# ----------------------------------------------------------------------------------------------------------
# data: calibration and GPU profiles


@lru_cache(maxsize=None)
def calibration() -> dict:
    return json.loads(CALIBRATION_FILE.read_text())


@lru_cache(maxsize=None)
def gpu_table() -> list[dict]:
    return json.loads(GPUS_FILE.read_text())["gpus"]


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower().replace("nvidia", "").replace("geforce", ""))


def find_gpu(name: str) -> dict | None:
    key = _norm(name)
    for g in gpu_table():
        if key in {_norm(a) for a in [g["name"], *g.get("aliases", [])]}:
            return g
    return None


def gpu_profile(name: str) -> dict:
    """A named profile (gpus.json) with realistic rates filled in: dense matmul = spec x the fraction measured
    on the reference GPU, pinned copy = PCIe theoretical x the measured fraction (unless measured)."""
    g = find_gpu(name)
    if g is None:
        names = ", ".join(g["aliases"][0] if g.get("aliases") else g["name"] for g in gpu_table())
        raise InputError(f"--gpu {name!r}: no such GPU profile; known: {names}, or 'local' to probe this machine")
    return _realize(g)


def _realize(g: dict) -> dict:
    cal = calibration()["reference_gpu"]
    prof = {"profile": g["name"], "vram_gb": g["vram_gb"], "capability": g.get("capability"),
            "source": g.get("source", ""), "assumed": []}
    if g.get("tflops"):  # measured on the machine
        prof["tflops"] = dict(g["tflops"])
    else:
        prof["tflops"] = {k: (None if v is None else round(v * cal["matmul_fraction_of_spec"].get(k, 0.75), 1))
                          for k, v in g["tflops_spec"].items()}
        prof["assumed"].append("dense rates = spec x fraction measured on the reference GPU")
    if g.get("h2d_pinned_gbps"):
        prof["h2d_pinned_gbps"] = g["h2d_pinned_gbps"]
        prof["h2d_pageable_gbps"] = g["h2d_pageable_gbps"]
    else:
        link = g["link"]
        theo = PCIE_GBPS_PER_LANE[link["pcie_gen"]] * link["lanes"]
        prof["h2d_pinned_gbps"] = round(theo * cal["link_fraction_pinned"], 1)
        prof["h2d_pageable_gbps"] = round(prof["h2d_pinned_gbps"] * cal["pageable_over_pinned"], 1)
        prof["assumed"].append("host link = PCIe theoretical x fractions measured on the reference GPU")
    prof["host_ram_gb"] = g.get("host_ram_gb")
    return prof


def local_profile(refresh: bool = False) -> dict:
    import torch

    from . import probe

    if not torch.cuda.is_available():
        raise InputError("--gpu local needs a CUDA GPU on this machine; name a profile instead (--gpu 4090, ...)")
    p = probe.probe(torch.device("cuda"), refresh=refresh)
    return profile_from_probe(p)


def profile_from_probe(p: dict) -> dict:
    known = find_gpu(p["name"])
    return {"profile": p["name"] + " (probed)", "vram_gb": p["vram_total_gb"], "vram_free_gb": p.get("vram_free_gb"),
            "capability": known.get("capability") if known else None, "tflops": dict(p["tflops"]),
            "h2d_pinned_gbps": p["h2d_pinned_gbps"], "h2d_pageable_gbps": p["h2d_pageable_gbps"],
            "host_ram_gb": p.get("host_ram_gb"), "source": f"measured {p.get('measured_at', '')}", "assumed": []}


# ----------------------------------------------------------------------------------------------------------
# weights on the meta device


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
    from . import gguf_io

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
    from . import models, quant

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

    from . import quant

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
    blocks, block_parts = [], []
    for cname, child in m.named_children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            for i in range(len(child)):
                ps = under(f"{cname}.{i}")
                blocks.append(sum(ps))
                block_parts += ps
    allp = [b for ps in own.values() for b in ps]
    total = sum(allp)
    return Layout(total=total, leaves=tuple(leaves), blocks=tuple(blocks), unmatched=total - sum(blocks),
                  largest_leaf=max((b for b, _ in leaves), default=0), pinned_all=sum(map(_pow2, allp)),
                  pinned_blocks=sum(map(_pow2, block_parts)))


def weight_bytes(model: str, recipe) -> dict[str, int]:
    return {c: layout(model, c, getattr(recipe, c)).total for c in COMPONENTS}


# ----------------------------------------------------------------------------------------------------------
# shapes, FLOPs, activations


@dataclass(frozen=True)
class Shape:
    height: int = 1024
    width: int = 1024
    steps: int = 28
    batch: int = 1
    text_tokens: int = 512
    images: int = 1  # images the run will make: the cold start is paid once

    @property
    def img_tokens(self) -> int:
        return (self.height // 16) * (self.width // 16)

    @property
    def mpix(self) -> float:
        return self.height * self.width / 1e6


def _config(model: str, component: str) -> dict:
    from . import models

    return models.get_model(model).config(component)


def transformer_flops(model: str, shape: Shape) -> tuple[float, float]:
    """(linear FLOPs, attention FLOPs) of one denoising step. Every FLUX block holds 12 D^2 weights applied to
    every token (double blocks: img and txt streams each with their tokens; single blocks: qkv + mlp-in +
    fused out); attention is QK^T and PV: 4 T^2 D per block. Embedders and modulation are < 1 %."""
    cfg = _config(model, "transformer")
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    blocks = cfg["num_layers"] + cfg["num_single_layers"]
    t = shape.img_tokens + shape.text_tokens
    return 2 * 12 * d * d * t * blocks * shape.batch, 4 * t * t * d * blocks * shape.batch


def _scale(model: str, component: str, key: str, ref: float) -> float:
    """Activation width of this model relative to the calibrated FLUX.1 width (for flux-tiny and the like)."""
    v = _config(model, component)
    if component == "transformer":
        return v["num_attention_heads"] * v["attention_head_dim"] / ref
    if component == "vae":
        return v["block_out_channels"][0] / ref
    return v[key] / ref


def activations_gb(model: str, recipe, shape: Shape) -> dict[str, float]:
    """Peak activation/workspace above the weights, per component, while it runs."""
    c = calibration()
    tr, t5, clip, vae = c["transformer"], c["text_encoder_2"], c["text_encoder"], c["vae"]
    tokens = shape.img_tokens + shape.text_tokens
    a_tr = shape.batch * (tr["act_gb_per_token"] * tokens + tr["act_gb_fixed"]) * _scale(model, "transformer", "", tr["width"])
    a_tr *= c["backends"].get(recipe.transformer, {}).get("act_factor", 1.0)
    a_t5 = shape.batch * t5["act_gb_per_token"] * shape.text_tokens * _scale(model, "text_encoder_2", "d_model", t5["width"])
    a_clip = shape.batch * clip["act_gb"] * _scale(model, "text_encoder", "hidden_size", clip["width"])
    tile = _config(model, "vae").get("sample_size", vae["tile_px"])
    vs = _scale(model, "vae", "", vae["width"])
    if recipe.vae_decode == "tiling" and max(shape.height, shape.width) > tile:
        # one tile's decoder activations + the full-size output image (bf16, 3 channels)
        a_vae = shape.batch * (vae["act_gb_per_mpix"] * tile * tile / 1e6 * vs + shape.mpix * 6e6 / GB)
    else:
        per_image = 1 if recipe.vae_decode == "slicing" else shape.batch  # slicing decodes one image at a time
        a_vae = per_image * vae["act_gb_per_mpix"] * shape.mpix * vs
    return {"text_encoder": a_clip, "text_encoder_2": a_t5, "transformer": a_tr, "vae": a_vae}


# ----------------------------------------------------------------------------------------------------------
# prediction


def _pairs(sizes) -> int:
    """Largest two consecutive groups: with streams the next group is prefetched while one runs."""
    sizes = list(sizes)
    if len(sizes) < 2:
        return sum(sizes)
    return max(a + b for a, b in zip(sizes, sizes[1:]))


def resident_gb(model: str, recipe, comp: str, act: float) -> float:
    """GPU memory while ``comp`` runs under the recipe's offload strategy (weights resident + activations)."""
    lay = layout(model, comp, getattr(recipe, comp))
    o = recipe.offload
    if o in ("none", "staged", "model"):
        return lay.total / GB + act
    if o == "sequential":  # accelerate onloads one leaf at a time, synchronously
        return lay.largest_leaf / GB + act
    if o == "group-block":
        if not lay.blocks:  # no top-level ModuleList (T5's blocks sit in encoder.block; CLIP; VAE): whole
            return lay.total / GB + act
        return (lay.unmatched + _pairs(lay.blocks)) / GB + act
    if o == "group-leaf":
        # embeddings run first, before the activations grow (measured: T5 encode peak 0.30 GB = embedding)
        emb = _pairs(b if e else 0 for b, e in lay.leaves)
        rest = _pairs(0 if e else b for b, e in lay.leaves)
        return max(emb / GB, rest / GB + act)
    raise ValueError(o)


def family(value: str) -> str:
    """'plain' for bf16/fp16/fp32, else the quantization backend's family (bnb, torchao, quanto, layerwise, gguf)."""
    if value in PRECISION_BYTES:
        return "plain"
    from . import quant

    return quant.get_spec(value).family


def moved_bytes_factor(value: str, mechanism: str, assumed: list | None = None) -> float:
    """How much a move of weights stored as ``value`` costs per stored byte, relative to plain bf16 weights, under
    ``mechanism``: 'sync' (accelerate model offload, group-block's unstreamed group), 'stream' (group offload on
    CUDA streams) or 'sequential'. Measured per backend family where a bench row moves that family; else 1
    (assumed: stored bytes move like bf16 bytes) and noted in ``assumed``."""
    fam = family(value)
    if fam == "plain":
        return 1.0
    e = calibration()["offload"]["moved_bytes_factor"].get(mechanism, {}).get(fam)
    if e is None or e.get("source", "assumed") == "assumed":
        if assumed is not None:
            assumed.append(f"{fam} weights under {mechanism} moves cost their stored bytes")
        return e["factor"] if e else 1.0
    return e["factor"]


def predict(model: str, recipe, shape: Shape, gpu: dict, weights_kind: str = "hub") -> dict:
    """Peak VRAM, peak host RAM and latency of one recipe; raises RecipeError where the GPU cannot run it."""
    c = calibration()
    ref = c["reference_gpu"]
    assumed: list[str] = list(gpu.get("assumed", []))
    lay = {comp: layout(model, comp, getattr(recipe, comp)) for comp in COMPONENTS}
    w = {comp: lay[comp].total / GB for comp in COMPONENTS}
    act = activations_gb(model, recipe, shape)
    o = recipe.offload

    # ---- memory
    stage_peak = {}
    for stage, comps in STAGES.items():
        if o == "none":
            stage_peak[stage] = sum(w.values()) + max(act[x] for x in comps)
        elif o == "staged":
            stage_peak[stage] = sum(w[x] for x in comps) + max(act[x] for x in comps)
        else:
            stage_peak[stage] = max(resident_gb(model, recipe, x, act[x]) for x in comps)
    peak = max(stage_peak.values())
    host = c["pipeline"]["host_base_gb"]
    if o in ("model", "sequential"):
        host += sum(w.values())
    elif o == "group-block":  # pins the blocks while the pageable copies are still held (measured 72 GB)
        host += sum(w.values()) + sum(lay[x].pinned_blocks for x in COMPONENTS) / GB
    elif o == "group-leaf":  # each leaf's pageable copy is released as it is pinned (measured 53 GB)
        host += sum(lay[x].pinned_all for x in COMPONENTS) / GB

    # ---- compute
    be = c["backends"].get(recipe.transformer)
    if be is None:
        raise RecipeError(f"transformer={recipe.transformer}: no latency calibration for this value")
    compute_dtype = be["compute"]
    rate = (gpu["tflops"].get(compute_dtype) or 0) * 1e12
    bf16 = gpu["tflops"]["bf16"] * 1e12
    if not rate:
        raise RecipeError(f"transformer={recipe.transformer} computes in {compute_dtype}, which "
                          f"{gpu['profile']} has no tensor cores for (compute capability {gpu.get('capability')}). "
                          "Alternative: torchao-fp8wo or fp8-layerwise (fp8 storage, bf16 compute)")
    compiled = recipe.compile != "off"
    factor = be["factor"]["compiled" if compiled and "compiled" in be["factor"] else "eager"]
    # the regional compile speed-up was measured on bf16 itself: bf16 + regional needs no compiled factor
    measured_compile = recipe.transformer == "bf16" and recipe.compile == "regional"
    if be.get("source", "assumed") == "assumed" or (compiled and "compiled" not in be["factor"] and not measured_compile):
        assumed.append(f"{recipe.transformer} speed factor" + (" (compiled)" if compiled else ""))
    elif compiled and be.get("compiled_mode", recipe.compile) != recipe.compile:
        assumed.append(f"{recipe.transformer} compiled speed factor (measured with compile={be['compiled_mode']})")
    if recipe.attention != "native":
        assumed.append(f"attention={recipe.attention} costs what native SDPA costs")
    lin, attn = transformer_flops(model, shape)
    tr = c["transformer"]
    compute = (lin / rate * factor + attn / bf16) / tr["efficiency"]
    if compiled:
        cm = c["compile"][recipe.compile]
        compute *= cm["step_factor"]
        if cm.get("source") == "assumed":
            assumed.append(f"compile={recipe.compile} speed-up")
    compute += tr["overhead_s"]
    speed = ref["tflops"]["bf16"] / gpu["tflops"]["bf16"]  # other stages: measured time x bf16 rate ratio
    t5_s = c["text_encoder_2"]["s_per_token"] * shape.text_tokens * shape.batch * speed
    be5 = c["backends"].get(recipe.text_encoder_2)
    if be5 and recipe.text_encoder_2 not in PRECISION_BYTES and gpu["tflops"].get(be5["compute"]):
        # T5 is nearly all Linear: its time scales like the transformer's linear part under the same backend
        t5_s *= be5["factor"]["eager"] * gpu["tflops"]["bf16"] / gpu["tflops"][be5["compute"]]
    clip_s = c["text_encoder"]["s"] * shape.batch * speed
    vae = c["vae"]
    tile = _config(model, "vae").get("sample_size", vae["tile_px"])
    vae_s = vae["s_per_mpix"] * shape.mpix * shape.batch * speed
    if recipe.vae_decode == "tiling" and max(shape.height, shape.width) > tile:
        vae_s = vae["s_per_mpix"] * _tiled_mpix(shape, tile) * shape.batch * speed * vae["tiled_overhead"]

    # ---- transfers
    off = c["offload"]
    pinned, pageable = gpu["h2d_pinned_gbps"], gpu["h2d_pageable_gbps"]
    sync = pageable * off["sync_fraction_of_pageable"]  # accelerate / unstreamed .to(): many small copies
    wb = off["writeback_gbps"]  # offloading back into fresh host pages (page-fault bound)
    seq = pageable * off["sequential_fraction_of_pageable"]

    def moved_gb(comp: str, mechanism: str) -> float:
        """GB a move of ``comp`` costs, in bf16-equivalent bytes of the mechanism's calibration: stored bytes x
        the backend family's moved-bytes factor (measured per family and mechanism; 1 for plain dtypes)."""
        return w[comp] * moved_bytes_factor(getattr(recipe, comp), mechanism, assumed)

    step = compute
    encode = c["pipeline"]["encode_overhead_s"] + t5_s + clip_s
    decode = c["pipeline"]["decode_overhead_s_per_mpix"] * shape.mpix * shape.batch + vae_s
    denoise_extra = 0.0
    if o == "model":
        enc_m = moved_gb("text_encoder", "sync") + moved_gb("text_encoder_2", "sync")
        tr_m = moved_gb("transformer", "sync")
        encode += enc_m / sync
        # first step: offload the encoders, onload the transformer; diffusers frees the hooks at the end
        denoise_extra = enc_m / wb + tr_m / sync + tr_m / wb
        decode += moved_gb("vae", "sync") / sync
    elif o == "sequential":
        encode += (moved_gb("text_encoder", "sequential") + moved_gb("text_encoder_2", "sequential")) / seq
        step += moved_gb("transformer", "sequential") / seq
        decode += moved_gb("vae", "sequential") / seq
    elif o in ("group-block", "group-leaf"):
        stream = pinned * off["stream_fraction_of_pinned"][o]
        unhidden = off["stream_unhidden"][o]

        def moved(comp: str, run_s: float) -> float:
            L = lay[comp]
            if o == "group-block" and not L.blocks:  # one unstreamed group: onload + write back, every call
                gb = moved_gb(comp, "sync")
                return run_s + gb / sync + gb / wb
            # streamed: the copy of the next group overlaps this group's compute, but diffusers synchronizes
            # the host with both streams at every group, so part of the shorter of the two is not hidden
            x = moved_gb(comp, "stream") / stream
            return max(run_s, x) + unhidden * min(run_s, x)

        encode += moved("text_encoder", clip_s) + moved("text_encoder_2", t5_s) - t5_s - clip_s
        step = moved("transformer", compute)
        decode += moved("vae", vae_s) - vae_s
    elif o == "staged":
        load = off["random_gen_gbps"] if weights_kind == "random" else off["disk_gbps"]
        if weights_kind != "random":
            assumed.append("checkpoint read rate (disk)")

        def build(comp: str) -> float:
            """Make the component's weights on the GPU: generate (random) or read (checkpoint) them, then
            quantize on load. Quantizing backends start from bf16 weights; a GGUF checkpoint is read as is."""
            v = getattr(recipe, comp)
            fam = family(v)
            if fam == "plain" or (fam == "gguf" and weights_kind != "random"):
                return w[comp] / load
            src = layout(model, comp, "bf16").total / GB
            q = off["quantize_gbps"].get(fam) or {"gbps": off["quantize_gbps"]["bnb"]["gbps"], "source": "assumed"}
            if q.get("source", "assumed") == "assumed":
                assumed.append(f"{fam} quantize-on-load rate")
            return src / load + src / q["gbps"]

        encode += build("text_encoder") + build("text_encoder_2")
        denoise_extra = build("transformer")
        decode += build("vae")
    denoise = shape.steps * step + denoise_extra
    warm = encode + denoise + decode
    # the first run of a process pays lazy CUDA/cuBLAS initialisation in encode, first step and decode
    pl = c["pipeline"]
    cold = pl["first_step_extra_s"] + pl.get("encode_cold_extra_s", 0.0) + pl.get("decode_cold_extra_s", 0.0)
    if compiled:
        cm = c["compile"][recipe.compile]
        # measured as first step minus median step: includes the first-step extra; per backend family where
        # measured (quantized blocks compile much slower than bf16 ones)
        fam_cold = cm.get("cold_s_by_family", {}).get(backend_family(recipe.transformer))
        cold += (fam_cold["s"] if fam_cold else cm["cold_s"]) - pl["first_step_extra_s"]
        if "cold_s" in cm.get("assumed", []) and not fam_cold:
            assumed.append(f"compile={recipe.compile} cold start")
        bound = cm.get("cold_s_min_by_family", {}).get(backend_family(recipe.transformer))
        if bound and bound["s"] > cold:  # a measured timeout says compiling this family takes longer
            cold = bound["s"]
            assumed.append(f"compile={recipe.compile} cold start >= {bound['s']:.0f} s (lower bound from a timeout)")
    err = expected_error(recipe)
    if err["assumed"]:
        assumed.append("expected error of " + ", ".join(err["assumed"]))
    return {
        "peak_vram_gb": round(peak, 3), "peak_host_gb": round(host, 2),
        "weights_gb": {k: round(v, 3) for k, v in w.items()},
        "stage_peak_gb": {k: round(v, 3) for k, v in stage_peak.items()},
        "step_s": round(step, 4), "encode_s": round(encode, 3), "denoise_s": round(denoise, 3),
        "decode_s": round(decode, 3), "warm_s": round(warm, 3), "cold_s": round(cold, 2),
        "total_s": round(cold + shape.images * warm, 3),
        "expected_error": err["error"], "fidelity": fidelity_class(err["error"]),
        "assumed": sorted(set(assumed)),
    }


def _tiled_mpix(shape: Shape, tile: int) -> float:
    """Pixels diffusers' tiled decode computes: tiles of ``tile`` px every 3/4 tile, cropped at the edge."""
    def spans(n):
        stride = int(tile * 0.75)
        return sum(min(tile, n - i) for i in range(0, n, stride))

    return spans(shape.height) * spans(shape.width) / 1e6


def expected_error(recipe) -> dict:
    """Relative output error expected from the recipe's quantization: the largest of its components'
    (CPU-measured per backend on flux-tiny; see calibration 'errors')."""
    table = calibration()["errors"]
    worst, assumed = 0.0, []
    for comp in COMPONENTS:
        v = getattr(recipe, comp)
        if v in ("bf16", "fp32"):
            continue
        e = table.get(v, {"error": 0.1, "source": "assumed"})
        if e["source"] == "assumed":
            assumed.append(v)
        worst = max(worst, e["error"])
    return {"error": round(worst, 4), "assumed": sorted(set(assumed))}


def fidelity_class(err: float) -> str:
    return "lossless" if err == 0 else "near" if err <= 0.05 else "lossy"


# ----------------------------------------------------------------------------------------------------------
# candidates and the plan


# Transformer values the planner considers. Left out: fp16 (FLUX overflows in fp16), fp32 (2x bf16 for no gain),
# fp8-layerwise-e5m2 (same bytes and speed as e4m3, larger error), GGUF q4_0/q5_0 (q4_k/q5_1 of about the same
# size are more accurate) and the GGUF types vramfit cannot write (q6_k, q5_k, q3_k: they need a community file;
# all still run when named in a recipe).
TRANSFORMER_VALUES = (
    "bf16", "fp8-layerwise", "torchao-fp8dq", "torchao-fp8wo", "torchao-int8wo", "torchao-int8dq", "torchao-int4wo",
    "bnb-int8", "bnb-nf4", "bnb-fp4", "quanto-int8", "quanto-fp8", "quanto-int4",
    "gguf-q8_0", "gguf-q5_1", "gguf-q4_k", "gguf-q4_1", "gguf-q2_k",
)
OFFLOAD_COMPILE = (("none", "off"), ("none", "regional"), ("none", "full"), ("staged", "off"), ("staged", "regional"),
                   ("model", "off"), ("model", "regional"), ("group-block", "off"), ("group-block", "regional"),
                   ("group-leaf", "off"), ("group-leaf", "regional"), ("sequential", "off"))


def t5_values(tr: str) -> tuple[str, ...]:
    """T5-XXL (9.5 GB in bf16) either stays bf16 or takes the transformer's backend; GGUF (transformer-only)
    pairs with bnb-nf4, bf16 with fp8 layerwise casting."""
    if tr == "bf16":
        return ("bf16", "fp8-layerwise")
    if tr.startswith("gguf-"):
        return ("bf16", "bnb-nf4")
    return ("bf16", tr)


def candidate_recipes(shape: Shape) -> list:
    from .recipe import Recipe

    vae_modes = ("none", "tiling") if max(shape.height, shape.width) > 1024 else ("none",)
    out = []
    for tr in TRANSFORMER_VALUES:
        for t5 in t5_values(tr):
            for off, comp in OFFLOAD_COMPILE:
                for vm in vae_modes:
                    out.append(Recipe(transformer=tr, text_encoder_2=t5, offload=off, compile=comp, vae_decode=vm))
    return out


def refusal(recipe, device_type: str = "cuda") -> str | None:
    import torch

    from . import apply

    try:
        apply.check(recipe, torch.device(device_type))
    except RecipeError as e:
        return str(e)
    return None


def backend_family(value: str) -> str:
    """bf16 | fp16 | fp32 | the quantization family of a recipe value (bnb, torchao, quanto, layerwise, gguf)."""
    from . import quant

    return quant.BACKENDS[value].family if value in quant.BACKENDS else value


def make_plan(model: str, shape: Shape, gpu: dict, vram_gb: float, ram_gb: float | None = None,
              max_error: float | None = None, device_type: str = "cuda", recipes=None,
              weights_kind: str = "hub") -> dict:
    from . import models

    models.get_model(model)
    c = calibration()
    margin, reserve = c["budget"]["margin"], c["budget"]["reserve_gb"]
    rows = []
    for r in recipes if recipes is not None else candidate_recipes(shape):
        row = {"recipe": str(r), "status": None, "reason": None, "needs_vram_gb": None, "predicted": None}
        rows.append(row)
        why = refusal(r, device_type)
        if why is None:
            try:
                p = predict(model, r, shape, gpu, weights_kind)
            except RecipeError as e:
                why = str(e)
        if why is not None:
            row.update(status="refused", reason=why)
            continue
        row["predicted"] = p
        row["needs_vram_gb"] = round(p["peak_vram_gb"] * (1 + margin) + reserve, 2)
        if max_error is not None and p["expected_error"] > max_error:
            row.update(status="too-lossy", reason=f"expected error {p['expected_error']:.3f} > --max-error {max_error}")
        elif ram_gb is not None and p["peak_host_gb"] > ram_gb:
            row.update(status="too-much-ram", reason=f"host RAM {p['peak_host_gb']:.1f} GB > {ram_gb:.1f} GB")
        elif row["needs_vram_gb"] > vram_gb:
            row.update(status="too-big", reason=f"needs {row['needs_vram_gb']:.2f} GB "
                       f"(peak {p['peak_vram_gb']:.2f} GB + {margin:.0%} + {reserve} GB) > {vram_gb:.2f} GB")
        else:
            row["status"] = "fits"
    order = {"fits": 0, "too-big": 1, "too-much-ram": 2, "too-lossy": 3, "refused": 4}

    def key(row):
        p = row["predicted"]
        # ties (e.g. nf4 and fp4 run the same kernels): the smaller error, then the smaller peak
        return (order[row["status"]], round(p["total_s"], 2) if p else 0, p["expected_error"] if p else 0,
                p["peak_vram_gb"] if p else 0, row["recipe"])

    rows.sort(key=key)
    chosen = rows[0]["recipe"] if rows and rows[0]["status"] == "fits" else None
    if chosen:
        rows[0]["status"] = "chosen"
    # the smallest budget that would work: the cheapest candidate meeting every other bound
    ok = [r["needs_vram_gb"] for r in rows if r["status"] in ("chosen", "fits", "too-big")]
    return {
        "schema": "vramfit.plan/1", "model": model,
        "gpu": {k: gpu.get(k) for k in ("profile", "vram_gb", "capability", "tflops", "h2d_pinned_gbps",
                                        "h2d_pageable_gbps", "source")},
        "request": {"height": shape.height, "width": shape.width, "steps": shape.steps, "batch": shape.batch,
                    "text_tokens": shape.text_tokens, "images": shape.images},
        "budget": {"vram_gb": round(vram_gb, 3), "ram_gb": ram_gb, "margin": margin, "reserve_gb": reserve,
                   "max_error": max_error},
        "chosen": chosen, "min_vram_gb": min(ok) if ok else None,
        "candidates": rows,
        "calibration": c["source"],
    }


# ----------------------------------------------------------------------------------------------------------
# printing


def _short(recipe: str) -> str:
    """Only what differs from the defaults, e.g. 'transformer=bnb-nf4,offload=model'."""
    from .recipe import Recipe

    ch = Recipe.parse(recipe).changed()
    out = [f"{k}={v}" for k, v in ch.items()]
    return ",".join(out) or "bf16"


def _brief(reason: str) -> str:
    """The reason without its alternative, at most ~160 characters (--json has the whole text)."""
    r = reason.split(" Alternative:")[0].rstrip(". ")
    return r if len(r) <= 160 else r[:157] + "..."


def print_plan(plan: dict, top: int | None = None, file=None) -> None:
    file = file or sys.stdout
    g, b, rq = plan["gpu"], plan["budget"], plan["request"]
    print(f"plan: {plan['model']} {rq['width']}x{rq['height']}, {rq['steps']} steps, batch {rq['batch']}, "
          f"{rq['text_tokens']} text tokens, {rq['images']} image(s) | GPU {g['profile']} "
          f"(bf16 {g['tflops']['bf16']} TFLOP/s, host link {g['h2d_pinned_gbps']}/{g['h2d_pageable_gbps']} GB/s "
          f"pinned/pageable) | budget {b['vram_gb']:.2f} GB VRAM"
          + (f", {b['ram_gb']:.1f} GB RAM" if b["ram_gb"] else ", host RAM not limited (--ram)")
          + (f", max error {b['max_error']}" if b["max_error"] is not None else ""), file=file)
    print(f"fits = peak x (1+{b['margin']:.0%}) + {b['reserve_gb']} GB reserve <= budget; latency = cold start "
          f"+ images x per-image time; * marks assumptions (see --json 'assumed')", file=file)
    print(f"  {'VRAM GB':>8}{'RAM GB':>8}{'s/step':>8}{'image s':>9}{'cold s':>8}{'error':>7}  {'status':<13}recipe "
          "(what differs from all-bf16, no offload) / why not", file=file)
    rows = plan["candidates"]
    shown = rows if top is None else rows[:top]
    for r in shown:
        mark = "=>" if r["status"] == "chosen" else "  "
        p = r["predicted"]
        why = f"  -- {_brief(r['reason'])}" if r["reason"] else ""
        if p:
            star = "*" if p["assumed"] else " "
            print(f"{mark}{p['peak_vram_gb']:>8.2f}{p['peak_host_gb']:>8.1f}{p['step_s']:>8.3f}{p['warm_s']:>9.2f}"
                  f"{p['cold_s']:>8.1f}{p['expected_error']:>7.3f}{star} {r['status']:<13}{_short(r['recipe'])}{why}",
                  file=file)
        else:
            print(f"{mark}{'':>48}  {r['status']:<13}{_short(r['recipe'])}{why}", file=file)
    if top is not None and len(rows) > top:
        print(f"  ... {len(rows) - top} more (all of them: --top 0, or --json)", file=file)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print("candidates: " + ", ".join(f"{v} {k}" for k, v in counts.items()), file=file)
    if plan["chosen"]:
        p = rows[0]["predicted"]
        print(f"chosen: {plan['chosen']}\n  predicted peak {p['peak_vram_gb']:.2f} GB VRAM, {p['peak_host_gb']:.1f} GB "
              f"host RAM, {p['step_s']:.3f} s/step, {p['warm_s']:.2f} s per image (+{p['cold_s']:.1f} s cold start), "
              f"fidelity {p['fidelity']} (expected error {p['expected_error']})"
              + (f"; assumed: {', '.join(p['assumed'])}" if p["assumed"] else ""), file=file)
    else:
        need = plan["min_vram_gb"]
        print("no candidate fits: " + (f"the smallest budget that works is {need:.2f} GB" if need else
                                       "no candidate meets the other bounds (RAM, --max-error)"), file=file)


# ----------------------------------------------------------------------------------------------------------
# plan --check: predictions vs measured rows


def _row_record(row: dict) -> dict:
    return row.get("record", row)


BENCH_SCHEMA = "vramfit.bench/1"
RUN_SCHEMA = "vramfit.run/1"
TOLERANCE = {"peak": 0.10, "s/step": 0.25, "total": 0.25}


class _Skip(Exception):
    pass


def measured_row(row: dict) -> dict:
    """What a measured row says, in one shape for both schemas. Raises _Skip(reason) for rows that measured
    nothing comparable.

    * run records (``vramfit.run/1``, from ``generate`` / foundation.py): peak = the generation peak
      (``memory.generate_peak_allocated_gb``, else ``peak_allocated_gb``); s/step = the median step
      (``timings.s_per_step_median``); total = ``timings.total_s``; the run is cold when ``run_index`` is 1.
    * bench rows (``vramfit.bench/1``): peak = ``memory.peak_gb`` (max over runs of the generation peak; the load
      peak ``peak_incl_load_gb`` is not what the planner predicts); s/step = ``warm.s_per_step_median``, which is
      the median over warm runs of *denoise_s / steps* -- a mean step that includes the first step and any moves
      inside the denoise stage (model offload, staged loads) -- and total = ``warm.total_s_median``; rows with no
      warm run (the bf16 references) give the cold run's ``cold.s_per_step`` / ``cold.total_s``.
      ``role: reference`` rows are bf16 rows like any other (every one is checked: they repeat per shard, and
      their spread is the noise of the measurement). Rows with ``status`` other than ok are skipped.
    """
    if row.get("schema") == BENCH_SCHEMA:
        if row.get("status") != "ok":
            raise _Skip(f"status {row.get('status')} ({row.get('exit_reason')}): {str(row.get('error'))[:80]}")
        m, warm, cold = row.get("memory") or {}, row.get("warm") or {}, row.get("cold") or {}
        if m.get("peak_gb") is None:
            raise _Skip("no GPU memory measured")
        has_warm = bool(warm.get("n")) and warm.get("total_s_median") is not None
        rq = row.get("request", {})
        return {"label": row.get("scenario") or _short(row["recipe"]), "model": row["model"],
                "recipe": row["recipe"], "device": row.get("device", {}),
                "weights": row.get("weights", {}).get("kind", "hub"), "height": rq["height"], "width": rq["width"], "steps": row.get("steps", rq.get("steps")),
                "text_tokens": rq.get("max_sequence_length"), "peak": m["peak_gb"],
                "step": warm["s_per_step_median"] if has_warm else cold.get("s_per_step"),
                "total": warm["total_s_median"] if has_warm else cold.get("total_s"),
                "cold": not has_warm, "step_kind": "mean"}
    if row.get("error") or row.get("exit_code", 0) or "memory" not in row or "timings" not in row:
        raise _Skip(f"an error row ({str(row.get('error', 'no measurements'))[:80]})")
    t, m, rq = row["timings"], row["memory"], row["request"]
    median = t.get("s_per_step_median")
    return {"label": row.get("scenario") or _short(row["recipe"]), "model": row["model"], "recipe": row["recipe"],
            "device": row.get("device", {}), "weights": row.get("weights", {}).get("kind", "hub"),
            "height": rq["height"], "width": rq["width"], "steps": rq["steps"],
            "text_tokens": rq.get("max_sequence_length"),
            "peak": m.get("generate_peak_allocated_gb", m.get("peak_allocated_gb")),
            "step": median or t["s_per_step"], "total": t["total_s"], "cold": row.get("run_index", 1) == 1,
            "step_kind": "median" if median else "mean"}


def predicted_for(meas: dict, pred: dict, steps: int) -> dict:
    """The prediction of what the row measured: a median step is ``step_s``; a mean step is the denoise stage
    over the steps (+ the cold start, for a cold run); the total is the per-image time (+ the cold start)."""
    cold = pred["cold_s"] if meas["cold"] else 0.0
    pl = calibration()["pipeline"]
    # of the cold start, the encode and decode parts fall outside the denoise stage
    cold_denoise = max(cold - pl.get("encode_cold_extra_s", 0.0) - pl.get("decode_cold_extra_s", 0.0), 0.0) if cold else 0.0
    step = pred["step_s"] if meas["step_kind"] == "median" else (pred["denoise_s"] + cold_denoise) / steps
    return {"peak": pred["peak_vram_gb"], "s/step": step, "total": pred["warm_s"] + cold}


def compare_row(row: dict) -> dict:
    """One measured row against its prediction: {label, pairs: {what: (predicted, measured, tolerance)}, errs,
    ok, steps, basis}. Raises _Skip for rows without a comparable measurement."""
    from . import models
    from .recipe import Recipe

    meas = measured_row(row)
    dev = meas["device"] or {}
    g = find_gpu(dev.get("name", "")) if dev.get("type") == "cuda" else None
    if g is None:
        raise _Skip(f"no GPU profile for device {dev.get('name', dev.get('type'))!r}")
    try:
        tokens = meas["text_tokens"] or models.get_model(meas["model"]).max_sequence_length
        shape = Shape(meas["height"], meas["width"], meas["steps"], 1, tokens)
        pred = predict(meas["model"], Recipe.parse(meas["recipe"]), shape, _realize(g), meas["weights"])
    except (RecipeError, InputError) as e:
        raise _Skip(f"cannot predict ({e})")
    p = predicted_for(meas, pred, shape.steps)
    pairs = {"peak": (p["peak"], meas["peak"], TOLERANCE["peak"]),
             "s/step": (p["s/step"], meas["step"], TOLERANCE["s/step"]),
             "total": (p["total"], meas["total"], TOLERANCE["total"])}
    errs = {k: (a - b) / b for k, (a, b, _) in pairs.items()}
    # a run of fewer steps than the model's default is mostly fixed costs (cold start, encode, decode): its total
    # says little about the model and is shown, not held to the tolerance; its s/step still is
    checked = ["peak", "s/step"] + (["total"] if shape.steps >= models.get_model(meas["model"]).default_steps else [])
    ok = all(abs(errs[k]) <= pairs[k][2] for k in checked)
    basis = ("cold" if meas["cold"] else "warm") + (" median" if meas["step_kind"] == "median" else " mean")
    return {"label": meas["label"], "pairs": pairs, "errs": errs, "ok": ok, "steps": shape.steps, "basis": basis,
            "checked": checked}


def check_rows(path: str | list, file=None) -> int:
    """Predictions vs measured rows of one or more JSONL files (run records and bench rows, mixed freely)."""
    file = file or sys.stdout
    paths = [path] if isinstance(path, str) else list(path)
    results, notes = [], []
    for one in paths:
        p = Path(one)
        if not p.is_file():
            raise InputError(f"--check {one!r}: no such file")
        where = f"{p.name}:" if len(paths) > 1 else "line "
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = _row_record(json.loads(line))
            except json.JSONDecodeError as e:
                notes.append(f"{where}{n}: not JSON ({e})")
                continue
            label = row.get("scenario") or row.get("recipe", f"line {n}")
            try:
                results.append(compare_row(row))
            except _Skip as e:
                notes.append(f"{where}{n} ({label}): skipped, {e}")
            except (KeyError, TypeError) as e:
                notes.append(f"{where}{n} ({label}): skipped, not a measured row (missing {e})")
    print(f"{'row':<36}{'steps':>5} {'basis':<12}{'peak VRAM GB pred/meas':>23}{'err':>8}{'s/step pred/meas':>19}"
          f"{'err':>8}{'total s pred/meas':>20}{'err':>8}  ok (+-10% VRAM, +-25% latency)", file=file)
    for r in results:
        cells = "".join(f"{r['pairs'][k][0]:>10.3f}/{r['pairs'][k][1]:<8.3f}{r['errs'][k]:>+8.1%}"
                        + ("" if k in r["checked"] else "~") for k in ("peak", "s/step", "total"))
        bad = [k for k in r["checked"] if abs(r["errs"][k]) > TOLERANCE[k]]
        print(f"{r['label'][:36]:<36}{r['steps']:>5} {r['basis']:<12}{cells}  "
              f"{'ok' if r['ok'] else 'OUT OF BOUNDS (' + ', '.join(bad) + ')'}", file=file)
    for note in notes:
        print("note: " + note, file=file)
    if not results:
        print("no comparable rows", file=file)
        return 1
    print("basis: warm = a warm run (bench: median of the warm runs), cold = the process's first run (cold start "
          "included); median = median step, mean = denoise stage / steps (bench rows: includes the first step "
          "and moves inside denoise)", file=file)
    if any("total" not in r["checked"] for r in results):
        print("~ = shown, not checked: rows with fewer steps than the model's default are mostly fixed costs (cold "
              "start, encode, decode), so their total is not held to +-25 %; their peak and s/step are", file=file)
    unchecked = [r for r in results if "total" not in r["checked"]]
    if unchecked:
        w = max(unchecked, key=lambda r: abs(r["errs"]["total"]))
        print(f"largest unchecked (~) total error: {w['errs']['total']:+.1%} ({w['label']}, {w['steps']} steps, "
              f"{w['basis']})", file=file)
    worst = {k: max((r for r in results if k in r["checked"]), key=lambda r: abs(r["errs"][k]), default=None)
             for k in ("peak", "s/step", "total")}
    print("worst: " + "; ".join(f"{k} {w['errs'][k]:+.1%} ({w['label']})" for k, w in worst.items() if w), file=file)
    bad = [r["label"] for r in results if not r["ok"]]
    print(f"{len(results) - len(bad)}/{len(results)} rows within bounds" + (f"; out: {', '.join(bad)}" if bad else ""),
          file=file)
    return 1 if bad else 0


# ----------------------------------------------------------------------------------------------------------
# generate --vram: plan, run, fall back on out-of-memory


def _is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def generate_with_budget(spec, weights, budget_str: str, request, device, make_runner, log=print,
                         gpu: str | None = None, max_error: float | None = None):
    """Plan for ``budget_str`` ('8GB' | 'auto' = free VRAM minus the reserve), run the chosen recipe with
    ``make_runner(recipe).generate(request)``; on CUDA out-of-memory free memory and try the next candidate.
    Returns (result, plan_record); the record is also stored as ``result.record['plan']``."""
    import gc

    import torch

    from .recipe import Recipe

    budget = parse_size(budget_str)
    if gpu is None or gpu == "local":
        if device.type != "cuda":
            raise InputError("--vram plans for a CUDA GPU; this run's device is "
                             f"{device.type} (name a profile with --gpu to plan anyway)")
        prof = local_profile()
    else:
        prof = gpu_profile(gpu)
    if budget is None:  # the reserve (CUDA context, fragmentation) is part of the fit rule, not taken twice
        budget = prof.get("vram_free_gb") or prof["vram_gb"]
        log(f"vramfit: --vram auto = {budget:.2f} GB free; a candidate fits when peak x "
            f"{1 + calibration()['budget']['margin']:.2f} + {calibration()['budget']['reserve_gb']} GB <= that")
    shape = Shape(request.height, request.width, request.steps, 1, request.max_sequence_length)
    plan = make_plan(spec.name, shape, prof, budget, max_error=max_error, device_type=device.type,
                     weights_kind=weights.kind)
    fitting = [r for r in plan["candidates"] if r["status"] in ("chosen", "fits")]
    if not fitting:
        need = plan["min_vram_gb"]
        raise VramfitError(f"no recipe fits {budget:.2f} GB on {prof['profile']}"
                           + (f"; the smallest budget that works is {need:.2f} GB" if need else ""))
    fallbacks = []
    for i, row in enumerate(fitting):
        recipe = Recipe.parse(row["recipe"])
        log(f"vramfit: {'planned' if i == 0 else 'falling back to'} {_short(row['recipe'])} (predicted peak "
            f"{row['predicted']['peak_vram_gb']:.2f} GB, {row['predicted']['step_s']:.3f} s/step)")
        runner = None
        try:
            runner = make_runner(recipe)
            result = runner.generate(request)
        except Exception as e:  # noqa: BLE001 -- only out-of-memory falls back; anything else propagates
            if not _is_oom(e):
                raise
            msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            fallbacks.append({"recipe": row["recipe"], "error": f"{type(e).__name__}: {msg}",
                              "predicted_peak_vram_gb": row["predicted"]["peak_vram_gb"]})
            log(f"vramfit: out of memory with {_short(row['recipe'])}: {msg}")
            if runner is not None and hasattr(runner, "close"):
                runner.close()
            del runner
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        record = {"budget_vram_gb": round(budget, 3), "gpu": prof["profile"], "chosen": row["recipe"],
                  "planned": fitting[0]["recipe"], "fallbacks": fallbacks, "predicted": row["predicted"],
                  "calibration": plan["calibration"]}
        rec = getattr(result, "record", None)
        if isinstance(rec, dict):
            meas = {"peak_vram_gb": rec.get("memory", {}).get("peak_allocated_gb"),
                    "step_s": rec.get("timings", {}).get("s_per_step_median"),
                    "total_s": rec.get("timings", {}).get("total_s")}
            record["measured"] = meas
            rec["plan"] = record
        return result, record
    raise VramfitError("every fitting candidate ran out of memory: "
                       + "; ".join(f"{_short(f['recipe'])}: {f['error']}" for f in fallbacks))


# ----------------------------------------------------------------------------------------------------------
# commands


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="predict memory and speed of every recipe for a budget; pick the fastest that fits")
    p.add_argument("model", nargs="?", default="flux-dev")
    p.add_argument("--vram", default=None, help="GPU memory budget: 8GB, 8 GiB, 24000MB or auto (default: free "
                                                "memory of a probed GPU, else the profile's memory)")
    p.add_argument("--ram", default=None, help="host RAM budget (default: not limited, or the probed RAM)")
    p.add_argument("--gpu", default=None, help="a GPU profile (4090, 3090, 4070, 4060, h100, h200, l4, a10) or "
                                               "'local' to probe this machine (the default when it has a GPU)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--images", type=int, default=1, help="images to make: the cold start (compile) is paid once")
    p.add_argument("--max-error", type=float, default=None, help="largest expected relative output error")
    p.add_argument("--weights", default="hub", choices=("hub", "random"), help="where staged loads read from")
    p.add_argument("--top", type=int, default=None, help="print the first N candidates only (0: all)")
    p.add_argument("--check", default=None, nargs="+", metavar="RESULTS.jsonl",
                   help="compare predictions with measured rows of one or more files (bench rows, schema "
                        "vramfit.bench/1, and run records, vramfit.run/1)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    q = sub.add_parser("probe", help="measure this machine (GPU memory, host link, matmul rates) and cache it")
    q.add_argument("--refresh", action="store_true", help="measure again instead of using the cache")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_probe)


def cmd_plan(args) -> int:
    if args.check:
        return check_rows(args.check)
    from . import models

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
    ram = ram or prof.get("host_ram_gb")
    h = args.height or spec.default_size
    w = args.width or spec.default_size
    for name, v in (("height", h), ("width", w)):
        if v <= 0 or v % 16:
            raise InputError(f"--{name} {v}: must be a positive multiple of 16")
    for name in ("steps", "batch", "images"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise InputError(f"--{name} {v}: must be at least 1")
    if args.max_error is not None and args.max_error < 0:
        raise InputError(f"--max-error {args.max_error}: must be >= 0")
    shape = Shape(h, w, args.steps or spec.default_steps, args.batch, spec.max_sequence_length, args.images)
    plan = make_plan(spec.name, shape, prof, vram, ram, args.max_error, weights_kind=args.weights)
    if args.json:
        print(json.dumps(plan))
    else:
        print_plan(plan, top=None if not args.top else args.top)
    if plan["chosen"] is None:
        need = plan["min_vram_gb"]
        print(f"vramfit: nothing fits {vram:.2f} GB"
              + (f"; the smallest budget that works is {need:.2f} GB" if need else ""), file=sys.stderr)
        return 1
    return 0


def cmd_probe(args) -> int:
    import torch

    from . import probe

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
