"""Runtime options (vramfit/runtime.py) on flux-tiny, CPU: each one is verified by a check that fails when the
applying call did nothing (the call monkeypatched to a no-op -> NotApplied), the speed keys parse, print, land in
the manifest where they run on CPU and are refused with a reason and an alternative where they cannot.
"""

from __future__ import annotations

import pytest
import torch

from vramfit import models, run, runtime
from vramfit.errors import RecipeError
from vramfit.recipe import Recipe

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    spec = models.get_model("flux-tiny")
    return spec, models.resolve_weights(spec, "random", seed=0)


def generate(tiny, recipe: str, steps: int = 2, size: int = 64):
    spec, weights = tiny
    runner = run.Runner(spec, weights, Recipe.parse(recipe), CPU, progress=False)
    res = runner.generate(run.request_for(spec, "a fox", steps, size, size, None, 0))
    return runner, res


def steps_of(res, name):
    return [s for s in res.record["manifest"] if s["step"] == name]


# ----------------------------------------------------------------------------------------------------------
# checks that can fail (#13.6)


def test_vae_decode_mode_is_checked(tiny, monkeypatch):
    _, res = generate(tiny, "vae=tiling")
    (entry,) = steps_of(res, "vae")
    assert entry["verified"] is True and entry["mode"] == "tiling"
    from diffusers import AutoencoderKL

    monkeypatch.setattr(AutoencoderKL, "enable_tiling", lambda self, *a, **k: None)
    with pytest.raises(runtime.NotApplied, match="vae.use_tiling is False"):
        generate(tiny, "vae=tiling")


def test_attention_backend_is_checked(tiny, monkeypatch):
    _, res = generate(tiny, "attention=_native_math")
    (entry,) = steps_of(res, "attention")
    assert entry["verified"] and entry["processors"] > 0
    assert set(runtime.attention_backends(res_transformer(tiny, "attention=_native_math")).values()) == {"_native_math"}
    from diffusers.models.modeling_utils import ModelMixin

    monkeypatch.setattr(ModelMixin, "set_attention_backend", lambda self, backend: None)
    with pytest.raises(runtime.NotApplied, match="attention processors use another backend"):
        generate(tiny, "attention=_native_math")


def res_transformer(tiny, recipe):
    spec, weights = tiny
    runner = run.Runner(spec, weights, Recipe.parse(recipe), CPU, progress=False)
    runner.load()
    return runner.pipe.transformer


def test_compile_not_installed_is_caught(tiny, monkeypatch):
    from diffusers.models.modeling_utils import ModelMixin

    monkeypatch.setattr(ModelMixin, "compile_repeated_blocks", lambda self, *a, **k: None)
    with pytest.raises(runtime.NotApplied, match="0 of .* modules to compile carry a compiled call"):
        generate(tiny, "compile=regional")


def test_compile_bypassed_is_caught_after_the_first_run(tiny, monkeypatch):
    """The wrappers are there but call the eager forward (dynamo never runs): only the after-run check sees it."""
    from diffusers.models.modeling_utils import ModelMixin

    def fake(self, *args, **kwargs):
        for m in self.modules():
            if type(m).__name__ in self._repeated_blocks:
                m._compiled_call_impl = m._call_impl
    monkeypatch.setattr(ModelMixin, "compile_repeated_blocks", fake)
    with pytest.raises(runtime.NotApplied, match="dynamo compiled no graph"):
        generate(tiny, "compile=regional")
