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


def test_tiling_really_splits_an_image_of_the_vaes_native_size(tiny, monkeypatch):
    # diffusers' default tile is the VAE's native size (FLUX: 1024 px), so enable_tiling() alone never splits a
    # 1024x1024 image: the decode kept its full ~2.5 GB of activations (the H200's 3 GB stream run ran out there)
    from diffusers import AutoencoderKL

    native = models.get_model("flux-tiny").config("vae")["sample_size"]  # 128
    calls = []
    real = AutoencoderKL.tiled_decode
    monkeypatch.setattr(AutoencoderKL, "tiled_decode", lambda self, z, *a, **k: calls.append(z.shape) or real(
        self, z, *a, **k))
    _, plain = generate(tiny, "vae_decode=none", size=native)
    assert not calls
    _, res = generate(tiny, "vae_decode=tiling", size=native)
    assert calls, "a native-size image was decoded in one piece"
    (entry,) = steps_of(res, "vae")
    assert entry["tile_px"] == native // 2 and entry["native_px"] == native
    # tiles blend at their seams, so the pixels change (how much depends on the weights: random here)
    import numpy as np

    a, b = (np.asarray(r.image) for r in (plain, res))
    assert a.shape == b.shape and not np.array_equal(a, b)


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


# ----------------------------------------------------------------------------------------------------------
# the speed keys (#12): parse, print, refuse where they cannot run, land in the manifest where they run


NEW_KEYS = ["compile=regional+graphs", "compile=full+autotune+graphs", "compile=full+autotune", "compile_vae=on",
            "fuse_qkv=on", "cache=fbc:0.08", "cache=taylorseer:3", "cache=magcache:0.06", "host_sync=avoid",
            "transformer=torchao-fp8dq-tensor", "compile=regional+cdtune", "compile=full+nocdtune",
            "compile=full+autotune+graphs+atengemm"]


@pytest.mark.parametrize("item", NEW_KEYS)
def test_new_keys_parse_and_print(item):
    r = Recipe.parse(item)
    assert item in str(r) and Recipe.parse(str(r)) == r


@pytest.mark.parametrize("recipe, reason", [
    ("compile=regional+graphs", "CUDA graphs, which need a CUDA GPU"),
    ("compile=full+autotune", "max-autotune"),
    ("compile=full+autotune+graphs", "CUDA GPU"),
    ("transformer=torchao-fp8dq-tensor", "needs CUDA"),
    ("compile_vae=on", "compile_vae=on compiles the VAE decoder"),
    ("cache=fbc:0.08,compile=full", "graph break"),
])
def test_refused_on_cpu_with_reason_and_alternative(recipe, reason):
    from vramfit import apply

    with pytest.raises(RecipeError, match="Alternative") as e:
        apply.check(Recipe.parse(recipe), CPU)
    assert reason in str(e.value)


@pytest.mark.parametrize("recipe, reason", [
    ("compile=regional+graphs,offload=model", "a graph replays fixed device addresses"),
    ("compile=full+graphs,cache=fbc:0.1", "graph break"),
    ("compile=regional+graphs,cache=taylorseer:4", "CUDA graphs cannot capture"),
    ("cache=taylorseer:3,offload=sequential", "both wrap the same blocks"),
])
def test_refused_on_cuda_rules(recipe, reason):
    found = [r for r, _ in runtime.problems(Recipe.parse(recipe), "cuda")]
    assert any(reason in r for r in found), found


def test_fuse_qkv_lands_in_manifest_and_keeps_the_output(tiny):
    _, plain = generate(tiny, "bf16")
    runner, fused = generate(tiny, "fuse_qkv=on")
    (entry,) = steps_of(fused, "fuse_qkv")
    tr = runner.pipe.transformer
    assert entry["verified"] and entry["fused_modules"] == len(tr.transformer_blocks) + len(tr.single_transformer_blocks)
    assert not hasattr(tr.transformer_blocks[0].attn, "to_q")  # unfused copies dropped: weights held once
    rel = ((fused.latents - plain.latents).norm() / plain.latents.norm()).item()
    assert rel < 1e-2, rel  # the same matmuls, concatenated (bf16 rounding differs slightly)


