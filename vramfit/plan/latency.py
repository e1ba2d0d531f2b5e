"""The latency model: a transformer step from FLOPs and the GPU's rates (calibrated per backend), encode and
decode from measured stage times scaled by the bf16 rate, the cost of every offload strategy's moves, and the cold
start (lazy CUDA initialisation, compile)."""

from __future__ import annotations

from .data import GB, PRECISION_BYTES, Shape, _config, calibration, compile_scope, offload_kind, stream_constants
from .memory import resolved_k, stream_link_bytes, stream_step_split
from .weights import backend_family, family, layout
from ..errors import RecipeError


def transformer_flops(model: str, shape: Shape) -> tuple[float, float]:
    """(linear FLOPs, attention FLOPs) of one denoising step. Every FLUX block holds 12 D^2 weights applied to
    every token (double blocks: img and txt streams each with their tokens; single blocks: qkv + mlp-in +
    fused out); attention is QK^T and PV: 4 T^2 D per block. Embedders and modulation are < 1 %."""
    cfg = _config(model, "transformer")
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    blocks = cfg["num_layers"] + cfg["num_single_layers"]
    t = shape.img_tokens + shape.text_tokens
    return 2 * 12 * d * d * t * blocks * shape.batch, 4 * t * t * d * blocks * shape.batch




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



def _tiled_mpix(shape: Shape, tile: int) -> float:
    """Pixels diffusers' tiled decode computes: tiles of ``tile`` px every 3/4 tile, cropped at the edge."""
    def spans(n):
        stride = int(tile * 0.75)
        return sum(min(tile, n - i) for i in range(0, n, stride))

    return spans(shape.height) * spans(shape.width) / 1e6



def compute_step(model: str, recipe, shape: Shape, gpu: dict, assumed: list) -> float:
    """One resident denoising step: (linear FLOPs / dense rate x backend factor + attention FLOPs / bf16 rate)
    / efficiency, x the compile speed-up, + per-step overhead. Raises RecipeError where the GPU lacks the
    backend's compute type."""
    c = calibration()
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
    scope = compile_scope(recipe)
    compiled = scope != "off"
    factor = be["factor"]["compiled" if compiled and "compiled" in be["factor"] else "eager"]
    # the regional compile speed-up was measured on bf16 itself: bf16 + regional needs no compiled factor
    measured_compile = recipe.transformer == "bf16" and scope == "regional"
    if be.get("source", "assumed") == "assumed" or (compiled and "compiled" not in be["factor"] and not measured_compile):
        assumed.append(f"{recipe.transformer} speed factor" + (" (compiled)" if compiled else ""))
    elif compiled and be.get("compiled_mode", scope) != scope:
        assumed.append(f"{recipe.transformer} compiled speed factor (measured with compile={be['compiled_mode']})")
    if recipe.attention != "native":
        assumed.append(f"attention={recipe.attention} costs what native SDPA costs")
    lin, attn = transformer_flops(model, shape)
    tr = c["transformer"]
    compute = (lin / rate * factor + attn / bf16) / tr["efficiency"]
    if compiled:
        cm = c["compile"][scope]
        compute *= cm["step_factor"]
        if cm.get("source") == "assumed":
            assumed.append(f"compile={scope} speed-up")
    return compute + tr["overhead_s"]


