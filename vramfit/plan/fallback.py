"""``generate --vram``: plan for the budget, run the chosen recipe, and on out-of-memory free what the failed
attempt held and fall back to the next candidate that needs less of what ran out."""

from __future__ import annotations

import gc

from .choice import _short, make_plan
from .data import Shape, calibration, gpu_profile, host_ram_gb, local_profile, parse_size
from ..errors import InputError, VramfitError

# which resource an out-of-memory error ran out of -> the predicted peak a fallback must be smaller in
RESOURCE_KEY = {"vram": "peak_vram_gb", "host": "peak_host_gb"}


def oom_resource(err: BaseException) -> str | None:
    """'vram' for CUDA out-of-memory, 'host' for host allocation failures, None for anything else."""
    import torch

    if isinstance(err, torch.OutOfMemoryError) or "cuda out of memory" in str(err).lower():
        return "vram"
    if isinstance(err, MemoryError):
        return "host"
    return "vram" if "out of memory" in str(err).lower() else None


def next_candidate(fitting: list, tried: set, failed: dict | None, resource: str | None) -> dict | None:
    """The next row to try: the first untried one (rows are in ranking order: by time) whose predicted peak of
    the resource that ran out is smaller than the failed candidate's."""
    for row in fitting:
        if row["recipe"] in tried:
            continue
        if failed is not None and resource is not None:
            key = RESOURCE_KEY[resource]
            if row["predicted"][key] >= failed["predicted"][key]:
                continue
        return row
    return None


def _free(device) -> None:
    """Return what a failed attempt held: called after the ``except`` block has ended, so the traceback (whose
    frames hold the runner and its pipeline) is gone; then the cyclic garbage and the allocator's cache."""
    gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


def _attempt(make_runner, recipe, request):
    """(result, None) or (None, (resource, message)) for an out-of-memory error; other errors propagate. The
    runner is closed and dropped here; no reference to it or to the exception survives this function."""
    runner = None
    try:
        runner = make_runner(recipe)
        return runner.generate(request), None
    except Exception as e:  # noqa: BLE001 -- only out-of-memory falls back; anything else propagates
        resource = oom_resource(e)
        if resource is None:
            raise
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        failure = (resource, f"{type(e).__name__}: {msg}")
    if runner is not None and hasattr(runner, "close"):
        runner.close()
    return None, failure


def _profile(gpu, device):
    if gpu is None or gpu == "local":
        if device.type != "cuda":
            raise InputError("--vram plans for a CUDA GPU; this run's device is "
                             f"{device.type} (name a profile with --gpu to plan anyway)")
        return local_profile()
    return gpu_profile(gpu)