def test_fuse_qkv_before_quantizing(tiny):
    runner, res = generate(tiny, "fuse_qkv=on,transformer=quanto-int8")
    names = [s["step"] for s in res.record["manifest"] if s.get("component", "transformer") == "transformer"]
    assert names.index("fuse_qkv") < names.index("quantize")
    assert type(runner.pipe.transformer.transformer_blocks[0].attn.to_qkv).__name__ == "QLinear"


def test_fuse_qkv_refused_on_a_checkpoint_quantized_while_loading():
    with pytest.raises(RecipeError, match="fuse_qkv=on.*quantized while it loads.*Alternative"):
        runtime.check_load(Recipe.parse("fuse_qkv=on,transformer=quanto-int8"), "dir", False, True)
    with pytest.raises(RecipeError, match="pre-quantized"):
        runtime.check_load(Recipe.parse("fuse_qkv=on"), "dir", True, False)
    runtime.check_load(Recipe.parse("fuse_qkv=on"), "dir", False, False)  # bf16 checkpoint: fused after loading


@pytest.mark.parametrize("cache, kind", [("taylorseer:2", "taylorseer"), ("fbc:0.5", "fbc"),
                                         ("magcache:0.5", "magcache")])
def test_cache_lands_in_manifest_and_skips_steps(tiny, cache, kind):
    _, plain = generate(tiny, "bf16", steps=8)
    _, res = generate(tiny, f"cache={cache}", steps=8)
    (entry,) = steps_of(res, "cache")
    assert entry["kind"] == kind and entry["verified"] and entry["hooked_modules"] > 0
    assert entry["steps"] == 8 and entry["steps_computed"] + entry["steps_skipped"] == 8
    if kind == "taylorseer":  # fixed schedule: 3 warm-up steps computed, then every 2nd
        assert 0 < entry["steps_skipped"] < 8 and entry["schedule"] == "fixed interval"
    if entry["steps_skipped"]:
        assert not torch.equal(res.latents, plain.latents)


def test_cache_with_regional_compile_hooks_around_the_compiled_blocks(tiny):
    """cache= with compile=regional: each block's forward compiled first, the cache hooks around it in Python. The
    schedule is the eager one's, the compiled blocks ran (graphs made), and the latents match the eager cached run."""
    assert not [r for r, _ in runtime.problems(Recipe.parse("cache=taylorseer:2,compile=regional"), "cuda")]
    _, eager = generate(tiny, "cache=taylorseer:2", steps=8)
    runner, res = generate(tiny, "cache=taylorseer:2,compile=regional", steps=8)
    (comp,) = steps_of(res, "compile")
    (cache,) = steps_of(res, "cache")
    (ecache,) = steps_of(eager, "cache")
    assert comp["verified"] is True and comp["graphs_compiled"] > 0 and "around" in comp
    # one graph per block class plus a recompile on a stride, as compile_repeated_blocks makes (3 in a fresh process,
    # 4 seen in the full suite); the step counter sits outside the graphs: traced inside them, dynamo guarded on its
    # count and recompiled the block at every computed step (7 graphs at these 8 steps, 5 of them computed)
    assert comp["graphs_compiled"] < 5, comp
    assert comp["compiled_modules"] == len(runner.pipe.transformer.transformer_blocks) + len(
        runner.pipe.transformer.single_transformer_blocks)
    assert cache["steps_skipped"] == ecache["steps_skipped"] > 0
    names = [s["step"] for s in res.record["manifest"]]
    assert names.index("compile") > names.index("cache")  # recorded after, applied before the hooks
    block = runner.pipe.transformer.transformer_blocks[0]
    assert block._diffusers_hook.get_hook("taylorseer_cache") is not None
    rel = ((res.latents - eager.latents).norm() / eager.latents.norm()).item()
    assert rel < 2e-2, rel  # compiled kernels round differently; the skipped steps are the same ones


