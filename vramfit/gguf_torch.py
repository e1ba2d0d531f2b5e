"""GGUF quantizers in torch, byte-identical to the numpy ones, for any torch device (CUDA when available).

``quantize(t, qtype)`` returns what ``gguf_io.quantize_array`` returns for the same values -- uint8
``[rows, bytes per row]`` -- bit for bit: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and BF16 as gguf-py's
``gguf.quants.quantize`` computes them, Q2_K and Q4_K as the numpy ports in ``gguf_io`` do
(``quantize_q2_k`` / ``quantize_q4_k``). All blocks of a row chunk are processed at once; the K-quant
scale search (``make_qkx2_quants``) is vectorised over blocks and keeps the numpy port's arithmetic.

How byte identity is kept (each point checked against numpy 2.4 on x86-64; tests/test_gguf_torch.py):

* Same precision at every step: float32 everywhere numpy computes in float32; float64 where numpy promotes
  (Q2_K's final requantization: ``float32 * int32`` is float64 in numpy, so ``(x + ml) / dl`` is float64).
  Python-float constants are rounded to float32 first, as numpy (NEP 50) does with ``pyfloat / f32array``.
* No ``python_scalar / tensor`` (torch computes that as ``reciprocal(t) * scalar``) and no
  ``tensor / python_scalar`` (torch's CUDA kernel turns a CPU-scalar divisor into a multiplication by its
  reciprocal): every division is ``torch.div`` of two tensors on the compute device. Elementwise ops are
  separate eager kernels (no FMA contraction); IEEE division. ``torch.sqrt`` on the CPU is *not* correctly
  rounded (SLEEF), numpy's is: Q4_K's ``sqrt(mean(x^2))`` uses ``_sqrt`` (float64 sqrt plus an exact fix-up).
* Float32 sums over a 16/32-value block reproduce numpy's ``add.reduce`` order: 8 pairwise accumulators
  (``r[j] += a[i + j]``), combined ``((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7))``, added to the initial 0.
* Rounding: ``np.rint`` / ``torch.round`` are both half-to-even; gguf-py's ``np_roundf`` (half away from
  zero) and ``np.trunc(... + 0.5)`` are replicated op for op.
* Casts numpy leaves to C (x86-64): float -> int32 of NaN/inf/out-of-range gives INT_MIN; float -> uint8/int8
  keeps the low byte of the int32 truncation (so NaN/inf/huge -> 0, -1 -> 255); int32 -> uint8 wraps.
  Reachable only for degenerate blocks (scales below ~1e-37, where ``1/d`` overflows), but mirrored anyway.
* Signed zeros reach the output only through fp16 scales/mins. ``np.argmax`` takes the first maximum
  (Q4_0/Q5_0 pick the signed value of largest magnitude); ``max``/``min`` reductions over a block return the
  *last* of equal elements (what numpy's SIMD reduction does with +0/-0), ``np.minimum(v, 0.0)`` returns
  the second operand on ties. Where such a sign can reach the bytes (Q4_1/Q5_1 min and max, Q4_K's
  ``max(scales)``/``max(mins)``), these rules are reproduced.

NaN/inf *inputs* are not covered (model weights have none); everything finite is.
"""

from __future__ import annotations

import numpy as np
import torch

# bytes per block and block size, as in gguf.GGML_QUANT_SIZES (kept here to avoid importing gguf)
BLOCK = {"bf16": (1, 2), "q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22),
         "q5_1": (32, 24), "q2_k": (256, 84), "q4_k": (256, 144)}
TYPES = tuple(BLOCK)

DEFAULT_CHUNK_ELEMS = 1 << 26  # 64 M values per chunk (the largest FLUX.1 tensor, linear1, is 66 M)

_I32_LIMIT = 2.0 ** 31


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _Ops:
    """Device-local float constants (0-d tensors, so that no division sees a python scalar)."""

    def __init__(self, device):
        self.device = device
        self._c: dict = {}

    def c(self, v, dtype=torch.float32) -> torch.Tensor:
        key = (float(v), dtype)
        t = self._c.get(key)
        if t is None:
            if dtype == torch.float32:
                v = float(np.float32(v))  # numpy converts python floats to float32 before a float32 op
            t = self._c[key] = torch.tensor(v, dtype=dtype, device=self.device)
        return t

    def div(self, a, b, dtype=torch.float32):
        a = a if isinstance(a, torch.Tensor) else self.c(a, dtype)
        b = b if isinstance(b, torch.Tensor) else self.c(b, dtype)
        return torch.div(a, b)


