"""The choice: candidate recipes, refusals (judged for the GPU planned for), the fit rule, the ranking over the
planning horizon, and the printed plan."""

from __future__ import annotations

import sys
from dataclasses import replace

from .data import GB, Shape, calibration, compile_scope, offload_kind, ram_budget, stream_k as recipe_stream_k
from .estimate import UNMEASURED_PENALTY, fits_gb, predict, stream_k
from ..errors import RecipeError

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
                   ("group-leaf", "off"), ("group-leaf", "regional"), ("sequential", "off"),
                   ("stream", "off"), ("stream", "regional"))
STATUS_ORDER = {"chosen": 0, "fits": 0, "too-big": 1, "too-much-ram": 2, "too-lossy": 3, "refused": 4}
FP8_COMPUTE = ("torchao-fp8dq", "torchao-fp8dq-tensor")  # fp8 x fp8 matmuls: compute capability >= 8.9


def t5_values(tr: str) -> tuple[str, ...]:
    """T5-XXL (9.5 GB in bf16) either stays bf16 or takes the transformer's backend; GGUF (transformer-only)
    pairs with bnb-nf4, bf16 with fp8 layerwise casting."""
    if tr == "bf16":
        return ("bf16", "fp8-layerwise")
    if tr.startswith("gguf-"):
        return ("bf16", "bnb-nf4")
    return ("bf16", tr)


def candidate_recipes(shape: Shape) -> list:
    from ..recipe import Recipe

    from ..runtime import vae_tile_px

    # tiling splits what is larger than its tile (half the VAE's native size: 512 px for FLUX)
    tile = vae_tile_px(calibration()["vae"]["tile_px"])
    vae_modes = ("none", "tiling") if max(shape.height, shape.width) > tile else ("none",)
    field = "vae_decode" if "vae_decode" in Recipe.__dataclass_fields__ else "vae_mode"
    # offload=stream only where the recipe grammar has it (a planned recipe must parse and run)
    offloads = [oc for oc in OFFLOAD_COMPILE if oc[0] != "stream" or hasattr(Recipe, "stream_k")]
    out = []
    for tr in TRANSFORMER_VALUES:
        for t5 in t5_values(tr):
            for off, comp in offloads:
                for vm in vae_modes:
                    # replace(), not Recipe(...): offload=stream before the K is resolved is the planner's own
                    out.append(replace(Recipe(transformer=tr, text_encoder_2=t5, compile=comp, **{field: vm}),
                                       offload=off))
    return out


def refusal(recipe, device_type: str = "cuda", gpu: dict | None = None, here: bool = True,
            model: str | None = None) -> str | None:
    """Why ``recipe`` cannot run, or None. ``here``: it will run on this machine (its libraries and GPU judge it);
    else it is judged for the named ``gpu``: its compute capability from gpus.json, its libraries assumed
    installed (a GPU machine installs what its recipe needs; this machine's packages say nothing about it)."""
    import torch

    from .. import apply, models

    if model is not None:
        for reason, alt in apply.model_problems(models.get_model(model), recipe.components):
            return f"{reason}. Alternative: {alt}"
    if here or device_type != "cuda":
        try:
            apply.check(recipe, torch.device(device_type))
        except RecipeError as e:
            return str(e)
        return None
    for reason, alt in list(apply._unbuilt(recipe)) + list(apply.problems(
            recipe.components, offload_kind(recipe), compile_scope(recipe), recipe.attention, "cuda", installed=False)):
        return f"{reason}. Alternative: {alt}"
    cap = (gpu or {}).get("capability")
    for comp, value in recipe.components.items():
        if value in FP8_COMPUTE and cap and tuple(map(int, cap.split("."))) < (8, 9):
            return (f"{comp}={value} needs compute capability >= 8.9 ({gpu['profile']}: {cap}). "
                    "Alternative: torchao-fp8wo or torchao-int8dq")
    return None


def _judge(model, r, shape, gpu, budget, ram_gb, max_error, device_type, here, weights_kind, cached) -> dict:
    """One candidate's row: its resolved recipe (offload=stream gets the K the budget allows), refusal or
    prediction, and status against the budget."""
    if offload_kind(r) == "stream" and recipe_stream_k(r) is None:
        r = replace(r, offload=f"stream:{stream_k(model, r, shape, budget * GB, gpu)}")
    row = {"recipe": str(r), "status": None, "reason": None, "needs_vram_gb": None, "predicted": None}
    why = refusal(r, device_type, gpu, here, model)
    if why is None:
        try:
            p = predict(model, r, shape, gpu, weights_kind, cached)
        except RecipeError as e:
            why = str(e)
    if why is not None:
        row.update(status="refused", reason=why)
        return row
    row["predicted"] = p
    row["needs_vram_gb"] = round(fits_gb(p["peak_vram_gb"]), 2)
    b = calibration()["budget"]
    if max_error is not None and p["expected_error"] > max_error:
        row.update(status="too-lossy", reason=f"expected error {p['expected_error']:.3f} > --max-error {max_error}")
    elif ram_gb is not None and p["peak_host_gb"] > ram_gb:
        row.update(status="too-much-ram", reason=f"host RAM {p['peak_host_gb']:.1f} GB > {ram_gb:.1f} GB")
    elif row["needs_vram_gb"] > budget:
        row.update(status="too-big", reason=f"needs {row['needs_vram_gb']:.2f} GB (peak {p['peak_vram_gb']:.2f} GB "
                   f"+ {b['margin']:.0%} + {b['reserve_gb']} GB) > {budget:.2f} GB")
    else:
        row["status"] = "fits"
    return row


