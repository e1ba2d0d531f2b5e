"""``plan --check``: predictions against measured rows (run records and bench rows), in sample and out of sample
(leave-one-out: the calibration refitted without the row, then the row predicted)."""

from __future__ import annotations

from dataclasses import replace

import json
import sys
from pathlib import Path

from .choice import _short
from .data import Shape, _realize, _stamp, calibration, find_gpu
from .estimate import predict
from .memory import modulation_hoisting, row_hoisted
from ..errors import InputError, RecipeError

def _row_record(row: dict) -> dict:
    return row.get("record", row)


BENCH_SCHEMA = "vramfit.bench/1"
RUN_SCHEMA = "vramfit.run/1"
TOLERANCE = {"peak": 0.10, "s/step": 0.25, "total": 0.25}


class _Skip(Exception):
    pass


def measured_row(row: dict) -> dict:
    """What a measured row says, in one shape for both schemas. Raises _Skip(reason) for rows that measured
    nothing comparable.

    * run records (``vramfit.run/1``, from ``generate`` / foundation.py): peak = the generation peak
      (``memory.generate_peak_allocated_gb``, else ``peak_allocated_gb``); s/step = the median step
      (``timings.s_per_step_median``); total = ``timings.total_s``; the run is cold when ``run_index`` is 1.
    * bench rows (``vramfit.bench/1``): peak = ``memory.peak_gb`` (max over runs of the generation peak; the load
      peak ``peak_incl_load_gb`` is not what the planner predicts); s/step = ``warm.s_per_step_median``, which is
      the median over warm runs of *denoise_s / steps* -- a mean step that includes the first step and any moves
      inside the denoise stage (model offload, staged loads) -- and total = ``warm.total_s_median``; rows with no
      warm run (the bf16 references) give the cold run's ``cold.s_per_step`` / ``cold.total_s``.
      ``role: reference`` rows are bf16 rows like any other (every one is checked: they repeat per shard, and
      their spread is the noise of the measurement). Rows with ``status`` other than ok are skipped.
    """
    from ..calibration.derive import _why_not, is_stream_row

    if is_stream_row(row):
        return _stream_measured(row, _why_not)
    if row.get("schema") == BENCH_SCHEMA:
        if row.get("status") != "ok":
            raise _Skip(f"status {row.get('status')} ({row.get('exit_reason')}): {str(row.get('error'))[:80]}")
        m, warm, cold = row.get("memory") or {}, row.get("warm") or {}, row.get("cold") or {}
        if m.get("peak_gb") is None:
            raise _Skip("no GPU memory measured")
        has_warm = bool(warm.get("n")) and warm.get("total_s_median") is not None
        rq = row.get("request", {})
        return {"label": row.get("scenario") or _short(row["recipe"]), "model": row["model"],
                "recipe": row["recipe"], "device": row.get("device", {}),
                "weights": row.get("weights", {}).get("kind", "hub"), "height": rq["height"], "width": rq["width"], "steps": row.get("steps", rq.get("steps")),
                "text_tokens": rq.get("max_sequence_length"), "peak": m["peak_gb"],
                "step": warm["s_per_step_median"] if has_warm else cold.get("s_per_step"),
                "total": warm["total_s_median"] if has_warm else cold.get("total_s"),
                "cold": not has_warm, "step_kind": "mean"}
    if row.get("error") or row.get("exit_code", 0) or "memory" not in row or "timings" not in row:
        raise _Skip(f"an error row ({str(row.get('error', 'no measurements'))[:80]})")
    t, m, rq = row["timings"], row["memory"], row["request"]
    median = t.get("s_per_step_median")
    return {"label": row.get("scenario") or _short(row["recipe"]), "model": row["model"], "recipe": row["recipe"],
            "device": row.get("device", {}), "weights": row.get("weights", {}).get("kind", "hub"),
            "height": rq["height"], "width": rq["width"], "steps": rq["steps"],
            "text_tokens": rq.get("max_sequence_length"),
            "peak": m.get("generate_peak_allocated_gb", m.get("peak_allocated_gb")),
            "step": median or t["s_per_step"], "total": t["total_s"], "cold": row.get("run_index", 1) == 1,
            "step_kind": "median" if median else "mean"}


