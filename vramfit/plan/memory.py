"""The memory model: activation peaks per stage (calibrated per token / per megapixel), what each offload strategy
keeps on the GPU, and what stays in host memory."""

from __future__ import annotations

import contextlib
import contextvars

from .data import (COMPONENTS, GB, STAGES, Shape, _config, _stamp, calibration, offload_kind,
                   stream_constants, stream_k, vae_decode)
from .weights import STREAMED, family, layout


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
    from ..runtime import vae_tile_px

    tile = vae_tile_px(_config(model, "vae").get("sample_size", vae["tile_px"]))  # the tile vae_decode=tiling uses
    vs = _scale(model, "vae", "", vae["width"])
    mode = vae_decode(recipe)
    if mode == "tiling" and max(shape.height, shape.width) > tile:
        # one tile's decoder activations + the full-size output image (bf16, 3 channels)
        a_vae = shape.batch * (vae["act_gb_per_mpix"] * tile * tile / 1e6 * vs + shape.mpix * 6e6 / GB)
    else:
        per_image = 1 if mode == "slicing" else shape.batch  # slicing decodes one image at a time
        a_vae = per_image * vae["act_gb_per_mpix"] * shape.mpix * vs
    return {"text_encoder": a_clip, "text_encoder_2": a_t5, "transformer": a_tr, "vae": a_vae}


def _pairs(sizes) -> int:
    """Largest two consecutive groups: with streams the next group is prefetched while one runs."""
    sizes = list(sizes)
    if len(sizes) < 2:
        return sum(sizes)
    return max(a + b for a, b in zip(sizes, sizes[1:]))


def resident_gb(model: str, recipe, comp: str, act: float) -> float:
    """GPU memory while ``comp`` runs under the recipe's offload strategy (weights resident + activations)."""
    lay = layout(model, comp, getattr(recipe, comp))
    o = offload_kind(recipe)
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


# ----------------------------------------------------------------------------------------------------------
# offload=stream: K transformer blocks resident, the rest (and all of T5's blocks) streamed through R slots


_HOIST = contextvars.ContextVar("vramfit_stream_modulation_hoisted", default=True)


EVERY_STEP = "every step"  # hoisted out of the blocks, but computed anew at every step (no temb was predicted)


@contextlib.contextmanager
def modulation_hoisting(on):
    """Predict offload=stream with the streamed blocks' modulation hoisted (``on`` True, what runs do since
    2026-12-04), copied with its block every step (False: what the rows measured before then ran), or hoisted and
    computed anew every step (``EVERY_STEP``: the executor's path when no step's temb is predicted, e.g. a caller
    outside the pipeline; slots sized without the layers, their bytes copied every step)."""
    tok = _HOIST.set(on)
    try:
        yield
    finally:
        _HOIST.reset(tok)


def hoists_modulation(recipe) -> bool:
    """``stream.hoists`` (eager runs take the streamed blocks' modulation out of them), unless predicting a row
    measured before that (``modulation_hoisting(False)``)."""
    from ..stream import hoists

    return _HOIST.get() is not False and hoists(recipe)


def stream_link_bytes(model: str, recipe, k: int) -> tuple[int, int]:
    """(transformer bytes the ring copies each step, bytes copied once per image) under offload=stream:K."""
    blocks = sum(stream_step_split(model, recipe, k)["transformer"][1])
    mods, _ = stream_modulation(model, recipe, k)
    return (blocks + mods, 0) if _HOIST.get() == EVERY_STEP else (blocks, mods)


# session 14's first device call (2026-12-04): offload=stream has hoisted the modulation since; a row without its
# offload entry (``generate --vram`` rows) is judged by when it ran
HOIST_UTC = "2026-12-04T01:40:00Z"


def row_hoisted(row: dict):
    """How a measured run ran the modulation (a ``modulation_hoisting`` value): True when its offload entry says it
    hoisted the layers (``modulation``, at the top or under ``components.transformer``), ``EVERY_STEP`` when the
    executor's counts show steps whose temb was not predicted (the sweep harness re-attached without the
    scheduler's timesteps on 2026-12-04, call 2), False otherwise. A row with no offload entry: measured after
    ``HOIST_UTC``."""
    entries = [e for e in [row.get("offload")] + [s for s in row.get("manifest") or []
                                                  if isinstance(s, dict) and s.get("step") == "offload"]
               if isinstance(e, dict)]
    if not entries:
        stamp = _stamp(row)
        return stamp is not None and stamp >= HOIST_UTC
    hoisted = False
    for e in entries:
        tr = (e.get("components") or {}).get("transformer") or {}
        hoisted |= bool((e.get("modulation") or tr.get("modulation") or {}).get("hoisted_layers"))
    counts = ((row.get("stream_measured") or {}).get("transformer") or {}).get("modulation")
    if hoisted and counts and counts.get("unpredicted"):
        return EVERY_STEP
    return hoisted


