"""Runtime options of a loaded pipeline, each applied, recorded in the manifest and verified by a check that fails
when the option did not take: VAE decode mode, fused QKV projections, attention backend, step cache, compile
(regional/full, CUDA graphs, max-autotune, the VAE decoder), host-sync removal.

Two checks per option where one is not enough: right after applying (the attribute, processor, hook or compiled
wrapper is there) and after the first generation (``verify_after_run``: dynamo really produced graphs, CUDA graphs
were not skipped, the scheduler started at index 0, the cache skipped work). A failed check raises ``NotApplied``:
a run that asked for an optimization and did not get it must not print timings as if it had.
"""

from __future__ import annotations

import torch

from .errors import RecipeError

ACCELERATOR_OFFLOADS = ("model", "sequential", "group-block", "group-leaf")
GRAPH_BREAKING_CACHES = ("fbc", "magcache", "taylorseer")

# flux-fast's inductor flags (utils/pipeline_utils.py), applied with compile=full+autotune: 1x1 convolutions as
# matmuls, no epilogue fusion, coordinate-descent tuning in every direction
FLUX_FAST_INDUCTOR = {
    "torch._inductor.config.conv_1x1_as_mm": True,
    "torch._inductor.config.epilogue_fusion": False,
    "torch._inductor.config.coordinate_descent_tuning": True,
    "torch._inductor.config.coordinate_descent_check_all_directions": True,
}


# torchao's recommended_inductor_config_setter() (torchao/quantization/utils.py): coordinate-descent tuning of every
# Triton kernel at its first compile (237 s of fp8dq + regional's 258 s on the H200), and its other flags. Applied
# with compile=...+cdtune only (for any recipe). Not by default, torchao recipes included: on the H200 they cost
# 185 s more compile for a 1 % faster step (fp8dq + fused QKV + regional: 199.8 s / 0.1037 s/step with them in
# session 9, 14.6 s / 0.1048 without them in session 10)
TORCHAO_INDUCTOR = {
    "torch._inductor.config.coordinate_descent_tuning": True,
    "torch._inductor.config.coordinate_descent_check_all_directions": True,
    "torch._inductor.config.force_fuse_int_mm_with_mul": True,
    "torch._inductor.config.fx_graph_cache": True,
    "torch._inductor.config.triton.unique_kernel_names": True,
}


class NotApplied(RuntimeError):
    """A requested runtime option is not in effect (its check failed)."""


# ----------------------------------------------------------------------------------------------------------
# the recipe's runtime fields (one place that reads them)


def vae_decode(recipe) -> str:
    return recipe.vae_decode


def compile_scope(recipe) -> str:
    return recipe.compile_scope


def compile_graphs(recipe) -> bool:
    return recipe.compile_graphs


def compile_autotune(recipe) -> bool:
    return recipe.compile_autotune


def compile_mode(recipe) -> str | None:
    """torch.compile's mode: inductor's max-autotune includes CUDA graphs; without +graphs its no-cudagraphs twin."""
    graphs, autotune = compile_graphs(recipe), compile_autotune(recipe)
    if autotune:
        return "max-autotune" if graphs else "max-autotune-no-cudagraphs"
    return "reduce-overhead" if graphs else None


def cache_spec(recipe) -> tuple[str, str | None]:
    kind, _, arg = recipe.cache.partition(":")
    return kind, (arg or None)


def offload_kind(recipe) -> str:
    return recipe.offload_kind


def on(recipe, key: str, default: str) -> bool:
    """compile_vae / fuse_qkv = on, host_sync = avoid."""
    return getattr(recipe, key) in ("on", "avoid")


# ----------------------------------------------------------------------------------------------------------
# refusals (before any heavy work)