def test_torchao_inductor_flags_are_vramfits_recorded_settings(tiny, monkeypatch):
    """torchao's configs turn on coordinate-descent tuning process-wide by default, unrecorded (237 of 258 s of the
    fp8dq compile on the H200). vramfit passes set_inductor_config=False and applies the flags itself as journaled,
    recorded settings, only with +cdtune (for any recipe): by default not even for torchao recipes, whose first
    compile they made 185 s longer for a 1 % faster step on the H200."""
    import torch._inductor.config as ic

    from vramfit import apply, quant
    from vramfit.runtime import TORCHAO_INDUCTOR

    assert quant._torchao_config("torchao-fp8dq").set_inductor_config is False
    monkeypatch.setattr(ic, "coordinate_descent_tuning", False)
    _, res = generate(tiny, "transformer=torchao-int8wo")
    assert ic.coordinate_descent_tuning is False  # quantizing did not change it
    (q,) = [s for s in steps_of(res, "quantize") if s.get("component") == "transformer"]
    assert "set_inductor_config=False" in q["api"]
    key = "torch._inductor.config.coordinate_descent_tuning"

    assert key not in apply._dynamo_for(Recipe.parse("transformer=torchao-fp8dq,compile=regional"), None)
    assert key in apply._dynamo_for(Recipe.parse("transformer=torchao-fp8dq,compile=regional+cdtune"), None)
    assert key not in apply._dynamo_for(Recipe.parse("transformer=torchao-fp8dq,compile=regional+nocdtune"), None)
    assert key not in apply._dynamo_for(Recipe.parse("transformer=torchao-fp8dq"), None)  # no compile: nothing
    assert key not in apply._dynamo_for(Recipe.parse("compile=regional"), None)
    assert set(TORCHAO_INDUCTOR) <= set(apply._dynamo_for(Recipe.parse("compile=regional+cdtune"), None))
    with pytest.raises(RecipeError, match="on and off"):
        Recipe.parse("compile=regional+cdtune+nocdtune")

    mark = apply.dynamo_mark()
    try:  # applied and recorded when the runner loads (no generation: the flags are what is checked here)
        spec, weights = tiny
        runner = run.Runner(spec, weights, Recipe.parse("compile=regional+cdtune"), CPU, progress=False)
        runner.load()
        (d,) = runner.manifest.find("dynamo-config")
        assert d["settings"][key] is True and ic.coordinate_descent_tuning is True
        runner.close()
    finally:
        apply.restore_dynamo_settings(mark)  # process-wide: later tests compile without it
    assert ic.coordinate_descent_tuning is False


def test_atengemm_limits_the_gemm_search_to_aten_and_needs_autotune():
    """+atengemm: max-autotune with its GEMM search limited to ATen (the flux-fast-style anchor within one device
    command), a recorded setting; without +autotune it is refused with the alternative."""
    from vramfit import apply

    key = "torch._inductor.config.max_autotune_gemm_backends"
    anchor = apply._dynamo_for(Recipe.parse("transformer=torchao-fp8dq,compile=full+autotune+graphs+atengemm"), None)
    assert anchor[key] == "ATEN" and anchor["torch._inductor.config.coordinate_descent_tuning"] is True
    assert key not in apply._dynamo_for(Recipe.parse("transformer=torchao-fp8dq,compile=full+autotune+graphs"), None)
    with pytest.raises(RecipeError, match="needs \\+autotune.*compile=full\\+autotune\\+atengemm"):
        Recipe.parse("compile=full+atengemm")


def test_compile_cache_key_is_shared_with_and_without_a_step_cache():
    from vramfit import compile_cache

    a = compile_cache.key_recipe(Recipe.parse("transformer=torchao-fp8dq,compile=regional,cache=taylorseer:4"))
    b = compile_cache.key_recipe(Recipe.parse("transformer=torchao-fp8dq,compile=regional"))
    c = compile_cache.key_recipe(Recipe.parse("transformer=torchao-fp8dq,compile=full"))
    assert a == b != c and "cache" not in a