def stream_split(model: str, recipe, k: int) -> dict:
    """Bytes of the stream executor's parts for K resident transformer blocks (the first K in execution order):
    {component: (resident bytes, streamed block bytes list)} for the streamed components: what stays on the GPU
    and what the host buffer holds. What crosses the link each step: ``stream_step_split``."""
    out = {}
    for comp in STREAMED:
        lay = layout(model, comp, getattr(recipe, comp))
        blocks = list(lay.stream_blocks)
        kk = min(k, len(blocks)) if comp == "transformer" else 0  # T5 runs once per image: all of it streams
        out[comp] = (lay.total - sum(blocks[kk:]), blocks[kk:])
    return out


def stream_step_split(model: str, recipe, k: int) -> dict:
    """``stream_split`` with each streamed block's bytes as the ring copies them every step: less its modulation
    layers where they are hoisted (``stream_modulation``)."""
    out = stream_split(model, recipe, k)
    if hoists_modulation(recipe):
        res, bl = out["transformer"]
        mods = layout(model, "transformer", recipe.transformer).stream_mods[-len(bl):] if bl else ()
        out["transformer"] = (res, [b - m for b, m in zip(bl, mods)])
    return out


def stream_modulation(model: str, recipe, k: int) -> tuple[int, int]:
    """(bytes copied once per generation, output features cached per step and image) of the streamed transformer
    blocks' hoisted modulation layers; (0, 0) where it is not hoisted."""
    if not hoists_modulation(recipe):
        return 0, 0
    lay = layout(model, "transformer", recipe.transformer)
    kk = min(k, len(lay.stream_blocks))
    return sum(lay.stream_mods[kk:]), sum(lay.stream_mod_out[kk:])


def stream_blocks(model: str) -> int:
    """How many transformer blocks offload=stream:K counts over (FLUX.1: 19 double + 38 single = 57)."""
    return len(layout(model, "transformer", "bf16").stream_blocks)


def _stream_resident(model: str, recipe, split: dict) -> int:
    """Bytes on the GPU under offload=stream outside the slots: CLIP, the VAE, and the streamed components'
    non-block weights and K resident blocks."""
    return sum(r for r, _ in split.values()) + sum(layout(model, c, getattr(recipe, c)).total
                                                   for c in COMPONENTS if c not in split)


def stream_stage_peaks(model: str, recipe, shape: Shape, k: int) -> dict[str, float]:
    """GB per stage: everything resident (CLIP, VAE, non-block weights, K blocks) + the stage's R slots sized
    for its largest streamed block + the stage's activations."""
    act = activations_gb(model, recipe, shape)
    split = stream_split(model, recipe, k)
    slots = stream_constants()["slots"]
    resident = _stream_resident(model, recipe, split)
    ring = {c: slots * max(bl, default=0) for c, (_, bl) in stream_step_split(model, recipe, k).items()}
    # diffusers' layerwise casting casts each weight down again after its layer, into a new tensor: while a streamed
    # block runs, its fp8 weights come to exist twice (the slot's and the recast copies, freed when the block ends
    # and the executor rebinds the slot); the layers the casting skips (norms, adaLN modulation) stay bf16 and are
    # not copied. From the mechanism, not a fitted figure. H200 2026-12-02: session 7's fp8 K=0 row under 3 GB ran
    # out of memory before the rebinding; session 9's ran with 2.33 GB allocated (the whole block counted here
    # instead of its fp8 part predicted 2.61)
    recast = {c: _largest_streamed_recast(model, c, getattr(recipe, c), len(bl)) for c, (_, bl) in split.items()}
    return {"encode": (resident + ring["text_encoder_2"] + recast["text_encoder_2"]) / GB
            + max(act["text_encoder"], act["text_encoder_2"]),
            "denoise": (resident + ring["transformer"] + recast["transformer"] + _modulation_cache(model, recipe, shape, k))
            / GB + act["transformer"],
            "decode": resident / GB + act["vae"]}


def _modulation_cache(model: str, recipe, shape: Shape, k: int) -> int:
    """Bytes of the hoisted modulation's outputs held through the denoise stage: every step's, per image, bf16."""
    _, out_f = stream_modulation(model, recipe, k)
    return out_f * (1 if _HOIST.get() == EVERY_STEP else shape.steps) * shape.batch * 2


def stream_server_needs(model: str, recipe, shape: Shape, k: int) -> dict[str, float]:
    """GB each worker of the pipelined server holds at its peak under offload=stream:K, each stage its own process
    with only its own components: encode = CLIP + T5's non-block weights + T5's slots (+ recast copies) + the
    encoders' activations; denoise = the transformer's non-block weights, K blocks, slots (+ recast) and
    activations; decode = the VAE and its activations. (One process holds them all at once: ``stream_stage_peaks``.)"""
    act = activations_gb(model, recipe, shape)
    split = stream_split(model, recipe, k)
    step_split = stream_step_split(model, recipe, k)
    slots = stream_constants()["slots"]

    def own(c: str) -> int:
        res, bl = split[c]
        return (res + slots * max(step_split[c][1], default=0)
                + _largest_streamed_recast(model, c, getattr(recipe, c), len(bl)))

    def total(c: str) -> int:
        return layout(model, c, getattr(recipe, c)).total

    return {"encode": (total("text_encoder") + own("text_encoder_2")) / GB
            + max(act["text_encoder"], act["text_encoder_2"]),
            "denoise": (own("transformer") + _modulation_cache(model, recipe, shape, k)) / GB + act["transformer"],
            "decode": total("vae") / GB + act["vae"]}