def problems(recipe, device_type: str):
    """Yield (reason, alternative) for each runtime option of ``recipe`` that cannot run on ``device_type``."""
    scope, graphs, autotune = compile_scope(recipe), compile_graphs(recipe), compile_autotune(recipe)
    kind, _ = cache_spec(recipe)
    offload = offload_kind(recipe)
    if (graphs or autotune) and scope == "off":
        yield "+graphs/+autotune modify a compile and compile=off", f"compile=regional{'+graphs' if graphs else ''}"
    if graphs and device_type != "cuda":
        yield ("compile +graphs records CUDA graphs, which need a CUDA GPU (this device: " + device_type + ")",
               f"compile={scope} without +graphs")
    if graphs and (offload in ACCELERATOR_OFFLOADS or offload == "stream"):
        yield (f"CUDA graphs with offload={recipe.offload}: a graph replays fixed device addresses, and offload "
               "moves weights in and out of the GPU on every call (inductor skips graphs over such inputs)"), \
            f"offload=none with +graphs, or offload={recipe.offload} with compile={scope} (no +graphs)"
    if autotune and device_type != "cuda":
        yield ("compile +autotune (max-autotune) benchmarks Triton GPU kernels; there is no GPU here",
               f"compile={scope} without +autotune")
    if kind != "none" and (scope == "full" or graphs):
        # with compile=regional the blocks' own forward is compiled and the cache hooks wrap it in Python
        # (compile_block_forwards); a whole-model graph or a CUDA graph would have to capture the hooks' decisions
        yield (f"cache={recipe.cache} with compile={recipe.compile}: the cache hooks decide per step in Python "
               "whether the blocks run (state kept between calls), a graph break that fullgraph compile refuses, "
               "and CUDA graphs cannot capture"), \
            f"cache={recipe.cache} with compile=regional (the blocks compiled, the hooks around them), or " \
            f"compile={recipe.compile} with cache=none"
    if kind != "none" and offload in ("sequential", "group-leaf"):
        yield (f"cache={recipe.cache} with offload={recipe.offload}: the cache hooks and the per-leaf offload hooks "
               "both wrap the same blocks' forward"), f"cache={recipe.cache} with offload=model or offload=none"
    if on(recipe, "compile_vae", "off") and device_type != "cuda":
        yield ("compile_vae=on compiles the VAE decoder's convolutions with inductor; on CPU that compile takes "
               "minutes for a decode that takes a second"), "compile_vae=off"
    if on(recipe, "fuse_qkv", "off") and recipe.transformer.startswith("gguf-"):
        yield (f"fuse_qkv=on with transformer={recipe.transformer}: diffusers' fuse_projections concatenates "
               "to_q/to_k/to_v .weight.data into a new nn.Linear, and GGUF weights stay packed bytes"), \
            "fuse_qkv=off, or transformer=bf16/torchao-fp8dq with fuse_qkv=on"


def check_load(recipe, weights_kind: str, prequantized: bool, quantize_on_load: bool) -> None:
    """fuse_qkv on a quantized transformer is fused *before* quantizing (flux-fast's order); a checkpoint that
    arrives quantized (pre-quantized, or quantized while loading) has no bf16 q/k/v left to fuse."""
    if not on(recipe, "fuse_qkv", "off"):
        return
    if prequantized or quantize_on_load:
        how = "is pre-quantized" if prequantized else f"is quantized while it loads ({recipe.transformer})"
        raise RecipeError(
            f"fuse_qkv=on: the transformer {how}, so its q/k/v weights are packed before they could be fused "
            "(diffusers' fuse_projections concatenates .weight.data into a new bf16 nn.Linear). Alternative: "
            "--weights random or a bf16 checkpoint (fused, then quantized), or fuse_qkv=off")


# ----------------------------------------------------------------------------------------------------------
# applying


def fuse_qkv_in(root) -> tuple[int, int, int]:
    """diffusers' own per-module fusion (``AttentionModuleMixin.fuse_projections``, what ``fuse_qkv_projections``
    calls on every attention module) for the attention modules under ``root`` (the transformer, or one of its blocks
    while a stand-in is built block by block); the unfused q/k/v layers are then dropped (diffusers keeps both, which
    would add ~4.3 GB of bf16 weights to FLUX.1-dev), so the weights are fused exactly once. Returns (attention
    modules, fused, layers dropped)."""
    from diffusers.models.attention import AttentionModuleMixin
    from transformers.initialization import no_init_weights

    attn = [m for m in root.modules() if isinstance(m, AttentionModuleMixin) and m._supports_qkv_fusion]
    # diffusers makes each fused layer as a new nn.Linear, whose random init it then overwrites with the concatenated
    # weights: on the host that init was 12 of the 31 s the fp8dq + fused QKV stand-in took to load on the H200
    # (session 10; 0.18 s per 3072x9216 layer here), so it is skipped (transformers' no_init_weights)
    with no_init_weights():
        for m in attn:
            m.fuse_projections()
    fused = [m for m in attn if getattr(m, "fused_projections", False) and hasattr(m, "to_qkv")]
    dropped = 0
    for m in fused:
        names = ["to_q", "to_k", "to_v"] + (["add_q_proj", "add_k_proj", "add_v_proj"]
                                           if hasattr(m, "to_added_qkv") else [])
        for name in names:
            if isinstance(getattr(m, name, None), torch.nn.Module):
                delattr(m, name)
                dropped += 1
    return len(attn), len(fused), dropped


