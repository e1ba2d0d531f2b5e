"""Tests that need a CUDA GPU (skipped elsewhere; run on the device with `pytest -m gpu tests/test_gpu.py`)."""

import numpy as np
import pytest
import torch

from vramfit import gguf_io, gguf_torch, models
from vramfit.recipe import Recipe
from vramfit.run import Runner, request_for

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("qtype", ["q8_0", "q4_1", "q4_0", "q5_1", "q5_0", "q4_k", "q2_k"])
def test_cuda_gguf_quantizers_match_numpy_bytes(qtype):
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(512, 3072, generator=g) * torch.rand(512, 1, generator=g) * 0.1).to(torch.bfloat16)
    got = gguf_torch.quantize(t.cuda(), qtype, device="cuda")
    want = gguf_io.quantize_array(t.float().numpy(), qtype, backend="numpy")
    assert np.array_equal(got, want)


@pytest.mark.parametrize("recipe", ["offload=model", "offload=sequential", "offload=group-block",
                                    "offload=group-leaf", "offload=staged"])
def test_offload_strategies_bit_identical_on_gpu(recipe):
    spec = models.get_model("flux-tiny")
    w = models.resolve_weights(spec, "random")
    req = request_for(spec, "a fox", steps=2)
    dev = torch.device("cuda")
    ref = Runner(spec, w, Recipe(), dev, progress=False).generate(req)
    got = Runner(spec, w, Recipe.parse(recipe), dev, progress=False).generate(req)
    assert torch.equal(ref.latents, got.latents)
    assert np.array_equal(np.asarray(ref.image), np.asarray(got.image))
