"""vramfit.gguf_torch: torch GGUF quantizers must give the very bytes of the numpy reference
(gguf-py's ``gguf.quants.quantize`` for BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1, gguf_io's ports for Q2_K/Q4_K).
CPU only here; the same code runs on CUDA."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from vramfit import gguf_io, gguf_torch

pytestmark = pytest.mark.filterwarnings("ignore")  # numpy warns (divide/invalid/overflow) on degenerate blocks

TYPES = ["bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q4_k"]
SHAPES = {32: [(1, 32), (5, 96), (40, 256)], 256: [(1, 256), (6, 512), (40, 768)], 1: [(3, 7), (40, 96)]}


def _block(qtype):
    return gguf_torch.BLOCK[qtype][0]


def make_rows(rows: int, cols: int, seed: int) -> np.ndarray:
    """Float32 rows that hit the corner cases: bf16-representable gaussians over many magnitudes, outliers,
    zero rows, constant rows, +0/-0 mixes, non-negative rows with zeros, integer ties, tiny (scales whose
    reciprocal overflows) and huge magnitudes."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)) * 10.0 ** rng.uniform(-4, 2, (rows, 1))
    kinds = [
        lambda r: r,
        lambda r: np.where(rng.random(cols) < 0.02, r * 300, r),  # outliers
        lambda r: np.zeros(cols),
        lambda r: np.full(cols, 0.3125),
        lambda r: np.full(cols, -2.5),
        lambda r: np.where(rng.random(cols) < 0.5, -0.0, 0.0),
        lambda r: np.abs(r) * (rng.random(cols) < 0.6),  # >= 0 with zeros
        lambda r: -np.abs(r),
        lambda r: rng.integers(-3, 4, cols).astype(np.float64),  # ties of +-max
        lambda r: r * (rng.random(cols) < 0.05),  # mostly zeros
        lambda r: r * 1e-36,  # 1/scale overflows float32
        lambda r: r * 1e-41,  # subnormal
        lambda r: r * 1e30,  # fp16 scale overflows
        lambda r: np.where(rng.random(cols) < 0.1, -0.0, r),
    ]
    for i in range(rows):
        x[i] = kinds[i % len(kinds)](x[i])
    # bf16-sourced values, as exported from a bf16 model
    return torch.from_numpy(x.astype(np.float32)).bfloat16().float().numpy()


CASES = [(q, s) for q in TYPES for s in SHAPES[_block(q)]]


@pytest.mark.parametrize("qtype,shape", CASES, ids=[f"{q}-{s[0]}x{s[1]}" for q, s in CASES])
def test_bytes_identical_to_numpy(qtype, shape):
    x = make_rows(*shape, seed=shape[0] * 7 + shape[1])
    ref = gguf_io.quantize_array(x, qtype)  # numpy array -> numpy reference
    got = gguf_torch.quantize(torch.from_numpy(x), qtype, device="cpu")
    assert got.dtype == np.uint8 and got.shape == ref.shape
    bad = sorted(set(np.nonzero(ref != got)[0].tolist()))
    assert np.array_equal(ref, got), f"rows differ: {bad[:10]}"


@pytest.mark.parametrize("qtype", TYPES)
def test_random_magnitudes_and_chunking(qtype):
    """Log-uniform magnitudes over the whole float32 range, sparse signed zeros; small chunks (rows split
    across several chunks, a short last chunk) and a bf16 input tensor give the same bytes."""
    rng = np.random.default_rng(5)
    cols = 512
    x = rng.standard_normal((48, cols)) * 10.0 ** rng.uniform(-44, 36, (48, 1))
    m = rng.random(x.shape)
    x[m < 0.05] = 0.0
    x[(m >= 0.05) & (m < 0.08)] = -0.0
    x = torch.from_numpy(x.astype(np.float32)).bfloat16()
    ref = gguf_io.quantize_array(x.float().numpy(), qtype)
    assert np.array_equal(gguf_torch.quantize(x, qtype, device="cpu", chunk_elems=5 * cols), ref)
    assert np.array_equal(gguf_io.quantize_array(x, qtype), ref)  # torch tensor -> torch backend


def test_quantize_array_backends_and_nd():
    x = torch.from_numpy(make_rows(12, 256, 3))
    a = gguf_io.quantize_array(x, "q4_k", backend="numpy")
    b = gguf_io.quantize_array(x.numpy(), "q4_k", backend="torch")
    assert np.array_equal(a, b)
    # leading dims are kept (rows along the last axis), as gguf-py does
    nd = gguf_torch.quantize(x.reshape(3, 4, 256), "q8_0", device="cpu")
    assert nd.shape == (3, 4, 272) and np.array_equal(nd.reshape(12, 272), gguf_io.quantize_array(x.numpy(), "q8_0"))
    with pytest.raises(ValueError):
        gguf_torch.quantize(x[:, :100], "q8_0", device="cpu")
    with pytest.raises(ValueError):
        gguf_torch.quantize(x, "q6_k", device="cpu")


def test_sqrt_is_correctly_rounded():
    """torch's CPU sqrt is not correctly rounded (float32 nor float64); gguf_torch._sqrt must equal numpy's."""
    rng = np.random.default_rng(0)
    m = np.concatenate([(10.0 ** rng.uniform(-45, 38.5, 300_000)).astype(np.float32),
                        rng.uniform(0, 100, 300_000).astype(np.float32),
                        np.array([0.0, 1.0, 2.6875, 4.0, 1e-45, 3.4e38, np.inf], np.float32)])
    got = gguf_torch._sqrt(torch.from_numpy(m)).numpy()
    assert np.array_equal(np.sqrt(m).view(np.uint32), got.view(np.uint32))


def test_export_same_file_both_backends(tmp_path):
    """export_gguf through torch writes the same file as through numpy."""
    from vramfit.models import build_random_component, get_model

    m = build_random_component(get_model("flux-tiny"), "transformer", 0, "cpu", torch.bfloat16)
    for qtype in ("q4_1", "q2_k"):
        a = gguf_io.export_gguf(m, qtype, tmp_path / f"t-{qtype}.gguf")
        b = gguf_io.export_gguf(m, qtype, tmp_path / f"n-{qtype}.gguf", backend="numpy")
        assert (tmp_path / f"t-{qtype}.gguf").read_bytes() == (tmp_path / f"n-{qtype}.gguf").read_bytes()
        assert a["tensor_types"] == b["tensor_types"]