def test_host_sync_avoid_lands_in_manifest_and_changes_nothing(tiny, monkeypatch):
    _, plain = generate(tiny, "bf16")
    runner, res = generate(tiny, "host_sync=avoid")
    (entry,) = steps_of(res, "host-sync")
    assert entry["verified"] is True and runner.pipe.scheduler.begin_index == 0
    # diffusers 0.42's FluxPipeline already starts the scheduler at index 0 (diffusers #11696): recorded as such
    assert entry["already_in_pipeline"] is True
    assert torch.equal(res.latents, plain.latents)  # index 0 is where the search would have started
    from diffusers import FlowMatchEulerDiscreteScheduler

    monkeypatch.setattr(FlowMatchEulerDiscreteScheduler, "set_begin_index", lambda self, i=0: None)
    with pytest.raises(runtime.NotApplied, match="begin_index is None"):
        generate(tiny, "host_sync=avoid")


def test_begin_at_zero_for_pipelines_that_do_not(tiny):
    """The fallback for a pipeline without its own set_begin_index(0): a subclass that sets it after set_timesteps."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = runtime.begin_at_zero(FlowMatchEulerDiscreteScheduler())
    s.set_timesteps(4, mu=1.0)
    assert s.begin_index == 0 and isinstance(s, FlowMatchEulerDiscreteScheduler)
    plain = FlowMatchEulerDiscreteScheduler()
    plain.set_timesteps(4, mu=1.0)
    assert plain.begin_index is None


# ----------------------------------------------------------------------------------------------------------
# compile cache


class _FakeRunner:
    def __init__(self, recipe="compile=regional", dynamo=None):
        self.device, self.recipe = CPU, Recipe.parse(recipe)
        self.spec = models.get_model("flux-tiny")
        self.dynamo = dynamo or {}


def test_cache_key_and_dir(tmp_path, monkeypatch):
    from vramfit import compile_cache

    monkeypatch.setenv("VRAMFIT_CACHE_DIR", str(tmp_path / "c"))
    assert compile_cache.cache_root() == tmp_path / "c"
    base = compile_cache.key_parts(CPU, "flux-tiny", "compile=regional", 64, 64, 1, 64)
    assert {"device", "libraries", "model", "recipe", "shape"} <= set(base)
    assert {"torch", "diffusers", "triton"} <= set(base["libraries"])
    keys = {compile_cache.key_of(base),
            compile_cache.key_of(compile_cache.key_parts(CPU, "flux-tiny", "compile=full", 64, 64, 1, 64)),
            compile_cache.key_of(compile_cache.key_parts(CPU, "flux-tiny", "compile=regional", 64, 128, 1, 64))}
    assert len(keys) == 3  # recipe and shape are part of the key
    assert compile_cache.for_runner(_FakeRunner("bf16")) is None  # nothing compiled: no cache entry
    monkeypatch.delenv("VRAMFIT_CACHE_DIR")
    assert str(compile_cache.cache_root()).endswith("vramfit/compile")


def test_cache_unusable_when_inductor_caches_are_off(tmp_path, monkeypatch):
    from vramfit import apply, compile_cache, quant

    monkeypatch.setenv("VRAMFIT_CACHE_DIR", str(tmp_path))
    cache = compile_cache.CompileCache(_FakeRunner(dynamo=dict(quant.WOQ_INT8_REWRITE_OFF)))
    req = run.request_for(models.get_model("flux-tiny"), "a fox", 2, 64, 64, None, 0)
    entry = cache.before(req, apply.Manifest())
    assert entry["status"] == "unusable" and "force_disable_caches" in entry["reason"]
    assert cache.after(req, apply.Manifest()) is entry and not entry.get("saved")  # nothing written
    assert not list(tmp_path.iterdir())


def test_warmup_refuses_a_recipe_without_compile(tmp_path):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "vramfit", "warmup", "flux-tiny", "--recipe", "bf16", "--device", "cpu"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "compiles nothing" in p.stderr and "Alternative" in p.stderr


@pytest.mark.slow
def test_warmup_writes_a_cache_a_second_process_hits(tmp_path):
    """Both processes start with empty inductor/Triton caches of their own: the second one's compiled code can only
    come from the artifacts the first one saved (~4-5 min each on 2 shared CPU cores: CPU inductor builds C++)."""
    import json
    import os
    import subprocess
    import sys

    def warmup(scratch):
        env = {**os.environ, "VRAMFIT_CACHE_DIR": str(tmp_path / "vc"),
               "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / scratch / "inductor"),
               "TRITON_CACHE_DIR": str(tmp_path / scratch / "triton")}
        p = subprocess.run([sys.executable, "-m", "vramfit", "warmup", "flux-tiny", "--recipe", "compile=regional",
                            "--height", "64", "--width", "64", "--steps", "2", "--device", "cpu"],
                           capture_output=True, text=True, timeout=1200, env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads(p.stdout.strip().splitlines()[-1])

    first = warmup("s1")
    assert (first["status"], first["saved"]) == ("miss", True) and first["bytes"] > 0
    assert (tmp_path / "vc" / first["key"] / "artifacts.bin").stat().st_size == first["bytes"]
    assert first["inductor_cache"]["fxgraph_cache_hit"] == 0
    second = warmup("s2")
    assert second["key"] == first["key"] and second["status"] == "hit" and second["saved"] is False
    assert second["inductor_cache"]["fxgraph_cache_hit"] > 0 and second["inductor_cache"]["fxgraph_cache_miss"] == 0


def test_an_attention_backend_does_not_leak_into_later_runs(tiny):
    # diffusers' set_attention_backend also sets the process-wide default backend: a later attention=native run
    # in the same process computed with it (found: in-process images differed from a fresh process's)
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry._active_backend
    _, ref = generate(tiny, "bf16")
    runner, _ = generate(tiny, "attention=_native_math")
    assert set(runtime.attention_backends(runner.pipe.transformer).values()) == {"_native_math"}
    assert _AttentionBackendRegistry._active_backend == before
    _, after = generate(tiny, "bf16")
    assert torch.equal(ref.latents, after.latents)


def test_attention_support_names_what_runs_and_why_not(monkeypatch):
    """`vramfit recipes` lists each diffusers attention backend with the refusal `check` would give. On CUDA the
    libraries decide (diffusers' own requirement check: flash-attn and sageattention>=2.1.1 are not installed here;
    the SDPA backends need nothing); on CPU only the CPU kernels run."""
    from vramfit import apply

    cpu = {r["backend"]: r for r in apply.attention_support("cpu")}
    assert {b for b, r in cpu.items() if r["ok"]} == {"native", "_native_math", "flex"}
    assert "needs a CUDA GPU" in cpu["_native_cudnn"]["reason"]
    assert "Alternative: attention=native" in cpu["sage"]["reason"]
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    cuda = {r["backend"]: r for r in apply.attention_support("cuda")}
    assert all(cuda[b]["ok"] for b in ("native", "_native_cudnn", "_native_flash", "_native_efficient", "flex"))
    assert not cuda["flash"]["ok"] and "flash-attn>=" in cuda["flash"]["reason"]
    assert not cuda["sage"]["ok"] and "sageattention>=2.1.1" in cuda["sage"]["reason"]
    assert not cuda["flash_hub"]["ok"] and "HF_HUB_OFFLINE" in cuda["flash_hub"]["reason"]
    assert len(cuda) == len(cpu) == len(__import__("vramfit.recipe").recipe.attention_backends())


def test_attention_refusal_on_cuda_is_a_recipe_error():
    """A backend whose library is missing is refused before any heavy work, with diffusers' reason (it used to reach
    diffusers' message as an AttributeError: the requirement check takes the enum, not the string)."""
    from vramfit import apply

    with pytest.raises(RecipeError, match=r"attention=flash cannot run here: .*flash-attn.*Alternative: attention=nat"):
        apply.check(Recipe.parse("attention=flash"), torch.device("cuda"))
    apply.check(Recipe.parse("attention=_native_cudnn"), torch.device("cuda"))  # nothing missing: no refusal


def test_recipes_json_lists_attention_backends(capsys):
    import json

    from vramfit import cli

    assert cli.main(["recipes", "--json"]) == 0
    att = json.loads(capsys.readouterr().out)["attention"]
    assert att["device"] == "cpu"
    assert {b["backend"] for b in att["backends"] if b["ok"]} == {"native", "_native_math", "flex"}