# ------------------------------------------------------------------------------------------------------
# numpy semantics helpers


def _np_sum(a: torch.Tensor) -> torch.Tensor:
    """numpy float32 ``a.sum(axis=-1)`` for a contiguous last axis of 8..128 values (pairwise_sum's
    8-accumulator loop, plus the reduction's initial 0)."""
    k = a.shape[-1]
    assert k % 8 == 0 and 8 <= k <= 128, k
    r = a[..., 0:8]
    for i in range(8, k, 8):
        r = r + a[..., i:i + 8]
    r = r[..., 0::2] + r[..., 1::2]  # r0+r1, r2+r3, r4+r5, r6+r7
    r = r[..., 0::2] + r[..., 1::2]  # (r0+r1)+(r2+r3), (r4+r5)+(r6+r7)
    return (r[..., 0] + r[..., 1]) + 0.0


def _pick(a: torch.Tensor, m: torch.Tensor, last: bool) -> torch.Tensor:
    """The element of ``a`` (last axis) equal to ``m`` -- the last (or first) such -- so that the sign of a zero
    result is the one numpy returns. NaN results are kept."""
    k = a.shape[-1]
    order = torch.arange(1, k + 1, device=a.device) if last else torch.arange(k, 0, -1, device=a.device)
    idx = ((a == m.unsqueeze(-1)) * order).argmax(dim=-1, keepdim=True)  # unique weights: no ties
    v = torch.gather(a, -1, idx).squeeze(-1)
    return torch.where(torch.isnan(m), m, v)


def _max_last(a):  # numpy a.max(axis=-1), sign of zero included
    return _pick(a, a.amax(dim=-1), last=True)


def _min_last(a):  # numpy a.min(axis=-1), sign of zero included
    return _pick(a, a.amin(dim=-1), last=True)


def _signed_absmax_first(a):
    """``take_along_axis(a, abs(a).argmax(axis=-1))``: the value of largest magnitude, first one on ties."""
    ab = a.abs()
    k = a.shape[-1]
    order = torch.arange(k, 0, -1, device=a.device)
    idx = ((ab == ab.amax(dim=-1, keepdim=True)) * order).argmax(dim=-1, keepdim=True)
    return torch.gather(a, -1, idx).squeeze(-1)


def _rint_i32(v: torch.Tensor) -> torch.Tensor:
    """``np.rint(v).astype(np.int32)`` as float values: NaN, inf and out-of-range give INT_MIN (x86-64)."""
    r = torch.round(v)
    ok = (r < _I32_LIMIT) & (r >= -_I32_LIMIT)  # False for NaN
    return torch.where(ok, r, -_I32_LIMIT)


def _qint(v, lo, hi):
    """``np.clip(np.rint(v).astype(np.int32), lo, hi)`` as float values (lo <= 0): NaN/inf/>= 2**31 -> INT_MIN
    -> lo; below -2**31 -> lo as well."""
    r = torch.round(v)
    return torch.where(r < _I32_LIMIT, torch.clamp(r, lo, hi), lo)


def _f_to_u8(v: torch.Tensor) -> torch.Tensor:
    """numpy ``float32 -> uint8`` (or int8, same bytes) cast on x86-64: low byte of the int32 truncation;
    NaN / inf / |v| >= 2**31 -> 0. Returns int32 in [0, 255]."""
    ok = torch.isfinite(v) & (v.abs() < _I32_LIMIT)
    i = torch.where(ok, v, 0.0).to(torch.int32)  # truncation toward zero
    return i & 0xFF