def generate_with_budget(spec, weights, budget_str: str, request, device, make_runner, log=print,
                         gpu: str | None = None, max_error: float | None = None, ram: str | float | None = None,
                         images: int | None = None, cached=None, recipes=None):
    """Plan for ``budget_str`` ('8GB' | 'auto' = free VRAM minus the reserve) and host RAM (``ram``, default this
    machine's), over ``images`` images (default the request's ``n``, else 1); run the chosen recipe with
    ``make_runner(recipe).generate(request)``; on out-of-memory free memory (outside the ``except``, references
    dropped, the failed recipe's dynamo settings restored) and try the next candidate with a smaller predicted
    peak of what ran out. ``recipes``: the candidates (default: the planner's). Returns (result, plan_record); the
    record is also stored as ``result.record['plan']``."""
    from .. import apply
    from ..recipe import Recipe

    budget = parse_size(budget_str)
    ram_gb = parse_size(ram, "--ram") if isinstance(ram, str) else ram
    # it runs here: this machine's RAM bounds it, whichever GPU profile the plan is for
    ram_gb, ram_source = (ram_gb, "--ram") if ram_gb is not None else (host_ram_gb(), "this machine's RAM")
    prof = _profile(gpu, device)
    if budget is None:  # the reserve (CUDA context, fragmentation) is part of the fit rule, not taken twice
        budget = prof.get("vram_free_gb") or prof["vram_gb"]
        log(f"vramfit: --vram auto = {budget:.2f} GB free; a candidate fits when peak x "
            f"{1 + calibration()['budget']['margin']:.2f} + {calibration()['budget']['reserve_gb']} GB <= that")
    n = images or getattr(request, "n", None) or 1
    shape = Shape(request.height, request.width, request.steps, 1, request.max_sequence_length, n)
    plan = make_plan(spec.name, shape, prof, budget, ram_gb, max_error=max_error, device_type=device.type,
                     weights_kind=weights.kind, here=True, cached=cached, ram_source=ram_source, recipes=recipes)
    fitting = [r for r in plan["candidates"] if r["status"] in ("chosen", "fits")]
    if not fitting:
        need = plan["min_vram_gb"]
        raise VramfitError(f"no recipe fits {budget:.2f} GB" + (f" and {plan['budget']['ram_gb']:.0f} GB host RAM"
                                                                  if plan["budget"]["ram_gb"] else "")
                           + f" on {prof['profile']}" + (f"; the smallest budget that works is {need:.2f} GB"
                                                         if need else ""))
    fallbacks, tried, row, failed, resource = [], set(), fitting[0], None, None
    while row is not None:
        tried.add(row["recipe"])
        p = row["predicted"]
        log(f"vramfit: {'planned' if failed is None else 'falling back to'} {_short(row['recipe'])} (predicted peak "
            f"{p['peak_vram_gb']:.2f} GB VRAM, {p['peak_host_gb']:.1f} GB host, {p['step_s']:.3f} s/step)")
        mark = apply.dynamo_mark()
        result, failure = _attempt(make_runner, Recipe.parse(row["recipe"]), request)
        if failure is None:
            return result, _record(plan, row, fitting, fallbacks, budget, prof, result)
        resource, msg = failure
        restored = apply.restore_dynamo_settings(mark)
        _free(device)
        fallbacks.append({"recipe": row["recipe"], "error": msg, "ran_out_of": resource,
                          "predicted_peak_vram_gb": p["peak_vram_gb"], "predicted_peak_host_gb": p["peak_host_gb"],
                          "dynamo_settings_restored": sorted(restored)})
        log(f"vramfit: out of {'GPU' if resource == 'vram' else 'host'} memory with {_short(row['recipe'])}: {msg}")
        failed = row
        row = next_candidate(fitting, tried, failed, resource)
    raise VramfitError("every fitting candidate with less " + ("GPU" if resource == "vram" else "host")
                       + " memory ran out of memory: "
                       + "; ".join(f"{_short(f['recipe'])}: {f['error']}" for f in fallbacks))


def _record(plan, row, fitting, fallbacks, budget, prof, result) -> dict:
    """The plan part of the run record: predicted beside measured, like with like -- the peak while generating
    (loading excluded) against the predicted generation peak."""
    record = {"budget_vram_gb": round(budget, 3), "budget_ram_gb": plan["budget"]["ram_gb"],
              "ram_source": plan["budget"]["ram_source"], "gpu": prof["profile"], "chosen": row["recipe"],
              "planned": fitting[0]["recipe"], "fallbacks": fallbacks, "predicted": row["predicted"],
              "images": plan["request"]["images"], "calibration": plan["calibration"]}
    rec = getattr(result, "record", None)
    if isinstance(rec, dict):
        mem, t = rec.get("memory", {}), rec.get("timings", {})
        record["measured"] = {
            "peak_vram_gb": mem.get("generate_peak_allocated_gb"),  # generation only: what peak_vram_gb predicts
            "peak_vram_incl_load_gb": mem.get("peak_allocated_gb"),
            "peak_host_gb": mem.get("host_peak_rss_gb"),
            "step_s": t.get("s_per_step_median"), "total_s": t.get("total_s")}
        rec["plan"] = record
    return record