def _stream_measured(row: dict, why_not) -> dict:
    """A benchmarks/device_stream.py row (offload=stream and the stock comparisons beside it): each scenario is the
    first generation of a fresh process (cold), s/step = the median step, peak = the generation peak."""
    kind = (row.get("scenario") or {}).get("kind")
    if kind not in ("run", "cli"):
        raise _Skip(f"a {kind or 'summary'} row (no recipe run)")
    why = why_not(row)
    if why:
        raise _Skip(why)
    if not row.get("timings") or not row.get("memory"):
        raise _Skip("no timings / memory in the row")
    from ..calibration.derive import stream_row_device, stream_row_steps_weights

    t, m = row["timings"], row["memory"]
    h, w = row.get("size") or [1024, 1024]
    steps, weights = stream_row_steps_weights(row)
    return {"label": row.get("name") or _short(row["recipe"]), "model": "flux-tiny" if row.get("smoke") else "flux-dev",
            "recipe": row["recipe"], "device": stream_row_device(row), "weights": weights, "height": h or 1024,
            "width": w or 1024, "steps": steps, "text_tokens": None,
            "peak": m.get("generate_peak_allocated_gb", m.get("peak_allocated_gb")),
            "step": t.get("s_per_step_median") or t["s_per_step"], "total": t["total_s"], "cold": True,
            "step_kind": "median" if t.get("s_per_step_median") else "mean",
            "host": (row.get("host_peak_rss_gb") or m.get("host_peak_rss_gb"), (m.get("after_load") or {}).get("rss_gb"))}


def predicted_for(meas: dict, pred: dict, steps: int) -> dict:
    """The prediction of what the row measured: a median step is ``step_s``; a mean step is the denoise stage
    over the steps (+ the cold start, for a cold run); the total is the per-image time (+ the cold start)."""
    cold = pred["cold_s"] if meas["cold"] else 0.0
    pl = calibration()["pipeline"]
    # of the cold start, the encode and decode parts fall outside the denoise stage
    cold_denoise = max(cold - pl.get("encode_cold_extra_s", 0.0) - pl.get("decode_cold_extra_s", 0.0), 0.0) if cold else 0.0
    step = pred["step_s"] if meas["step_kind"] == "median" else (pred["denoise_s"] + cold_denoise) / steps
    return {"peak": pred["peak_vram_gb"], "s/step": step, "total": pred["warm_s"] + cold}


# commit 926a78c (vae_decode=tiling splits a native-size image: 512 px tiles for FLUX) landed at this time; a row
# stamped later ran with it even where it kept no manifest (benchmarks/device_stream.py rows before 2026-12-02)
TILING_FIX_UTC = "2026-12-01T23:49:57Z"




def as_ran(row: dict, recipe, meas: dict):
    """The recipe as the row's run really executed it. Before 2026-12-01 (session 4), ``vae_decode=tiling`` used
    diffusers' default tile, the VAE's native size, so an image no larger than that was decoded in one piece; such a
    run's manifest has no ``tile_px`` in its vae step, and it is predicted as ``vae_decode=none``. A row without a
    manifest is judged by when it was measured (``TILING_FIX_UTC``)."""
    from .. import models

    if getattr(recipe, "vae_decode", "none") != "tiling":
        return recipe
    vae_steps = [s for s in row.get("manifest") or [] if isinstance(s, dict) and s.get("step") == "vae"]
    if any("tile_px" in s for s in vae_steps):
        return recipe
    stamp = _stamp(row)
    if not row.get("manifest") and stamp is not None and stamp > TILING_FIX_UTC:
        return recipe
    native = models.get_model(meas["model"]).config("vae").get("sample_size", 1024)
    if max(meas["height"], meas["width"]) <= native:
        return replace(recipe, vae_decode="none")
    return recipe