def check_fusable(transformer) -> None:
    """``fuse_qkv_projections``'s own refusal (added-KV processors), before any fusing."""
    for _, proc in transformer.attn_processors.items():
        if "Added" in type(proc).__name__:
            raise RecipeError("fuse_qkv=on: diffusers does not fuse models having added KV projections. "
                              "Alternative: fuse_qkv=off")


def fuse_qkv_entry(manifest, attn: int, fused: int, dropped: int, api: str) -> None:
    if not attn or fused != attn:
        raise NotApplied(f"fuse_qkv=on: {fused} of {attn} attention modules report fused projections")
    manifest.add("fuse_qkv", api=api, fused_modules=fused, dropped_unfused_layers=dropped, verified=True)


def fuse_qkv(transformer, manifest) -> None:
    """fuse_qkv=on on a whole transformer (``fuse_qkv_in``), recorded in the manifest."""
    check_fusable(transformer)
    fuse_qkv_entry(manifest, *fuse_qkv_in(transformer),
                   api="attn.fuse_projections() on every attention module (what transformer.fuse_qkv_projections() "
                       "calls), the unfused q/k/v layers dropped")


def vae_tile_px(native: int) -> int:
    """The tile vae_decode=tiling decodes with: half the VAE's native size. diffusers' default tile is the native
    size (1024 px for FLUX), so an image of that size or smaller is never split and `enable_tiling()` alone saves
    nothing at 1024x1024 (the decode still needs ~2.5 GB of activations: the 3 GB stream run of 2026-12-01 ran out
    of memory there)."""
    return max(native // 2, 8)


def vae_tiles(config) -> dict:
    """The tiles of a tiled decode (and encode) for a VAE config (the model's dict or ``vae.config``): ``vae_tile_px``
    of its native size, the latent tile following the VAE's downscale."""
    native = int(config["sample_size"])
    tile = vae_tile_px(native)
    return {"tile_px": tile, "tile_latent": tile // 2 ** (len(config["block_out_channels"]) - 1), "native_px": native}


def set_vae_tiles(vae) -> dict:
    t = vae_tiles(vae.config)
    vae.tile_sample_min_size, vae.tile_latent_min_size = t["tile_px"], t["tile_latent"]
    return t


def apply(pipe, recipe, manifest, loaded: dict) -> None:
    """Apply the runtime options to whichever components are loaded (staged runs: one stage's)."""
    vae = loaded.get("vae")
    mode = vae_decode(recipe)
    if vae is not None and mode != "none":
        getattr(vae, f"enable_{mode}")()
        attr = "use_tiling" if mode == "tiling" else "use_slicing"
        if not getattr(vae, attr, False):
            raise NotApplied(f"vae_decode={mode}: vae.enable_{mode}() ran but vae.{attr} is {getattr(vae, attr, None)}")
        extra = {}
        if mode == "tiling":
            extra = set_vae_tiles(vae)
        manifest.add("vae", mode=mode, api=f"vae.enable_{mode}()" + (
            f"; vae.tile_sample_min_size = {extra['tile_px']}; vae.tile_latent_min_size = {extra['tile_latent']}"
            if extra else ""), check=f"vae.{attr} is True", verified=True, **extra)
    if vae is not None and on(recipe, "compile_vae", "off"):
        vae.decoder.compile(fullgraph=True)  # in place: decode() calls the decoder module, wrapped or not
        if getattr(vae.decoder, "_compiled_call_impl", None) is None:
            raise NotApplied("compile_vae=on: vae.decoder.compile() left no compiled call")
        manifest.add("compile-vae", api="vae.decoder.compile(fullgraph=True)", verified=True)
    if recipe.host_sync == "avoid" and not manifest.find("host-sync"):
        if pipeline_sets_begin_index(pipe):
            # diffusers >= 0.35 FluxPipeline.__call__ already calls scheduler.set_begin_index(0) (diffusers #11696)
            manifest.add("host-sync", mode="avoid", api="FluxPipeline.__call__ calls scheduler.set_begin_index(0)",
                         already_in_pipeline=True, verified=None)  # checked after the first run
        else:
            pipe.scheduler = begin_at_zero(pipe.scheduler)
            manifest.add("host-sync", mode="avoid", api="scheduler.set_begin_index(0) after every set_timesteps",
                         scheduler=type(pipe.scheduler).__name__, already_in_pipeline=False, verified=None)
    tr = loaded.get("transformer")
    if tr is None:
        return
    if recipe.attention != "native":
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        before = _AttentionBackendRegistry._active_backend
        tr.set_attention_backend(recipe.attention)
        # diffusers 0.42 also makes the backend the process-wide default for every model built later (its
        # processors set to None follow it): a later run in this process with attention=native -- a test, a bench
        # scenario, another stage -- then computed with this backend. This model's processors hold the backend
        # explicitly, so the default goes back.
        _AttentionBackendRegistry.set_active_backend(before)
        got = attention_backends(tr)
        wrong = {k: v for k, v in got.items() if v != recipe.attention}
        if not got or wrong:
            raise NotApplied(f"attention={recipe.attention}: {len(wrong)} of {len(got)} attention processors use "
                             f"another backend ({sorted(set(wrong.values()))})")
        manifest.add("attention", backend=recipe.attention, api=f"transformer.set_attention_backend({recipe.attention!r})",
                     processors=len(got), check="every attention processor's _attention_backend", verified=True)
    kind, arg = cache_spec(recipe)
    scope = compile_scope(recipe)
    mode = compile_mode(recipe)
    kwargs = {"fullgraph": True, **({"mode": mode} if mode else {})}
    hooked_compile = None
    if kind != "none" and scope == "regional":
        # before the cache: its hooks then wrap the compiled forward, and their per-step decision stays in Python
        hooked_compile = compile_block_forwards(tr, kwargs)
    if kind != "none":
        cfg, info = cache_config(kind, arg)
        tr.enable_cache(cfg)
        hooks = cache_hooks(tr)
        if not tr.is_cache_enabled or not hooks:
            raise NotApplied(f"cache={recipe.cache}: transformer.enable_cache() registered no cache hooks")
        manifest.add("cache", kind=kind, api=f"transformer.enable_cache({type(cfg).__name__}(...))", **info,
                     hooked_modules=len(hooks), verified=True)
        install_block_counter(tr)
    if scope != "off":
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        if hooked_compile is not None:
            blocks, compiled = hooked_compile
            api = f"block.forward = torch.compile(block.forward, {shown}) for each repeated block, before the cache hooks"
        elif scope == "regional":
            # in place (module.compile): assigning a compiled wrapper would break offload hooks (DESIGN pitfalls)
            tr.compile_repeated_blocks(**kwargs)
            if compile_graphs(recipe):
                # each block is its own CUDA-graph tree node; a new transformer call is a new step, so the graphs
                # of the previous step may reuse their output memory (the transformer itself is not compiled here)
                tr.register_forward_pre_hook(lambda *_: torch.compiler.cudagraph_mark_step_begin())
            classes = tuple(getattr(tr, "_repeated_blocks", ()) or ())
            blocks = [m for m in tr.modules() if type(m).__name__ in classes]
            compiled = [m for m in blocks if getattr(m, "_compiled_call_impl", None) is not None]
            api = f"transformer.compile_repeated_blocks({shown})"
        else:
            tr.compile(**kwargs)
            blocks = [tr]
            compiled = [tr] if getattr(tr, "_compiled_call_impl", None) is not None else []
            api = f"transformer.compile({shown})"
        if not blocks or len(compiled) != len(blocks):
            raise NotApplied(f"compile={recipe.compile}: {len(compiled)} of {len(blocks)} modules to compile "
                             "carry a compiled call")
        from torch._dynamo.utils import counters

        manifest.add("compile", mode=scope, torch_mode=mode, graphs=compile_graphs(recipe),
                     autotune=compile_autotune(recipe), api=api, compiled_modules=len(compiled),
                     **({"around": "the cache hooks run eagerly around the compiled blocks"} if hooked_compile else {}),
                     graphs_before=counters["stats"].get("unique_graphs", 0), verified=None,  # after the first run
                     key=[scope, str(mode), sorted({type(m).__name__ for m in compiled}),
                          "forward" if hooked_compile else "call"],
                     # torch.compile's wrappers carry the function they compile; a stand-in wrapper does not
                     dynamo_wrapped=bool(hooked_compile) or all(
                         hasattr(m._compiled_call_impl, "_torchdynamo_orig_callable") for m in compiled))


def compile_block_forwards(transformer, kwargs: dict) -> tuple[list, list]:
    """Regional compile for a recipe with a step cache: each repeated block's own ``forward`` compiled (fullgraph),
    so that the cache hooks registered afterwards wrap the compiled call and decide in Python whether it runs.
    (``compile_repeated_blocks`` compiles the module's ``__call__``, which would trace the hooks.) The blocks share
    their code object, so dynamo compiles one graph per block class as with ``compile_repeated_blocks``."""
    classes = tuple(getattr(transformer, "_repeated_blocks", ()) or ())
    blocks = [m for m in transformer.modules() if type(m).__name__ in classes]
    for m in blocks:
        m.forward = torch.compile(m.forward, **kwargs)
    compiled = [m for m in blocks if hasattr(m.forward, "_torchdynamo_orig_callable")]
    # the computed-step counter (install_block_counter) sits outside the graph here: a hook inside it would be
    # traced, and dynamo would guard on the count and recompile the block at every computed step
    last = transformer.single_transformer_blocks[-1]
    inner = last.forward

    def counted(*args, **kwargs):
        transformer._vramfit_block_runs = getattr(transformer, "_vramfit_block_runs", 0) + 1
        return inner(*args, **kwargs)

    last.forward = counted
    transformer._vramfit_counter_outside = True
    return blocks, compiled


# compile keys whose first run made graphs in this process: dynamo keeps compiled frames per code object, so a later
# pipeline with the same block classes, shapes and guards runs those frames and makes no new graph (seen on the H200:
# a streamed pipeline compiled after a resident one with the same recipe)
_GRAPHS_MADE: set = set()


def attention_backends(transformer) -> dict[str, str]:
    """Each attention module's processor backend (None = diffusers' default, shown as 'native')."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    out = {}
    for name, m in transformer.named_modules():
        if isinstance(m, (Attention, AttentionModuleMixin)):
            b = getattr(m.processor, "_attention_backend", "missing")
            out[name] = "native" if b is None else getattr(b, "value", str(b))
    return out


def cache_config(kind: str, arg: str | None):
    """diffusers' own cache configs (0.42). TaylorSeer runs in lite mode: whole blocks skipped on predicted steps
    and proj_out's output extrapolated; its default hooks only attention, leaving the MLPs (most of the FLOPs)
    computed every step. MagCache uses diffusers' FLUX_MAG_RATIOS (calibrated on FLUX.1-dev by MagCache's authors):
    its skip schedule then follows those ratios, not the weights."""
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    if kind == "fbc":
        t = float(arg)
        return FirstBlockCacheConfig(threshold=t), {"threshold": t, "schedule": "threshold (depends on the weights)"}
    if kind == "taylorseer":
        n = int(arg)
        return (TaylorSeerCacheConfig(cache_interval=n, use_lite_mode=True),
                {"cache_interval": n, "lite_mode": True, "disable_cache_before_step": 3, "max_order": 1,
                 "schedule": "fixed interval"})
    if kind == "magcache":
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

        t = float(arg)
        return (MagCacheConfig(threshold=t, mag_ratios=FLUX_MAG_RATIOS, num_inference_steps=len(FLUX_MAG_RATIOS)),
                {"threshold": t, "mag_ratios": "diffusers.hooks.mag_cache.FLUX_MAG_RATIOS (FLUX.1-dev)",
                 "schedule": "fixed by the ratio table and the step count"})
    raise RecipeError(f"cache={kind}: unknown; choose fbc:T, taylorseer:N or magcache:T")


def set_cache_steps(transformer, recipe, steps: int, manifest) -> None:
    """MagCache interpolates its ratio table to the step count: re-enabled when a request's count differs."""
    kind, arg = cache_spec(recipe)
    if kind != "magcache" or getattr(transformer, "_vramfit_cache_steps", None) == steps:
        return
    from diffusers import MagCacheConfig
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    transformer.disable_cache()
    transformer.enable_cache(MagCacheConfig(threshold=float(arg), mag_ratios=FLUX_MAG_RATIOS,
                                            num_inference_steps=steps))
    transformer._vramfit_cache_steps = steps
    for entry in manifest.find("cache"):
        entry["num_inference_steps"] = steps


def cache_hooks(transformer) -> list[str]:
    names = ("fbc_", "taylorseer", "mag_cache")
    out = []
    for name, m in transformer.named_modules():
        reg = getattr(m, "_diffusers_hook", None)
        hooks = getattr(reg, "hooks", {}) if reg is not None else {}
        if any(h.startswith(names) for h in hooks):
            out.append(name)
    return out


def install_block_counter(transformer) -> None:
    """Counts how often the last single block's output projection really runs: with a cache, fewer times than there
    are steps. (A hook on the block itself would also fire when the cache hook returns its cached output.)"""
    transformer._vramfit_block_runs = 0
    if getattr(transformer, "_vramfit_counter_outside", False):  # counted around the compiled block instead
        return
    layer = transformer.single_transformer_blocks[-1].proj_out

    def count(*_):
        transformer._vramfit_block_runs += 1

    layer.register_forward_pre_hook(count)


def pipeline_sets_begin_index(pipe) -> bool:
    import inspect

    try:
        return "scheduler.set_begin_index(0)" in inspect.getsource(type(pipe).__call__)
    except (OSError, TypeError):
        return False


class _BeginAtZero:  # marker base: the scheduler already starts at index 0
    pass


def begin_at_zero(scheduler):
    """The same scheduler class with ``set_begin_index(0)`` after every ``set_timesteps`` (which resets it): the
    first ``step`` then skips ``index_for_timestep``'s ``nonzero().item()`` host sync (flux-fast). A subclass made
    from the same config, so it is explicit and reversible (``pipe.scheduler = original``)."""
    import functools

    base = type(scheduler)

    @functools.wraps(base.set_timesteps)  # the pipeline inspects its signature (sigmas=, mu=)
    def set_timesteps(self, *args, **kwargs):
        base.set_timesteps(self, *args, **kwargs)
        _begin_at_zero(self)

    cls = type(f"BeginAtZero{base.__name__}", (_BeginAtZero, base), {"set_timesteps": set_timesteps})
    return cls.from_config(scheduler.config)


def _begin_at_zero(scheduler) -> None:
    scheduler.set_begin_index(0)


# ----------------------------------------------------------------------------------------------------------
# after the first generation


def before_call(pipe, recipe, steps: int, manifest) -> None:
    tr = getattr(pipe, "transformer", None)
    if tr is not None:
        set_cache_steps(tr, recipe, steps, manifest)
        if cache_spec(recipe)[0] != "none":
            tr._vramfit_block_runs = 0


def verify_after_run(pipe, recipe, steps: int, manifest) -> None:
    """Checks that only a generation can answer; raises NotApplied when one fails."""
    from torch._dynamo.utils import counters

    for entry in manifest.find("compile"):
        if entry.get("verified") is None:
            made = counters["stats"].get("unique_graphs", 0) - entry["graphs_before"]
            entry["graphs_compiled"] = made
            # where inductor's code came from: its on-disk caches (filled by a compile cache hit) or fresh codegen
            entry["inductor_cache"] = {k: counters[group].get(k, 0) for group, k in (
                ("inductor", "fxgraph_cache_hit"), ("inductor", "fxgraph_cache_miss"),
                ("aot_autograd", "autograd_cache_hit"), ("aot_autograd", "autograd_cache_miss"))}
            # where the compile's time went: dynamo's timed phases, seconds summed over this process's compiles so far
            from torch._dynamo.utils import compilation_time_metrics

            times = {k: round(sum(v), 2) for k, v in compilation_time_metrics.items() if v}
            entry["compile_phases_s"] = dict(sorted(times.items(), key=lambda kv: -kv[1])[:12])
            key = repr(entry.get("key"))
            if made <= 0 and key in _GRAPHS_MADE and entry.get("dynamo_wrapped"):
                entry["reused_graphs"] = "graphs compiled earlier in this process for the same block classes"
            elif made <= 0:
                raise NotApplied(f"compile={recipe.compile}: the first generation ran but dynamo compiled no graph "
                                 "(the compiled wrappers were bypassed)")
            else:
                _GRAPHS_MADE.add(key)
            if compile_graphs(recipe):
                skips = counters["inductor"].get("cudagraph_skips", 0)
                entry["cudagraph_skips"] = skips
                if skips:
                    raise NotApplied(f"compile +graphs: inductor skipped CUDA graphs for {skips} graph(s) "
                                     "(run with TORCH_LOGS=perf_hints to see why)")
            entry["verified"] = True
    for entry in manifest.find("host-sync"):
        sched = pipe.scheduler
        ok = sched.begin_index == 0
        entry["verified"] = ok
        if not ok:
            raise NotApplied(f"host_sync=avoid: the scheduler's begin_index is {sched.begin_index!r} after the run")
    tr = getattr(pipe, "transformer", None)
    for entry in manifest.find("cache"):
        runs = getattr(tr, "_vramfit_block_runs", None) if tr is not None else None
        if runs is not None:
            entry.update(steps=steps, steps_computed=runs, steps_skipped=max(steps - runs, 0))