def rank_key(row: dict):
    """Fitting first, fastest over the horizon; a recipe resting on a factor never measured on any GPU counts
    10 % slower, so it ranks after measured ones within 10 % of its time (DESIGN.md, "Decisions for this round":
    planner ranking). Ties (nf4 and fp4 run the same kernels): measured first (a tie at 0.01 s put an unmeasured
    gguf-q5_1 before a measured nf4 stream recipe 0.002 s apart), then the smaller error, then the smaller peak."""
    p = row["predicted"]
    t = p["total_s"] * (UNMEASURED_PENALTY if p["unmeasured"] else 1.0) if p else 0
    return (STATUS_ORDER[row["status"]], round(t, 2), bool(p and p["unmeasured"]), p["expected_error"] if p else 0,
            p["peak_vram_gb"] if p else 0, row["recipe"])


def make_plan(model: str, shape: Shape, gpu: dict, vram_gb: float, ram_gb: float | None = None,
              max_error: float | None = None, device_type: str = "cuda", recipes=None,
              weights_kind: str = "hub", here: bool | None = None, cached=None, ram_source: str = "--ram") -> dict:
    """Every candidate judged and ranked. ``here``: the plan runs on this machine (default: when ``gpu`` was
    probed here); ``cached(recipe)``: whether its compile cache exists."""
    from .. import models

    models.get_model(model)
    here = bool(gpu.get("local")) if here is None else here
    c = calibration()
    rows = [_judge(model, r, shape, gpu, vram_gb, ram_gb, max_error, device_type, here, weights_kind, cached)
            for r in (recipes if recipes is not None else candidate_recipes(shape))]
    rows.sort(key=rank_key)
    chosen = rows[0]["recipe"] if rows and rows[0]["status"] == "fits" else None
    if chosen:
        rows[0]["status"] = "chosen"
    # the smallest budget that would work: the cheapest candidate meeting every other bound
    ok = [r["needs_vram_gb"] for r in rows if r["status"] in ("chosen", "fits", "too-big")]
    gkeys = ("profile", "vram_gb", "capability", "tflops", "h2d_pinned_gbps", "h2d_pageable_gbps", "source")
    return {
        "schema": "vramfit.plan/1", "model": model,
        "gpu": {**{k: gpu.get(k) for k in gkeys},
                "libraries": "this machine's" if here else "assumed installed on the GPU's machine"},
        "request": {"height": shape.height, "width": shape.width, "steps": shape.steps, "batch": shape.batch,
                    "text_tokens": shape.text_tokens, "images": shape.images},
        "budget": {"vram_gb": round(vram_gb, 3), "ram_gb": ram_gb, "ram_source": ram_source if ram_gb else None,
                   "margin": c["budget"]["margin"], "reserve_gb": c["budget"]["reserve_gb"], "max_error": max_error},
        "chosen": chosen, "min_vram_gb": min(ok) if ok else None,
        "candidates": rows,
        "calibration": c["source"],
    }


def plan_for(model: str, shape: Shape, gpu: dict, vram_gb: float, ram_gb: float | None = None, **kw) -> dict:
    """make_plan with the host RAM budget resolved (``--ram``, this machine's, or the profile's assumed one)."""
    ram, source = ram_budget(gpu, ram_gb)
    return make_plan(model, shape, gpu, vram_gb, ram, ram_source=source, **kw)


def _short(recipe: str) -> str:
    """Only the items that differ from the default recipe's, e.g. 'transformer=bnb-nf4,offload=model' (item by
    item on the printed strings, so planner-resolved values such as offload=stream:K print as they are)."""
    from ..recipe import Recipe

    default = set(str(Recipe()).split(","))
    return ",".join(i for i in str(recipe).split(",") if i not in default) or "bf16"


def _brief(reason: str) -> str:
    """The reason without its alternative, at most ~160 characters (--json has the whole text)."""
    r = reason.split(" Alternative:")[0].rstrip(". ")
    return r if len(r) <= 160 else r[:157] + "..."