def compare_row(row: dict) -> dict:
    """One measured row against its prediction: {label, pairs: {what: (predicted, measured, tolerance)}, errs,
    ok, steps, basis}. Raises _Skip for rows without a comparable measurement."""
    from .. import models
    from ..recipe import Recipe

    meas = measured_row(row)
    dev = meas["device"] or {}
    g = find_gpu(dev.get("name", "")) if dev.get("type") == "cuda" else None
    if g is None:
        raise _Skip(f"no GPU profile for device {dev.get('name', dev.get('type'))!r}")
    try:
        tokens = meas["text_tokens"] or models.get_model(meas["model"]).max_sequence_length
        shape = Shape(meas["height"], meas["width"], meas["steps"], 1, tokens)
        with modulation_hoisting(row_hoisted(row)):  # rows before 2026-12-04 streamed it with its block
            pred = predict(meas["model"], as_ran(row, Recipe.parse(meas["recipe"]), meas), shape, _realize(g),
                           meas["weights"])
    except (RecipeError, InputError) as e:
        raise _Skip(f"cannot predict ({e})")
    p = predicted_for(meas, pred, shape.steps)
    pairs = {"peak": (p["peak"], meas["peak"], TOLERANCE["peak"]),
             "s/step": (p["s/step"], meas["step"], TOLERANCE["s/step"]),
             "total": (p["total"], meas["total"], TOLERANCE["total"])}
    errs = {k: (a - b) / b for k, (a, b, _) in pairs.items()}
    # a run of fewer steps than the model's default is mostly fixed costs (cold start, encode, decode): its total
    # says little about the model and is shown, not held to the tolerance; its s/step still is
    checked = ["peak", "s/step"] + (["total"] if shape.steps >= models.get_model(meas["model"]).default_steps else [])
    ok = all(abs(errs[k]) <= pairs[k][2] for k in checked)
    basis = ("cold" if meas["cold"] else "warm") + (" median" if meas["step_kind"] == "median" else " mean")
    out = {"label": meas["label"], "pairs": pairs, "errs": errs, "ok": ok, "steps": shape.steps, "basis": basis,
           "checked": checked}
    if meas.get("host"):
        out["host"] = (pred["peak_host_gb"], *meas["host"])
    return out




# ----------------------------------------------------------------------------------------------------------
# out of sample: leave one out


def _key(row: dict) -> str:
    return json.dumps({k: v for k, v in row.items() if not k.startswith("_")}, sort_keys=True, default=str)


class LeaveOneOut:
    """Refits the calibration without one row at a time (``vramfit.calibration.derive``, the fit that wrote the
    committed file, over the files it names) and predicts that row. A row the fit never read is out of sample
    already: its out-of-sample prediction is the in-sample one."""

    def __init__(self):
        from ..calibration import derive

        self.derive = derive
        self.files = derive.source_files(calibration())
        self.rows = derive.read(self.files) if self.files else []
        self.index = {_key(r): i for i, r in enumerate(self.rows)}

    def available(self) -> str | None:
        return None if self.rows else "the fitting rows (benchmarks/results) are not here: run from a checkout"

    def compare(self, row: dict) -> tuple[dict, bool]:
        """(the row compared with a prediction from a calibration fitted without it, whether a refit was needed)."""
        from .data import using_calibration

        i = self.index.get(_key(row))
        if i is not None and self.derive.is_stream_row(row) and not self.derive.stream_rows([row])[1]:
            i = None  # a device_stream row the fit does not use (stock comparison, resident run): out of sample as is
        if i is None:
            return compare_row(row), False
        rest = [dict(r) for j, r in enumerate(self.rows) if j != i]
        try:
            cal = self.derive.derive(rest, quiet=True)
        except (IndexError, ValueError, ZeroDivisionError) as e:  # the only row that measures some constant
            raise _Skip(f"out of sample: the fit cannot do without this row (it alone measures a constant: "
                        f"{type(e).__name__})")
        with using_calibration(cal):
            return compare_row(row), True


def _read_rows(paths: list) -> tuple[list, list]:
    """[(where, label, row)] of every JSON line of the files, and notes for lines that are not JSON."""
    rows, notes = [], []
    for one in paths:
        p = Path(one)
        if not p.is_file():
            raise InputError(f"--check {one!r}: no such file")
        where = f"{p.name}:" if len(paths) > 1 else "line "
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = _row_record(json.loads(line))
            except json.JSONDecodeError as e:
                notes.append(f"{where}{n}: not JSON ({e})")
                continue
            sc = row.get("scenario")  # device_stream rows: a dict, named by "name"
            label = (row.get("name") or sc.get("name")) if isinstance(sc, dict) else sc
            rows.append((f"{where}{n}", label or row.get("recipe", f"line {n}"), row))
    return rows, notes


def _cells(r: dict) -> str:
    return "".join(f"{r['pairs'][k][0]:>9.3f}/{r['pairs'][k][1]:<8.3f}{r['errs'][k]:>+7.1%}"
                   + ("" if k in r["checked"] else "~") for k in ("peak", "s/step", "total"))


