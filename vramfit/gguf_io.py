"""GGUF files for the FLUX transformer: write them the way the community does, load them the way diffusers does.

The community's FLUX GGUF files (city96/FLUX.1-dev-gguf and the like) hold the *original* Black Forest Labs
checkpoint layout -- ``double_blocks.0.img_attn.qkv.weight``, ``single_blocks.0.linear1.weight``,
``img_in.weight``, ``time_in.in_layer.weight`` ... -- with ``general.architecture = "flux"``. diffusers loads
them with ``FluxTransformer2DModel.from_single_file(path, quantization_config=GGUFQuantizationConfig(...))``,
which converts the keys with ``convert_flux_transformer_checkpoint_to_diffusers``. ``export_gguf`` writes the
exact inverse of that converter, so a file vramfit writes loads through the same code path as a downloaded one.

Tensor types follow the community files: 1-D tensors and tiny tensors stay F32; 2-D tensors whose row length
is not a multiple of the type's block size (32, or 256 for K-quants) fall back to BF16 (lossless for a bf16
model); everything else gets the requested type. (llama.cpp's K-quant "mixes" that keep a few tensors one
type higher are not reproduced: every quantizable tensor gets the one requested type.)

Quantization uses ``gguf.quants.quantize`` where gguf-py implements it (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, BF16).
gguf-py 0.19 can only *de*quantize K-quants, so Q2_K and Q4_K are quantized here with a numpy port of
llama.cpp's reference quantizers (``quantize_row_q2_K_ref`` / ``quantize_row_q4_K_ref`` in ggml-quants.c);
the tests check the result against gguf-py's own dequantizer and diffusers' dequantizer. ``export_gguf``
quantizes with the torch versions in ``gguf_torch`` (byte-identical, vectorised, on CUDA when available);
the numpy path stays as the reference (``quantize_array`` on a numpy array, or ``backend="numpy"``).

diffusers 0.42.1's FLUX converter hard-codes ``inner_dim = 3072`` (the width of FLUX.1) to split
``single_blocks.N.linear1``. For that width ``load_gguf_transformer`` hands the file path to ``from_single_file``
(diffusers converts the keys). For other widths (``flux-tiny``) the same key mapping is applied here, with the
widths taken from the config, and the converted state dict is handed to ``from_single_file`` -- still through
diffusers' GGUF quantizer and loader; only the key renaming is ours.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .errors import InputError

# The width diffusers' converter assumes (FLUX.1-dev/schnell: 24 heads x 128).
DIFFUSERS_CONVERTER_INNER_DIM = 3072

# Tensors with at most this many elements stay F32 (city96's convert.py uses the same threshold).
SMALL_TENSOR_THRESHOLD = 1024

UNQUANTIZED = ("f32", "f16", "bf16")
# What export_gguf writes (a constant so that importing vramfit.quant does not need the gguf package).
WRITABLE = ("bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "q4_k", "q2_k")


def _ggml_types():
    from gguf import GGMLQuantizationType as T

    return {
        "f32": T.F32,
        "f16": T.F16,
        "bf16": T.BF16,
        "q8_0": T.Q8_0,
        "q5_1": T.Q5_1,
        "q5_0": T.Q5_0,
        "q4_1": T.Q4_1,
        "q4_0": T.Q4_0,
        "q4_k": T.Q4_K,
        "q2_k": T.Q2_K,
    }


def _file_type(qtype: str):
    from gguf import LlamaFileType as F

    return {
        "f32": F.ALL_F32,
        "f16": F.MOSTLY_F16,
        "bf16": F.MOSTLY_BF16,
        "q8_0": F.MOSTLY_Q8_0,
        "q5_1": F.MOSTLY_Q5_1,
        "q5_0": F.MOSTLY_Q5_0,
        "q4_1": F.MOSTLY_Q4_1,
        "q4_0": F.MOSTLY_Q4_0,
        "q4_k": F.MOSTLY_Q4_K_S,
        "q2_k": F.MOSTLY_Q2_K,
    }[qtype]


def supported_qtypes() -> tuple[str, ...]:
    """GGUF types ``export_gguf`` can write (lower case, as in recipe values ``gguf-<type>``). BF16 is the
    unquantized file (diffusers keeps it as GGUFParameter; F16/F32 files would load as plain bf16 weights)."""
    return WRITABLE


# ----------------------------------------------------------------------------------------------------------
# key layout: diffusers FluxTransformer2DModel  <->  original BFL checkpoint (what GGUF files hold)


def _key_rules(num_layers: int, num_single_layers: int, has_guidance: bool) -> list[tuple[str, list[str], str]]:
    """(bfl_key, [diffusers keys], how) with how in {"same", "cat", "swap"}; both .weight and .bias variants.

    "cat": the BFL tensor is the diffusers tensors concatenated along dim 0 (qkv fusion, single-block linear1).
    "swap": norm_out: diffusers' AdaLayerNormContinuous splits its projection as (scale, shift), BFL as (shift, scale).
    This is the inverse of diffusers.loaders.single_file_utils.convert_flux_transformer_checkpoint_to_diffusers.
    """
    rules: list[tuple[str, list[str], str]] = []

    def lin(bfl: str, diff: str) -> None:
        for s in ("weight", "bias"):
            rules.append((f"{bfl}.{s}", [f"{diff}.{s}"], "same"))

    def fused(bfl: str, diffs: list[str]) -> None:
        for s in ("weight", "bias"):
            rules.append((f"{bfl}.{s}", [f"{d}.{s}" for d in diffs], "cat"))

    def one(bfl: str, diff: str) -> None:
        rules.append((bfl, [diff], "same"))

    lin("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    lin("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    lin("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    lin("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    if has_guidance:
        lin("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
        lin("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    lin("txt_in", "context_embedder")
    lin("img_in", "x_embedder")
    for i in range(num_layers):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        lin(f"{b}.img_mod.lin", f"{d}.norm1.linear")
        lin(f"{b}.txt_mod.lin", f"{d}.norm1_context.linear")
        fused(f"{b}.img_attn.qkv", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"])
        fused(f"{b}.txt_attn.qkv", [f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"])
        one(f"{b}.img_attn.norm.query_norm.scale", f"{d}.attn.norm_q.weight")
        one(f"{b}.img_attn.norm.key_norm.scale", f"{d}.attn.norm_k.weight")
        one(f"{b}.txt_attn.norm.query_norm.scale", f"{d}.attn.norm_added_q.weight")
        one(f"{b}.txt_attn.norm.key_norm.scale", f"{d}.attn.norm_added_k.weight")
        lin(f"{b}.img_mlp.0", f"{d}.ff.net.0.proj")
        lin(f"{b}.img_mlp.2", f"{d}.ff.net.2")
        lin(f"{b}.txt_mlp.0", f"{d}.ff_context.net.0.proj")
        lin(f"{b}.txt_mlp.2", f"{d}.ff_context.net.2")
        lin(f"{b}.img_attn.proj", f"{d}.attn.to_out.0")
        lin(f"{b}.txt_attn.proj", f"{d}.attn.to_add_out")
    for i in range(num_single_layers):
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        lin(f"{b}.modulation.lin", f"{d}.norm.linear")
        fused(f"{b}.linear1", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"])
        one(f"{b}.norm.query_norm.scale", f"{d}.attn.norm_q.weight")
        one(f"{b}.norm.key_norm.scale", f"{d}.attn.norm_k.weight")
        lin(f"{b}.linear2", f"{d}.proj_out")
    lin("final_layer.linear", "proj_out")
    for s in ("weight", "bias"):
        rules.append((f"final_layer.adaLN_modulation.1.{s}", [f"norm_out.linear.{s}"], "swap"))
    return rules


def _swap_halves(t):
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _rules_for(config) -> list[tuple[str, list[str], str]]:
    return _key_rules(config["num_layers"], config["num_single_layers"], bool(config.get("guidance_embeds")))


def diffusers_to_bfl(state_dict: dict, config) -> dict:
    """diffusers FluxTransformer2DModel state dict -> original BFL layout (what FLUX GGUF files hold)."""
    out, used = {}, set()
    for bfl, diffs, how in _rules_for(config):
        parts = [state_dict[k] for k in diffs]
        used.update(diffs)
        if how == "cat":
            out[bfl] = torch.cat(parts, dim=0)
        elif how == "swap":
            out[bfl] = _swap_halves(parts[0])
        else:
            out[bfl] = parts[0]
    left = set(state_dict) - used
    if left:  # a config this mapping does not know (e.g. a FLUX variant): refuse rather than drop weights
        raise InputError(f"cannot map transformer weights to the FLUX GGUF layout: {sorted(left)[:5]}")
    return out


def bfl_to_diffusers(checkpoint: dict, config, row_sizes: dict[str, int]) -> dict:
    """Original BFL layout -> diffusers keys, for any width (diffusers' own converter assumes 3072).

    ``row_sizes`` gives dim 0 of each diffusers tensor (from the empty model) to split fused tensors. Works on
    GGUFParameter byte tensors too: GGUF quantizes row by row, so splitting rows splits the quantized data.
    """
    out = {}
    for bfl, diffs, how in _rules_for(config):
        t = checkpoint.pop(bfl)
        if how == "cat":
            for k, part in zip(diffs, torch.split(t, [row_sizes[k] for k in diffs], dim=0)):
                out[k] = part
        elif how == "swap":
            out[diffs[0]] = _swap_halves(t)
        else:
            out[diffs[0]] = t
    if checkpoint:
        raise InputError(f"GGUF file has tensors the FLUX layout does not know: {sorted(checkpoint)[:5]}")
    return out


# ----------------------------------------------------------------------------------------------------------
# K-quant quantizers (numpy ports of llama.cpp's reference code; gguf-py only dequantizes these)


def _nearest_int(x: np.ndarray) -> np.ndarray:
    # llama.cpp's nearest_int rounds half to even (float magic-number trick); np.rint does the same
    return np.rint(x).astype(np.int32)


def _make_qkx2_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                      use_mad: bool):
    """Vectorised ``make_qkx2_quants``: per row of ``x`` (one sub-block each), find scale and min so that
    x ~= scale * L - min with L in [0, nmax], by a weighted least-squares search over candidate scales.
    Returns (scale [n], the_min [n] (>= 0), L [n, k] uint8)."""
    x = x.astype(np.float32)
    w = weights.astype(np.float32)
    mn = np.minimum(x.min(axis=1), 0.0)
    mx = x.max(axis=1)
    sum_w = w.sum(axis=1)
    sum_x = (w * x).sum(axis=1)
    rng = mx - mn
    flat = rng == 0
    safe = np.where(flat, 1.0, rng)

    def err(scale, mnv, L):
        diff = scale[:, None] * L + mnv[:, None] - x
        diff = np.abs(diff) if use_mad else diff * diff
        return (w * diff).sum(axis=1)

    iscale = nmax / safe
    scale = 1.0 / iscale
    L = np.clip(_nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax).astype(np.float32)
    best = err(scale, mn, L)
    best_min = mn.copy()
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * step + nmax) / safe
        La = np.clip(_nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax).astype(np.float32)
        sum_l = (w * La).sum(axis=1)
        sum_l2 = (w * La * La).sum(axis=1)
        sum_xl = (w * La * x).sum(axis=1)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Dsafe = np.where(ok, D, 1.0)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Dsafe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Dsafe
        pos = this_min > 0
        this_min = np.where(pos, 0.0, this_min)
        this_scale = np.where(pos, sum_xl / np.where(sum_l2 > 0, sum_l2, 1.0), this_scale)
        cur = err(this_scale, this_min, La)
        better = ok & (cur < best)
        L = np.where(better[:, None], La, L)
        best = np.where(better, cur, best)
        scale = np.where(better, this_scale, scale)
        best_min = np.where(better, this_min, best_min)
    scale = np.where(flat, 0.0, scale)
    L = np.where(flat[:, None], 0.0, L)
    return scale.astype(np.float32), (-best_min).astype(np.float32), L.astype(np.uint8)


def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def quantize_q2_k(data: np.ndarray) -> np.ndarray:
    """Q2_K (llama.cpp ``quantize_row_q2_K_ref``): 256-value super-blocks of 16 sub-blocks of 16 values;
    2-bit quants, 4-bit sub-block scales and mins, fp16 super-block scale d and dmin. 84 bytes / 256 values.
    Block layout: scales[16] | qs[64] | d (f16) | dmin (f16)."""
    rows, cols = data.shape
    assert cols % 256 == 0
    x = data.astype(np.float32).reshape(-1, 256)  # super-blocks
    nb = x.shape[0]
    sub = x.reshape(-1, 16)
    scales, mins, _ = _make_qkx2_quants(sub, np.abs(sub), 3, -0.5, 0.1, 15, True)
    scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
    max_scale, max_min = scales.max(axis=1), mins.max(axis=1)
    q4 = 15.0
    ls = np.where(max_scale[:, None] > 0, _nearest_int(scales * (q4 / np.where(max_scale > 0, max_scale, 1))[:, None]), 0)
    lm = np.where(max_min[:, None] > 0, _nearest_int(mins * (q4 / np.where(max_min > 0, max_min, 1))[:, None]), 0)
    ls, lm = np.clip(ls, 0, 15), np.clip(lm, 0, 15)
    d = _fp16(np.where(max_scale > 0, max_scale / q4, 0.0))
    dmin = _fp16(np.where(max_min > 0, max_min / q4, 0.0))
    # requantize every value with the scales as they will be decoded
    dl = d.astype(np.float32)[:, None] * ls  # [nb, 16]
    ml = dmin.astype(np.float32)[:, None] * lm
    xs = x.reshape(nb, 16, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        L = _nearest_int((xs + ml[..., None]) / dl[..., None])
    L = np.where(dl[..., None] == 0, 0, np.clip(L, 0, 3)).astype(np.uint8).reshape(nb, 256)
    # pack: byte j/4 + l (j in {0,128}, l < 32) holds L[j+l], L[j+l+32], L[j+l+64], L[j+l+96] at bits 0,2,4,6
    L = L.reshape(nb, 2, 4, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(nb, 64)
    sc = (ls | (lm << 4)).astype(np.uint8)
    out = np.concatenate([sc, qs.astype(np.uint8), d.reshape(nb, 1).view(np.uint8), dmin.reshape(nb, 1).view(np.uint8)],
                         axis=1)
    assert out.shape[1] == 84
    return out.reshape(rows, cols // 256 * 84)


def quantize_q4_k(data: np.ndarray) -> np.ndarray:
    """Q4_K (llama.cpp ``quantize_row_q4_K_ref``): 256-value super-blocks of 8 sub-blocks of 32 values; 4-bit
    quants, 6-bit sub-block scales and mins, fp16 d and dmin. 144 bytes / 256 values.
    Block layout: d (f16) | dmin (f16) | scales[12] (6-bit packed) | qs[128]."""
    rows, cols = data.shape
    assert cols % 256 == 0
    x = data.astype(np.float32).reshape(-1, 256)
    nb = x.shape[0]
    sub = x.reshape(-1, 32)
    # weights as in llama.cpp: av_x = sqrt(mean(x^2)) over the 32-value sub-block, w = av_x + |x|
    w = np.sqrt((sub * sub).mean(axis=1, keepdims=True)) + np.abs(sub)
    scales, mins, _ = _make_qkx2_quants(sub, w, 15, -1.0, 0.1, 20, False)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale, max_min = scales.max(axis=1), mins.max(axis=1)
    inv_scale = np.where(max_scale > 0, 63.0 / np.where(max_scale > 0, max_scale, 1), 0.0)
    inv_min = np.where(max_min > 0, 63.0 / np.where(max_min > 0, max_min, 1), 0.0)
    ls = np.minimum(63, _nearest_int(inv_scale[:, None] * scales)).astype(np.uint8)
    lm = np.minimum(63, _nearest_int(inv_min[:, None] * mins)).astype(np.uint8)
    # 6-bit packing (get_scale_min_k4's inverse): j<4: scales[j]=ls, scales[j+4]=lm;
    # j>=4: scales[j+4] = (ls & 0xF) | (lm & 0xF) << 4, scales[j-4] |= (ls >> 4) << 6, scales[j] |= (lm >> 4) << 6
    sc = np.zeros((nb, 12), dtype=np.uint8)
    sc[:, 0:4] = ls[:, 0:4]
    sc[:, 4:8] = lm[:, 0:4]
    sc[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    sc[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    sc[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    d = _fp16(max_scale / 63.0)
    dmin = _fp16(max_min / 63.0)
    dl = d.astype(np.float32)[:, None] * ls
    ml = dmin.astype(np.float32)[:, None] * lm
    xs = x.reshape(nb, 8, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        L = _nearest_int((xs + ml[..., None]) / dl[..., None])
    L = np.where(dl[..., None] == 0, 0, np.clip(L, 0, 15)).astype(np.uint8).reshape(nb, 4, 2, 32)
    # pack: for each 64-value chunk j, byte l holds L[j+l] (low nibble) and L[j+l+32] (high nibble)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(nb, 128)
    out = np.concatenate([d.reshape(nb, 1).view(np.uint8), dmin.reshape(nb, 1).view(np.uint8), sc, qs], axis=1)
    assert out.shape[1] == 144
    return out.reshape(rows, cols // 256 * 144)


_OWN_QUANTIZERS = {"q2_k": quantize_q2_k, "q4_k": quantize_q4_k}


def quantize_array(arr, qtype: str, backend: str | None = None) -> np.ndarray:
    """Quantize a 2-D float array to GGUF bytes (uint8 [rows, bytes per row]).

    backend "numpy" (default for numpy arrays): gguf-py where it can, the ports above for K-quants.
    backend "torch" (default for torch tensors): ``gguf_torch.quantize``, byte-identical, on CUDA if available.
    """
    if backend is None:
        backend = "torch" if isinstance(arr, torch.Tensor) else "numpy"
    if backend == "torch":
        from . import gguf_torch

        t = arr if isinstance(arr, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(arr))
        return gguf_torch.quantize(t, qtype)
    if backend != "numpy":
        raise ValueError(f"backend must be 'torch' or 'numpy', not {backend!r}")
    if isinstance(arr, torch.Tensor):
        arr = arr.detach().to(torch.float32).cpu().numpy()
    import gguf

    if qtype in _OWN_QUANTIZERS:
        return _OWN_QUANTIZERS[qtype](arr)
    return gguf.quants.quantize(arr, _ggml_types()[qtype])


def _tensor_type(name: str, t: torch.Tensor, qtype: str) -> str:
    import gguf

    if t.ndim == 1 or t.numel() <= SMALL_TENSOR_THRESHOLD:
        return "f32"
    if qtype == "bf16":
        return qtype
    block, _ = gguf.GGML_QUANT_SIZES[_ggml_types()[qtype]]
    if t.shape[-1] % block:
        return "bf16"
    return qtype


# ----------------------------------------------------------------------------------------------------------
# public API


def export_gguf(transformer, qtype: str, path, *, backend: str | None = None) -> dict:
    """Write a diffusers FluxTransformer2DModel as a FLUX GGUF file (BFL key layout, ``general.architecture=flux``).

    ``qtype``: one of ``supported_qtypes()`` (``q8_0``, ``q4_1``, ``q2_k``, ... or ``bf16``/``f16``/``f32``
    for an unquantized file). Returns {"path", "qtype", "tensor_types": {type: count}, "bytes"}.
    ``backend``: "torch" (``gguf_torch``, vectorised on CUDA) or "numpy" (same bytes). Default: torch when a
    GPU is present; numpy otherwise, since on CPU numpy is 5-10x faster for the simple types (measured).
    """
    if backend is None:
        backend = "torch" if torch.cuda.is_available() else "numpy"
    import gguf

    qtype = qtype.lower().removeprefix("gguf-")
    types = _ggml_types()
    if qtype not in supported_qtypes():
        raise InputError(f"GGUF type {qtype!r} cannot be written; choose one of {', '.join(supported_qtypes())}")
    config = dict(transformer.config)
    sd = {k: v.detach() for k, v in transformer.state_dict().items()}
    if any(v.is_meta for v in sd.values()):
        raise InputError("the transformer has weights on the meta device; build or load it before exporting")
    bfl = diffusers_to_bfl(sd, config)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch="flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(int(_file_type(qtype)))
    # not read by any loader; says what wrote the file and for which architecture (diffusers config numbers)
    writer.add_string("vramfit.diffusers_config", json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))
    counts: dict[str, int] = {}
    for name, t in bfl.items():
        ttype = _tensor_type(name, t, qtype)
        if ttype == "f32":
            data = t.to(torch.float32).cpu().numpy().astype(np.float32)
        elif ttype == "f16":
            data = t.to(torch.float32).cpu().numpy().astype(np.float16)
        else:  # the tensor itself: no float32 numpy copy of every weight
            data = quantize_array(t, ttype, backend)
        # quantized data is uint8 [rows, bytes per row]; the writer derives the element shape from raw_dtype
        writer.add_tensor(name, data, raw_dtype=types[ttype])
        counts[ttype] = counts.get(ttype, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"path": str(path), "qtype": qtype, "tensor_types": counts, "bytes": path.stat().st_size}


def _reader(path):
    from gguf import GGUFReader

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{path}: no such GGUF file")
    try:
        return GGUFReader(str(p))
    except Exception as e:  # gguf-py raises ValueError / struct errors on non-GGUF bytes
        raise InputError(f"{path}: not a GGUF file ({type(e).__name__}: {e})") from None


def _field_str(reader, key: str) -> str | None:
    f = reader.fields.get(key)
    if f is None:
        return None
    return bytes(f.parts[f.data[0]]).decode("utf-8", "replace")


def read_gguf_type(path) -> str:
    """The dominant tensor type of a FLUX GGUF file as a recipe value, e.g. ``"gguf-q4_1"``.

    Dominant = the quantized type holding the most elements (F32/F16/BF16 side tensors ignored); a file with no
    quantized tensor gives ``gguf-bf16``/``gguf-f16``/``gguf-f32``.
    """
    reader = _reader(path)
    arch = _field_str(reader, "general.architecture")
    names = {t.name for t in reader.tensors}
    is_flux = "double_blocks.0.img_attn.qkv.weight" in names or "model.diffusion_model.double_blocks.0.img_attn.qkv.weight" in names
    if arch != "flux" or not is_flux:
        raise InputError(f"{path}: a GGUF file but not a FLUX transformer (general.architecture={arch!r})")
    by_type: dict[str, int] = {}
    for t in reader.tensors:
        n = t.tensor_type.name.lower()
        by_type[n] = by_type.get(n, 0) + int(t.n_elements)
    quantized = {k: v for k, v in by_type.items() if k not in UNQUANTIZED}
    pick = quantized or by_type
    return "gguf-" + max(pick, key=pick.get)


def _load_config(config_dir) -> tuple[dict, str, str | None]:
    """Accept either a model config dir (with transformer/config.json) or the transformer dir itself."""
    d = Path(config_dir)
    if (d / "config.json").is_file():
        return json.loads((d / "config.json").read_text()), str(d), None
    if (d / "transformer" / "config.json").is_file():
        return json.loads((d / "transformer" / "config.json").read_text()), str(d), "transformer"
    raise InputError(f"{config_dir}: no config.json (nor transformer/config.json)")


def load_gguf_transformer(path, config_dir, compute_dtype=torch.bfloat16, device="cpu"):
    """Load a FLUX GGUF file with diffusers' ``from_single_file`` + ``GGUFQuantizationConfig``, using the bundled
    config (no hub lookup). Quantized linears become diffusers ``GGUFLinear`` holding ``GGUFParameter`` weights,
    dequantized on the fly to ``compute_dtype``."""
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    read_gguf_type(path)  # clear error for non-GGUF / non-FLUX files before diffusers' own
    config, cfg_root, subfolder = _load_config(config_dir)
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    qc = GGUFQuantizationConfig(compute_dtype=compute_dtype)
    kwargs = dict(config=cfg_root, subfolder=subfolder, quantization_config=qc, torch_dtype=compute_dtype,
                  local_files_only=True)
    if inner == DIFFUSERS_CONVERTER_INNER_DIM:
        source = str(path)  # the real width: diffusers converts the keys itself
    else:
        from diffusers.models.model_loading_utils import load_gguf_checkpoint

        with torch.device("meta"):
            shapes = FluxTransformer2DModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
        rows = {k: v.shape[0] for k, v in shapes.state_dict().items()}
        source = bfl_to_diffusers(load_gguf_checkpoint(str(path)), config, rows)
    model = FluxTransformer2DModel.from_single_file(source, **kwargs)
    model = model.eval().requires_grad_(False)
    if torch.device(device).type != "cpu":
        model = model.to(device)
    return model


def gguf_classes(model) -> dict[str, int]:
    """{"GGUFLinear/Q8_0": n, ...}: which linears hold GGUFParameter weights of which type."""
    from diffusers.quantizers.gguf.utils import GGUFParameter

    out: dict[str, int] = {}
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, GGUFParameter):
            k = f"{type(m).__name__}/{w.quant_type.name}"
            out[k] = out.get(k, 0) + 1
    return out