def stage_compute(model: str, recipe, shape: Shape, gpu: dict) -> dict[str, float]:
    """Resident encode (T5, CLIP) and VAE decode times: measured on the reference GPU x its bf16 rate ratio."""
    c = calibration()
    speed = c["reference_gpu"]["tflops"]["bf16"] / gpu["tflops"]["bf16"]
    t5_s = c["text_encoder_2"]["s_per_token"] * shape.text_tokens * shape.batch * speed
    be5 = c["backends"].get(recipe.text_encoder_2)
    if be5 and recipe.text_encoder_2 not in PRECISION_BYTES and gpu["tflops"].get(be5["compute"]):
        # T5 is nearly all Linear: its time scales like the transformer's linear part under the same backend
        t5_s *= be5["factor"]["eager"] * gpu["tflops"]["bf16"] / gpu["tflops"][be5["compute"]]
    clip_s = c["text_encoder"]["s"] * shape.batch * speed
    vae = c["vae"]
    from ..runtime import vae_tile_px

    tile = vae_tile_px(_config(model, "vae").get("sample_size", vae["tile_px"]))  # the tile vae_decode=tiling uses
    vae_s = vae["s_per_mpix"] * shape.mpix * shape.batch * speed
    from .data import vae_decode

    if vae_decode(recipe) == "tiling" and max(shape.height, shape.width) > tile:
        vae_s = vae["s_per_mpix"] * _tiled_mpix(shape, tile) * shape.batch * speed * vae["tiled_overhead"]
    return {"text_encoder_2": t5_s, "text_encoder": clip_s, "vae": vae_s}


def offload_times(model: str, recipe, gpu: dict, weights_kind: str, step: float, t: dict, assumed: list) -> dict:
    """Per-image time of the recipe's offload strategy: {'step': the denoising step with its moves, 'encode',
    'denoise_extra', 'decode'} given the resident ``step`` and stage times ``t`` (seconds)."""
    c = calibration()
    off = c["offload"]
    o = offload_kind(recipe)
    w = {comp: layout(model, comp, getattr(recipe, comp)).total / GB for comp in ("text_encoder", "text_encoder_2",
                                                                                "transformer", "vae")}
    pinned, pageable = gpu["h2d_pinned_gbps"], gpu["h2d_pageable_gbps"]
    sync = pageable * off["sync_fraction_of_pageable"]  # accelerate / unstreamed .to(): many small copies
    wb = off["writeback_gbps"]  # offloading back into fresh host pages (page-fault bound)
    seq = pageable * off["sequential_fraction_of_pageable"]

    def moved_gb(comp: str, mechanism: str) -> float:
        """GB a move of ``comp`` costs, in bf16-equivalent bytes of the mechanism's calibration: stored bytes x
        the backend family's moved-bytes factor (measured per family and mechanism; 1 for plain dtypes)."""
        return w[comp] * moved_bytes_factor(getattr(recipe, comp), mechanism, assumed)

    enc = t["text_encoder"] + t["text_encoder_2"]
    out = {"step": step, "encode": enc, "denoise_extra": 0.0, "decode": t["vae"]}
    if o == "model":
        enc_m = moved_gb("text_encoder", "sync") + moved_gb("text_encoder_2", "sync")
        tr_m = moved_gb("transformer", "sync")
        out["encode"] += enc_m / sync
        # first step: offload the encoders, onload the transformer; diffusers frees the hooks at the end
        out["denoise_extra"] = enc_m / wb + tr_m / sync + tr_m / wb
        out["decode"] += moved_gb("vae", "sync") / sync
    elif o == "sequential":
        out["encode"] += (moved_gb("text_encoder", "sequential") + moved_gb("text_encoder_2", "sequential")) / seq
        out["step"] += moved_gb("transformer", "sequential") / seq
        out["decode"] += moved_gb("vae", "sequential") / seq
    elif o in ("group-block", "group-leaf"):
        stream = pinned * off["stream_fraction_of_pinned"][o]
        unhidden = off["stream_unhidden"][o]

        def moved(comp: str, run_s: float) -> float:
            if o == "group-block" and not layout(model, comp, getattr(recipe, comp)).blocks:
                gb = moved_gb(comp, "sync")  # one unstreamed group: onload + write back, every call
                return run_s + gb / sync + gb / wb
            # streamed: the copy of the next group overlaps this group's compute, but diffusers synchronizes
            # the host with both streams at every group, so part of the shorter of the two is not hidden
            x = moved_gb(comp, "stream") / stream
            return max(run_s, x) + unhidden * min(run_s, x)

        out["encode"] = moved("text_encoder", t["text_encoder"]) + moved("text_encoder_2", t["text_encoder_2"])
        out["step"] = moved("transformer", step)
        out["decode"] = moved("vae", t["vae"])
    elif o == "stream":
        out.update(stream_times(model, recipe, gpu, step, t, assumed))
    elif o == "staged":
        out.update(staged_times(model, recipe, weights_kind, w, t, assumed))
    return out