def _bad(r: dict) -> list:
    return [k for k in r["checked"] if abs(r["errs"][k]) > TOLERANCE[k]]


def _summary(results: list, what: str, file) -> list:
    worst = {k: max((r for r in results if k in r["checked"]), key=lambda r: abs(r["errs"][k]), default=None)
             for k in ("peak", "s/step", "total")}
    print(f"{what} worst: " + "; ".join(f"{k} {w['errs'][k]:+.1%} ({w['label']})" for k, w in worst.items() if w),
          file=file)
    bad = [r["label"] for r in results if not r["ok"]]
    print(f"{what}: {len(results) - len(bad)}/{len(results)} rows within bounds"
          + (f"; out: {', '.join(bad)}" if bad else ""), file=file)
    return bad


def check_rows(path: str | list, file=None, out_of_sample: bool = True) -> int:
    """Predictions vs measured rows of one or more JSONL files (run records and bench rows, mixed freely): in
    sample (the committed calibration, fitted with these rows where they are fitting rows) and out of sample
    (leave-one-out refits). Exit status 1 when a row is out of bounds in either."""
    file = file or sys.stdout
    rows, notes = _read_rows([path] if isinstance(path, str) else list(path))
    loo = LeaveOneOut() if out_of_sample else None
    if loo is not None and loo.available():
        notes.append(f"out of sample not computed: {loo.available()}")
        loo = None
    ins, oos = [], []
    for where, label, row in rows:
        try:
            ins.append(compare_row(row))
            if loo is not None:
                try:
                    r, refit = loo.compare(row)
                    r["refit"] = refit
                    oos.append(r)
                except _Skip as e:
                    notes.append(f"{where} ({label}): {e}")
        except _Skip as e:
            notes.append(f"{where} ({label}): skipped, {e}")
        except (KeyError, TypeError) as e:
            notes.append(f"{where} ({label}): skipped, not a measured row (missing {e})")
    head = "".join(f"{h:>24}{'err':>7}" for h in ("peak VRAM GB pred/meas", "s/step pred/meas", "total s pred/meas"))
    for what, results in (("in sample", ins), ("out of sample", oos)):
        if not results:
            continue
        print(f"{what}:\n{'row':<36}{'steps':>5} {'basis':<12}{head}  ok (+-10% VRAM, +-25% latency)", file=file)
        for r in results:
            bad = _bad(r)
            tag = "" if what == "in sample" else ("  (refit without it)" if r.get("refit") else "  (not a fitting row)")
            print(f"{r['label'][:36]:<36}{r['steps']:>5} {r['basis']:<12}{_cells(r)}  "
                  f"{'ok' if not bad else 'OUT OF BOUNDS (' + ', '.join(bad) + ')'}{tag}", file=file)
    hosts = [r for r in ins if r.get("host")]
    if hosts:
        print("host RAM GB (shown, not checked: the measured peak includes building the random stand-in and "
              "quantizing it in host memory; after load is what the run then holds):", file=file)
        for r in hosts:
            pred, peak, after = r["host"]
            print(f"  {r['label'][:36]:<36} predicted {pred:6.1f}  measured peak {peak or float('nan'):6.1f}  "
                  f"after load {after or float('nan'):6.1f}", file=file)
    for note in notes:
        print("note: " + note, file=file)
    if not ins:
        print("no comparable rows", file=file)
        return 1
    print("basis: warm = a warm run (bench: median of the warm runs), cold = the process's first run (cold start "
          "included); median = median step, mean = denoise stage / steps (bench rows: includes the first step "
          "and moves inside denoise)", file=file)
    unchecked = [r for r in ins if "total" not in r["checked"]]
    if unchecked:
        print("~ = shown, not checked: rows with fewer steps than the model's default are mostly fixed costs (cold "
              "start, encode, decode), so their total is not held to +-25 %; their peak and s/step are", file=file)
        w = max(unchecked, key=lambda r: abs(r["errs"]["total"]))
        print(f"largest unchecked (~) total error: {w['errs']['total']:+.1%} ({w['label']}, {w['steps']} steps, "
              f"{w['basis']})", file=file)
    bad = _summary(ins, "in sample", file)
    if oos:
        bad += _summary(oos, "out of sample", file)
    return 1 if bad else 0