def _largest_streamed_recast(model: str, comp: str, value: str, n_streamed: int) -> int:
    """The largest fp8 part of one streamed block under layerwise casting (the streamed blocks are the last
    ``n_streamed``); 0 for other families."""
    if family(value) != "layerwise" or not n_streamed:
        return 0
    recast = layout(model, comp, value).stream_recast
    return max(recast[-n_streamed:], default=0)


def stream_load_peak_gb(model: str, recipe, k: int) -> float:
    """GB on the GPU while loading ``--weights hub|DIR`` under offload=stream: T5 quantized by torchao arrives whole
    there by quantize-on-load (transformers' path, which also quantizes T5's ``wo``); its blocks then move to host
    memory (``stream.park_blocks``) before the transformer loads. So the load peak is everything resident + T5's
    streamed blocks. 0 when T5 loads into host memory: bf16, fp8 layerwise, and bitsandbytes / quanto, quantized
    block by block from host memory like the transformer (``stream.blockwise_from_host``) -- and always for the
    random stand-in."""
    from .. import stream

    split = stream_split(model, recipe, k)
    on_gpu = [sum(bl) for c, (_, bl) in split.items()
              if c != "transformer" and stream.load_device(getattr(recipe, c), "cuda", c).type == "cuda"
              and not stream.blockwise_from_host(getattr(recipe, c), c)]
    if not on_gpu:
        return 0.0
    return (_stream_resident(model, recipe, split) + max(on_gpu)) / GB


def resolved_k(model: str, recipe) -> int:
    """K of the recipe (offload=stream alone means 0 here: the planner resolves it from a budget first)."""
    k = stream_k(recipe)
    return stream_blocks(model) if k is not None and k > stream_blocks(model) else (k or 0)


# ----------------------------------------------------------------------------------------------------------
# peaks


def stage_peaks(model: str, recipe, shape: Shape) -> dict[str, float]:
    """Predicted GPU peak (GB) of each stage: encode, denoise, decode."""
    o = offload_kind(recipe)
    if o == "stream":
        return stream_stage_peaks(model, recipe, shape, resolved_k(model, recipe))
    w = {comp: layout(model, comp, getattr(recipe, comp)).total / GB for comp in COMPONENTS}
    act = activations_gb(model, recipe, shape)
    out = {}
    for stage, comps in STAGES.items():
        if o == "none":
            out[stage] = sum(w.values()) + max(act[x] for x in comps)
        elif o == "staged":
            out[stage] = sum(w[x] for x in comps) + max(act[x] for x in comps)
        else:
            out[stage] = max(resident_gb(model, recipe, x, act[x]) for x in comps)
    return out


def stream_host_load_peak_gb(model: str, recipe) -> float:
    """Peak host RAM (GB) while ``offload=stream`` loads from a checkpoint (``--weights hub|DIR``): the streamed
    components load in order (T5, then the transformer); one quantized block by block from host memory
    (``stream.blockwise_from_host``) or left in bf16 first lands whole in host memory in bf16, beside the pinned
    store of the components parked before it. The random stand-in is drawn block by block instead, so its peak is
    ``host_gb``. H200, 2026-12-02, ``generate --vram 3GB --weights DIR`` (nf4 T5 + transformer): 30.7 GB peak,
    where ``host_gb`` says 12.0."""
    from .. import stream

    c = calibration()
    split = stream_split(model, recipe, resolved_k(model, recipe))
    parked, peak = 0.0, 0.0
    for comp in ("text_encoder_2", "transformer"):
        if comp not in split:
            continue
        value = getattr(recipe, comp)
        whole = (layout(model, comp, "bf16").total if value == "bf16" or stream.blockwise_from_host(value, comp)
                 else 0)  # else quantized on load on the GPU, then parked: no bf16 copy in host memory
        peak = max(peak, parked + whole)
        parked += sum(split[comp][1])
    return c["pipeline"]["host_base_gb"] + max(peak, parked) / GB


def host_gb(model: str, recipe) -> float:
    """Peak host RAM (GB): the process base + what the offload strategy keeps in host memory."""
    c = calibration()
    lay = {comp: layout(model, comp, getattr(recipe, comp)) for comp in COMPONENTS}
    w = sum(x.total for x in lay.values()) / GB
    host = c["pipeline"]["host_base_gb"]
    o = offload_kind(recipe)
    if o in ("model", "sequential"):
        host += w
    elif o == "group-block":  # pins the blocks while the pageable copies are still held (measured 72 GB)
        host += w + sum(x.pinned_blocks for x in lay.values()) / GB
    elif o == "group-leaf":  # each leaf's pageable copy is released as it is pinned (measured 53 GB)
        host += sum(x.pinned_all for x in lay.values()) / GB
    elif o == "stream":  # streamed blocks held once, pinned in place (no second copy)
        host += sum(sum(bl) for _, bl in stream_split(model, recipe, resolved_k(model, recipe)).values()) / GB
    return host