def _sqrt(m: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt (numpy's). torch's CPU sqrt is not (SLEEF, ~0.5 ulp, and not for float64
    either), so: float64 sqrt rounded to float32, then one exact correction step -- the result c is right iff
    m lies strictly between the squares of the midpoints to c's neighbours (exact in float64: 25-bit midpoints)."""
    c = torch.sqrt(m.double()).float()
    md = m.double()
    cd = c.double()
    up = torch.nextafter(c, torch.full_like(c, float("inf"))).double()
    dn = torch.nextafter(c, torch.zeros_like(c)).double()
    hi, lo = (cd + up) * 0.5, (cd + dn) * 0.5
    fix = torch.isfinite(m) & (m > 0)
    c = torch.where(fix & (md > hi * hi), up.float(), c)
    c = torch.where(fix & (md < lo * lo), dn.float(), c)
    return c


def _f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """float32 [n] -> fp16 (round to nearest even, like numpy's astype) -> uint8 [n, 2] little-endian."""
    return v.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _u8(i: torch.Tensor) -> torch.Tensor:
    return (i & 0xFF).to(torch.uint8)


# ------------------------------------------------------------------------------------------------------
# gguf-py's legacy quants (gguf/quants.py), per block of 32 values; x: float32 [n_blocks, 32]


def _q8_0(x, o: _Ops):
    d = o.div(x.abs().amax(dim=1), 127.0)
    dz = d == 0
    id_ = torch.where(dz, 0.0, o.div(1.0, torch.where(dz, o.c(1.0), d)))
    n = x * id_[:, None]
    # np_roundf: sign(n) * (floor(|n|) + floor(2 * (|n| - floor(|n|))))
    a = n.abs()
    fl = torch.floor(a)
    b = fl + torch.floor(2 * (a - fl))
    q = torch.sign(n) * b
    return torch.cat([_f16_bytes(d), _u8(_f_to_u8(q))], dim=1)


def _legacy_sym(x, o: _Ops, nbits: int):
    """Q4_0 / Q5_0: d = max / -(2**(b-1)), q = trunc(x / d + 2**(b-1) + 0.5)."""
    half = 1 << (nbits - 1)
    mx = _signed_absmax_first(x)
    d = o.div(mx, float(-half))
    dz = d == 0
    id_ = torch.where(dz, 0.0, o.div(1.0, torch.where(dz, o.c(1.0), d)))
    q = _f_to_u8(torch.trunc(x * id_[:, None] + (half + 0.5))).clamp(0, (1 << nbits) - 1)
    return d, None, q


def _legacy_asym(x, o: _Ops, nbits: int):
    """Q4_1 / Q5_1: d = (max - min) / (2**b - 1), m = min, q = trunc((x - min) / d + 0.5)."""
    mx, mn = _max_last(x), _min_last(x)
    d = o.div(mx - mn, float((1 << nbits) - 1))
    dz = d == 0
    id_ = torch.where(dz, 0.0, o.div(1.0, torch.where(dz, o.c(1.0), d)))
    q = _f_to_u8(torch.trunc((x - mn[:, None]) * id_[:, None] + 0.5)).clamp(0, (1 << nbits) - 1)
    return d, mn, q


def _pack_legacy(d, m, q, nbits):
    parts = [_f16_bytes(d)]
    if m is not None:
        parts.append(_f16_bytes(m))
    if nbits == 5:
        bits = (q >> 4) & 1  # [n, 32]: np.packbits(q >> 4, bitorder="little") -> 4 bytes
        w = torch.tensor([1 << i for i in range(8)], dtype=torch.int32, device=q.device)
        parts.append(_u8((bits.reshape(-1, 4, 8) * w).sum(dim=-1)))
        parts.append(_u8((q[:, :16] & 0x0F) | (q[:, 16:] << 4)))
    else:
        parts.append(_u8(q[:, :16] | (q[:, 16:] << 4)))
    return torch.cat(parts, dim=1)


def _q4_0(x, o):
    return _pack_legacy(*_legacy_sym(x, o, 4), 4)


def _q5_0(x, o):
    return _pack_legacy(*_legacy_sym(x, o, 5), 5)


def _q4_1(x, o):
    return _pack_legacy(*_legacy_asym(x, o, 4), 4)


def _q5_1(x, o):
    return _pack_legacy(*_legacy_asym(x, o, 5), 5)


def _bf16(x, o):
    """gguf-py BF16 (ggml_compute_fp32_to_bf16): NaN forced quiet, round to nearest even. x: [n, 1]."""
    n = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    n = torch.where((n & 0x7FFFFFFF) > 0x7F800000, (n & 0xFFFF0000) | (64 << 16), n)
    n = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
    return torch.cat([_u8(n), _u8(n >> 8)], dim=1)


# ------------------------------------------------------------------------------------------------------
# K-quants: torch versions of gguf_io._make_qkx2_quants / quantize_q2_k / quantize_q4_k


def _make_qkx2(x, w, nmax, rmin, rdelta, nstep, use_mad, o: _Ops):
    """(scale [n], the_min [n]) exactly as gguf_io._make_qkx2_quants (the L it also returns is unused)."""
    one = o.c(1.0)
    xmin, mx = x.amin(dim=1), x.amax(dim=1)
    mn = torch.where(xmin < 0, xmin, 0.0)  # np.minimum(xmin, 0.0): +0.0 on ties
    sum_w = _np_sum(w)
    sum_x = _np_sum(w * x)
    rng = mx - mn
    flat = rng == 0
    safe = torch.where(flat, one, rng)
    xm = x - mn[:, None]

    def err(scale, mnv, L):
        diff = scale[:, None] * L + mnv[:, None] - x
        diff = diff.abs() if use_mad else diff * diff
        return _np_sum(w * diff)

    iscale = o.div(float(nmax), safe)
    scale = o.div(1.0, iscale)
    L = _qint(iscale[:, None] * xm, 0, nmax)
    best = err(scale, mn, L)
    best_min = mn
    for step in range(nstep + 1):
        iscale = o.div(rmin + rdelta * step + nmax, safe)  # python-float numerator, rounded to float32
        La = _qint(iscale[:, None] * xm, 0, nmax)
        wLa = w * La
        sum_l = _np_sum(wLa)
        sum_l2 = _np_sum(wLa * La)
        sum_xl = _np_sum(wLa * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Dsafe = torch.where(ok, D, one)
        this_scale = torch.div(sum_w * sum_xl - sum_x * sum_l, Dsafe)
        this_min = torch.div(sum_l2 * sum_x - sum_l * sum_xl, Dsafe)
        pos = this_min > 0
        this_min = torch.where(pos, 0.0, this_min)
        this_scale = torch.where(pos, torch.div(sum_xl, torch.where(sum_l2 > 0, sum_l2, one)), this_scale)
        cur = err(this_scale, this_min, La)
        better = ok & (cur < best)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        best_min = torch.where(better, this_min, best_min)
    scale = torch.where(flat, 0.0, scale)
    return scale, -best_min


def _q2_k(x, o: _Ops):
    """x: float32 [nb, 256] -> [nb, 84]: scales[16] | qs[64] | d | dmin."""
    nb = x.shape[0]
    sub = x.reshape(-1, 16)
    scales, mins = _make_qkx2(sub, sub.abs(), 3, -0.5, 0.1, 15, True, o)
    scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
    max_scale, max_min = scales.amax(dim=1), mins.amax(dim=1)  # only compared with 0: zero sign irrelevant
    one, q4 = o.c(1.0), o.c(15.0)
    sp, mp = max_scale > 0, max_min > 0
    ls = torch.where(sp[:, None], _qint(scales * o.div(q4, torch.where(sp, max_scale, one))[:, None], 0, 15), 0.0)
    lm = torch.where(mp[:, None], _qint(mins * o.div(q4, torch.where(mp, max_min, one))[:, None], 0, 15), 0.0)
    d = torch.where(sp, o.div(max_scale, q4), 0.0).to(torch.float16)
    dmin = torch.where(mp, o.div(max_min, q4), 0.0).to(torch.float16)
    # numpy: float32 * int32 -> float64, so the requantization runs in float64
    dl = d.double()[:, None] * ls.double()
    ml = dmin.double()[:, None] * lm.double()
    xs = x.reshape(nb, 16, 16).double()
    L = torch.where(dl[..., None] == 0, 0.0, _qint(torch.div(xs + ml[..., None], dl[..., None]), 0, 3))
    L = L.to(torch.int32).reshape(nb, 2, 4, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(nb, 64)
    sc = ls.to(torch.int32) | (lm.to(torch.int32) << 4)
    return torch.cat([_u8(sc), _u8(qs), d.view(torch.uint8).reshape(nb, 2), dmin.view(torch.uint8).reshape(nb, 2)],
                     dim=1)


def _q4_k(x, o: _Ops):
    """x: float32 [nb, 256] -> [nb, 144]: d | dmin | scales[12] | qs[128]."""
    nb = x.shape[0]
    sub = x.reshape(-1, 32)
    # np.mean: float32 sum, then true_divide by an intp count (float64), stored back as float32
    mean = o.div(_np_sum(sub * sub).double(), 32.0, torch.float64).to(torch.float32)
    w = _sqrt(mean)[:, None] + sub.abs()
    scales, mins = _make_qkx2(sub, w, 15, -1.0, 0.1, 20, False, o)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale, max_min = _max_last(scales), _max_last(mins)  # zero sign reaches d/dmin
    one, c63 = o.c(1.0), o.c(63.0)
    sp, mp = max_scale > 0, max_min > 0
    inv_scale = torch.where(sp, o.div(c63, torch.where(sp, max_scale, one)), 0.0)
    inv_min = torch.where(mp, o.div(c63, torch.where(mp, max_min, one)), 0.0)
    # np.minimum(63, int32).astype(uint8): wraps modulo 256 (INT_MIN -> 0)
    ls = torch.clamp(_rint_i32(inv_scale[:, None] * scales), max=63).to(torch.int64) & 0xFF
    lm = torch.clamp(_rint_i32(inv_min[:, None] * mins), max=63).to(torch.int64) & 0xFF
    sc = torch.cat([ls[:, 0:4] | ((((ls[:, 4:8] >> 4) << 6)) & 0xFF),
                    lm[:, 0:4] | ((((lm[:, 4:8] >> 4) << 6)) & 0xFF),
                    (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)], dim=1)
    d = o.div(max_scale, c63).to(torch.float16)
    dmin = o.div(max_min, c63).to(torch.float16)
    # numpy: float32 * uint8 -> float32
    dl = d.float()[:, None] * ls.float()
    ml = dmin.float()[:, None] * lm.float()
    xs = x.reshape(nb, 8, 32)
    L = torch.where(dl[..., None] == 0, 0.0, _qint(torch.div(xs + ml[..., None], dl[..., None]), 0, 15))
    L = L.to(torch.int32).reshape(nb, 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(nb, 128)
    return torch.cat([d.view(torch.uint8).reshape(nb, 2), dmin.view(torch.uint8).reshape(nb, 2), _u8(sc), _u8(qs)],
                     dim=1)


_KERNELS = {"bf16": _bf16, "q8_0": _q8_0, "q4_0": _q4_0, "q4_1": _q4_1, "q5_0": _q5_0, "q5_1": _q5_1,
            "q2_k": _q2_k, "q4_k": _q4_k}


# ------------------------------------------------------------------------------------------------------
# public API


def quantize(t: torch.Tensor, qtype: str, device=None, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> np.ndarray:
    """Quantize a tensor (rows along the last axis) to GGUF bytes: numpy uint8 ``[rows, bytes per row]``,
    byte-identical to ``gguf_io.quantize_array(t.float().numpy(), qtype)``.

    ``device``: where to compute; default: the tensor's device if it is not the CPU, else CUDA when available,
    else the CPU. Rows are processed ``chunk_elems`` values at a time (each chunk is moved to ``device`` and
    converted to float32 there, so the whole tensor is never copied to float32 at once).
    """
    qtype = qtype.lower()
    if qtype not in _KERNELS:
        raise ValueError(f"no torch quantizer for {qtype!r}; have {', '.join(TYPES)}")
    block, size = BLOCK[qtype]
    if not isinstance(t, torch.Tensor):
        t = torch.from_numpy(np.asarray(t))
    if t.ndim == 0 or t.shape[-1] % block:
        raise ValueError(f"row size {tuple(t.shape)[-1:]} is not a multiple of the {qtype} block size ({block})")
    if device is None:
        device = t.device if t.device.type != "cpu" else default_device()
    device = torch.device(device)
    cols = t.shape[-1]
    t2 = t.reshape(-1, cols)
    rows = t2.shape[0]
    bpr = cols // block * size
    out = np.empty((rows, bpr), dtype=np.uint8)
    step = max(1, chunk_elems // cols)
    o = _Ops(device)
    kern = _KERNELS[qtype]
    with torch.no_grad():
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            x = t2[r0:r1].to(device=device, non_blocking=False).to(torch.float32).contiguous()
            q = kern(x.reshape(-1, block), o)
            out[r0:r1] = q.reshape(r1 - r0, bpr).cpu().numpy()
    return out.reshape(*t.shape[:-1], bpr)