def stream_regime(model: str, recipe, gpu: dict, step: float) -> str:
    """Which term bounds offload=stream's step given the resident ``step`` (``compute_step``): 'link' (streamed
    bytes / link > step), 'compute', or 'resident' (no transformer block streams: K covers them all)."""
    _, blocks = stream_step_split(model, recipe, resolved_k(model, recipe))["transformer"]
    if not blocks:
        return "resident"
    link = gpu["h2d_pinned_gbps"] * stream_constants()["link_fraction_of_pinned"] * GB
    return "link" if stream_link_bytes(model, recipe, resolved_k(model, recipe))[0] / link > step else "compute"


def stream_unmeasured(model: str, recipe, gpu: dict, step: float) -> str | None:
    """Why an offload=stream prediction rests on figures never measured (None: a measured stream row covers it):
    the transformer's value must have been streamed in the same regime (link- or compute-bound; 'resident' needs
    none), and T5's value streamed at all (T5 always streams)."""
    sc = stream_constants()
    rows = sc.get("rows") or []
    if not rows:
        return "offload=stream link use and per-block cost (not measured yet)"
    regime = stream_regime(model, recipe, gpu, step)
    tr_ok = regime == "resident" or any(r["transformer"] == recipe.transformer and r["regime"] == regime
                                        for r in rows)
    t5_ok = any(r["text_encoder_2"] == recipe.text_encoder_2 for r in rows)
    if tr_ok and t5_ok:
        return None
    what = [f"transformer={recipe.transformer} {regime}-bound"] if not tr_ok else []
    what += [f"text_encoder_2={recipe.text_encoder_2}"] if not t5_ok else []
    seen = sorted({f"{r['transformer']} {r['regime']}-bound" for r in rows})
    return f"offload=stream with {' and '.join(what)} streamed (never measured; measured: {', '.join(seen)})"


def stream_times(model: str, recipe, gpu: dict, step: float, t: dict, assumed: list) -> dict:
    """offload=stream: packed block bytes move from pinned memory on a side stream, prefetched while the
    previous block computes, so a step costs max(compute, streamed bytes / link) + a small cost per block
    (link use and per-block cost measured from the H200 stream rows where there are any)."""
    sc = stream_constants()
    why = stream_unmeasured(model, recipe, gpu, step)
    if why:
        assumed.append(why)
    link = gpu["h2d_pinned_gbps"] * sc["link_fraction_of_pinned"] * GB
    split = stream_step_split(model, recipe, resolved_k(model, recipe))
    _, tr_blocks = split["transformer"]
    _, t5_blocks = split["text_encoder_2"]
    per_step, per_image = stream_link_bytes(model, recipe, resolved_k(model, recipe))
    tr_step = max(step, per_step / link) + sc["per_block_s"] * len(tr_blocks)
    t5 = max(t["text_encoder_2"], sum(t5_blocks) / link) + sc["per_block_s"] * len(t5_blocks)
    # the hoisted modulation: its bytes cross the link once per image (its small GEMMs ran inside the blocks before)
    return {"step": tr_step, "encode": t["text_encoder"] + t5, "denoise_extra": per_image / link}


def staged_times(model: str, recipe, weights_kind: str, w: dict, t: dict, assumed: list) -> dict:
    """offload=staged: each stage builds its components' weights on the GPU -- generates (random) or reads
    (checkpoint) them, then quantizes on load. Quantizing backends start from bf16 weights; a GGUF checkpoint is
    read as is."""
    off = calibration()["offload"]
    load = off["random_gen_gbps"] if weights_kind == "random" else off["disk_gbps"]
    if weights_kind != "random":
        assumed.append("checkpoint read rate (disk)")

    def build(comp: str) -> float:
        v = getattr(recipe, comp)
        fam = family(v)
        if fam == "plain" or (fam == "gguf" and weights_kind != "random"):
            return w[comp] / load
        src = layout(model, comp, "bf16").total / GB
        q = off["quantize_gbps"].get(fam) or {"gbps": off["quantize_gbps"]["bnb"]["gbps"], "source": "assumed"}
        if q.get("source", "assumed") == "assumed":
            assumed.append(f"{fam} quantize-on-load rate")
        return src / load + src / q["gbps"]

    return {"encode": t["text_encoder"] + t["text_encoder_2"] + build("text_encoder") + build("text_encoder_2"),
            "denoise_extra": build("transformer"), "decode": t["vae"] + build("vae")}


def cold_start(recipe, assumed: list, cached=None) -> tuple[float, bool]:
    """(seconds the first image of a process pays on top of a warm one, whether a compile cache was counted).
    Lazy CUDA/cuBLAS initialisation in encode, first step and decode; compile where the recipe compiles -- unless
    ``cached(recipe)`` says the compile cache for that exact key exists (then only the start-up is paid)."""
    c = calibration()
    pl = c["pipeline"]
    cold = pl["first_step_extra_s"] + pl.get("encode_cold_extra_s", 0.0) + pl.get("decode_cold_extra_s", 0.0)
    scope = compile_scope(recipe)
    if scope == "off":
        return cold, False
    if cached is not None and cached(recipe):
        return cold, True
    cm = c["compile"][scope]
    # the family's key, +cdtune where inductor's coordinate-descent tuning is on (minutes for torchao's kernels)
    fam = backend_family(recipe.transformer) + ("+cdtune" if recipe.compile_cdtune else "")
    # measured as first step minus median step: includes the first-step extra; per backend family where
    # measured (quantized blocks compile much slower than bf16 ones)
    fam_cold = cm.get("cold_s_by_family", {}).get(fam)
    cold += (fam_cold["s"] if fam_cold else cm["cold_s"]) - pl["first_step_extra_s"]
    if "cold_s" in cm.get("assumed", []) and not fam_cold:
        assumed.append(f"compile={scope} cold start")
    bound = cm.get("cold_s_min_by_family", {}).get(fam)
    if bound and bound["s"] > cold:  # a measured timeout says compiling this family takes longer
        cold = bound["s"]
        assumed.append(f"compile={scope} cold start >= {bound['s']:.0f} s (lower bound from a timeout)")
    return cold, False


# what a step the cache skips still costs (the cache hook's own work: TaylorSeer extrapolates proj_out's output),
# measured on the H200 (session 10, 28 steps, 9 computed): (denoise - computed x step) / skipped steps -- 2.4 ms
# with eager blocks (bf16 + taylorseer:4), 7.8 ms around regional-compiled ones (fp8dq + fused QKV + taylorseer:4)
CACHE_SKIPPED_STEP_S = {"eager": 0.0024, "compiled": 0.0078}


def cache_steps(recipe, steps: int, assumed: list) -> int:
    """Steps the transformer computes under the recipe's step cache. TaylorSeer's schedule is fixed (diffusers'
    rule: the first ``disable_cache_before_step`` = 3 steps, then every ``cache_interval``-th); FBC's and MagCache's
    follow their thresholds (FBC's the weights' residuals), so they are counted as computing every step, marked
    assumed."""
    kind = recipe.cache_kind
    if kind == "none":
        return steps
    if kind == "taylorseer":
        n = int(recipe.cache.partition(":")[2])
        return sum(1 for s in range(steps) if s < 3 or (s - 3 - 1) % n == 0)
    assumed.append(f"cache={kind}: every step computed (its skips follow its threshold; not modelled)")
    return steps


def cached_denoise_s(recipe, steps: int, step_s: float, assumed: list) -> float:
    """Denoise seconds of ``steps`` under the recipe's step cache: computed steps at ``step_s``, skipped ones at the
    measured cost of a skip."""
    computed = cache_steps(recipe, steps, assumed)
    skip = CACHE_SKIPPED_STEP_S["compiled" if str(recipe.compile) != "off" else "eager"]
    return computed * step_s + (steps - computed) * skip
