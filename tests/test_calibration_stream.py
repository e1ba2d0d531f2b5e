"""offload=stream in the calibration: benchmarks/device_stream.py rows read by the derivation (committed rows without
a schema and new rows with ``vramfit.stream/1``), error rows skipped with their reason, stream recipes marked
measured only where a row measured their backend and regime, and ``plan --check`` leave-one-out refits that leave
the judged stream row out (CPU only; synthetic copies of the committed rows in tmp dirs; no timing asserted)."""

from __future__ import annotations

from dataclasses import replace

import json
import statistics
from pathlib import Path

import pytest

from vramfit import plan
from vramfit.calibration import derive
from vramfit.recipe import Recipe

ROOT = Path(__file__).resolve().parent.parent
H200 = ROOT / "benchmarks" / "results"
FIT_FILES = sorted(str(p) for p in (H200 / "2026-11-21-h200").glob("*.jsonl"))  # everything but the stream rows
STREAM = H200 / "2026-12-01-h200" / "stream-call3.jsonl"


def _committed():
    rows = [json.loads(x) for x in STREAM.read_text().splitlines() if x.strip()]
    return {r["name"]: r for r in rows}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A calibration derived from the 2026-11-21 rows plus a tmp stream file: the committed link row, the bf16
    stream:0 row as committed (no schema), the int8 K=11 row rewritten the new way (schema, no command line), and
    an OOM row."""
    c = _committed()
    int8 = {k: v for k, v in c["sweep-int8-8GB"].items() if k != "command"}
    int8["schema"] = derive.STREAM_SCHEMA
    oom = {"name": "nf4-stream-3GB", "scenario": {"name": "nf4-stream-3GB", "kind": "run",
                                                  "recipe": "transformer=bnb-nf4,offload=stream"},
           "command": "device_stream.py --budget-s 1", "smoke": False,
           "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 512.00 MiB."}
    f = tmp_path_factory.mktemp("stream") / "stream.jsonl"
    rows = [c["link"], c["bf16-stream-k0"], int8, oom, c["stock-bf16-group-leaf"]]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = FIT_FILES + [str(f)]
    return {"cal": derive.derive(derive.read(files)), "files": files, "rows": rows}


def test_stream_rows_are_read_and_error_rows_skipped_with_their_reason(fitted):
    st = fitted["cal"]["stream"]
    assert [(r["scenario"], r["transformer"], r["k"], r["regime"]) for r in st["rows"]] == [
        ("bf16-stream-k0", "bf16", 0, "link"), ("sweep-int8-8GB", "torchao-int8wo", 11, "compute")]
    assert st["source"].startswith("measured")
    assert st["pinned_gbps_measured"] == fitted["rows"][0]["registered_gb_s"]
    (skip,) = st["skipped"]  # the OOM row; the stock group-leaf row is not a stream row
    assert skip["scenario"] == "nf4-stream-3GB" and skip["reason"].startswith("OutOfMemoryError")
    assert "nf4-stream-3GB (OutOfMemoryError" in fitted["cal"]["source"]["summary"]
    # the link use is the executor's own measured copy rate over the probe's pinned rate
    rates = [r["stream_measured"]["transformer"]["link_gb_s"] for r in fitted["rows"][1:3]]
    ref = fitted["cal"]["reference_gpu"]["h2d_pinned_gbps"]
    assert st["link_fraction_of_pinned"] == pytest.approx(statistics.median(rates) / ref, abs=1e-3)


def test_measured_backend_and_regime_marked_measured_the_rest_assumed(fitted):
    h200, shape = plan.gpu_profile("h200"), plan.Shape()
    with plan.using_calibration(fitted["cal"]):
        bf16 = plan.predict("flux-dev", Recipe.parse("offload=stream:0"), shape, h200)
        nf4 = plan.predict("flux-dev", Recipe.parse("transformer=bnb-nf4,text_encoder_2=bnb-nf4,offload=stream:0"),
                           shape, h200)
    assert not [a for a in bf16["unmeasured"] if "offload=stream" in a]
    assert any("transformer=bnb-nf4" in a and "never measured" in a for a in nf4["unmeasured"])
    # without stream rows every stream recipe rests on the assumed constants
    bare = {**fitted["cal"], "stream": dict(plan.data.STREAM_ASSUMED)}
    with plan.using_calibration(bare):
        p = plan.predict("flux-dev", Recipe.parse("offload=stream:0"), shape, h200)
    assert any("not measured yet" in a for a in p["unmeasured"])


def test_k_for_a_budget_and_the_step_come_from_the_measured_figures(fitted):
    """The measured int8 row ran K=11 under an 8 GB cap and held it; the planner gives that K for 8 GB, and its
    step at that K is max(compute, streamed bytes / measured link) + the measured per-block cost x blocks."""
    h200 = plan.gpu_profile("h200")
    st = fitted["cal"]["stream"]
    row = next(r for r in st["rows"] if r["k"] == 11)
    # the run predates real tiling at 1024x1024 (BENCHMARKS.md 7d): its "vae_decode=tiling" decoded in one piece
    r = replace(Recipe.parse(row["recipe"]), vae_decode="none")
    shape = plan.Shape(row["height"], row["width"], row["steps"])
    with plan.using_calibration(fitted["cal"]):
        k = plan.stream_k("flux-dev", r, shape, row["cap_gb"] * 1e9)
        # the row ran on the random stand-in (quantized block by block: no checkpoint load peak)
        pred = plan.predict("flux-dev", r, shape, h200, weights_kind="random")
        assert k == row["k"] and plan.fits_gb(pred["peak_vram_gb"]) <= row["cap_gb"]
        _, blocks = plan.stream_split("flux-dev", r, k)["transformer"]
        assert len(blocks) == row["streamed_blocks"]
        compute = plan.latency.compute_step("flux-dev", r, shape, h200, [])
        link = h200["h2d_pinned_gbps"] * st["link_fraction_of_pinned"] * 1e9
        step = plan.predict("flux-dev", r, shape, h200)["step_s"]
    assert step == pytest.approx(max(compute, sum(blocks) / link) + st["per_block_s"] * len(blocks), abs=1e-4)


def test_check_out_of_sample_leaves_the_judged_stream_row_out(fitted, monkeypatch):
    loo = plan.LeaveOneOut()
    loo.files, loo.rows = fitted["files"], derive.read(fitted["files"])
    loo.index = {plan.check._key(r): i for i, r in enumerate(loo.rows)}
    seen = []
    real = derive.derive

    def spy(rows, quiet=False):
        seen.append([r.get("name") for r in rows if derive.is_stream_row(r)])
        return real(rows, quiet=quiet)

    monkeypatch.setattr(loo.derive, "derive", spy)
    bf16, stock = fitted["rows"][1], fitted["rows"][4]
    with plan.using_calibration(fitted["cal"]):
        inside = plan.compare_row(bf16)
    out, refit = loo.compare(bf16)
    assert refit and seen == [["link", "sweep-int8-8GB", "nf4-stream-3GB", "stock-bf16-group-leaf"]]
    assert out["pairs"]["s/step"][1] == inside["pairs"]["s/step"][1]  # the same measurement ...
    assert out["pairs"]["s/step"][0] != inside["pairs"]["s/step"][0]  # ... predicted without its own row
    res, refit = loo.compare(stock)  # a stock comparison in a stream file: not a fitting row, no refit
    assert not refit and len(seen) == 1 and res["label"] == "stock-bf16-group-leaf"


def test_tiling_as_ran_follows_the_manifest_or_the_time_a_manifestless_row_was_measured():
    """vae_decode=tiling split a native-size image only from commit 926a78c on: a row whose manifest has tile_px,
    or a manifestless device_stream row measured after that commit, is predicted tiled; older ones untiled."""
    from vramfit.plan import check

    r = Recipe.parse("transformer=bnb-nf4,offload=stream:4,vae_decode=tiling")
    meas = {"model": "flux-dev", "height": 1024, "width": 1024}
    after = {"command": "device_stream.py --budget-s 470 @ 2026-12-02T01:26:40Z"}
    before = {"command": "device_stream.py --budget-s 600 @ 2026-12-01T20:01:00Z"}
    assert check.as_ran(after, r, meas).vae_decode == "tiling"
    assert check.as_ran(before, r, meas).vae_decode == "none"
    assert check.as_ran({"at": "2026-12-02T01:00:00Z", "manifest": [{"step": "vae"}]}, r, meas).vae_decode == "none"
    assert check.as_ran({"manifest": [{"step": "vae", "tile_px": 512}]}, r, meas).vae_decode == "tiling"
    assert check.as_ran({}, r, {**meas, "height": 2048}).vae_decode == "tiling"  # larger than native: split anyway


def test_generate_rows_without_a_device_field_are_checked_by_their_cuda_cap():
    """The committed `generate --vram` rows of 2026-12-02 (kind cli) kept no device field: a CUDA memory cap and the
    plan's probed GPU say where they ran, and steps / weights come from their argv. A smoke cli row stays out."""
    from vramfit.plan.check import _stream_measured

    path = H200 / "2026-12-02-h200-s7" / "stream-s7-calls1-4.jsonl"
    rows = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if "timings" in r:
            rows[r["name"]] = r
    g3, gdir = rows["generate-3GB"], rows["generate-3GB-dir"]
    assert "device" not in g3
    assert derive.stream_row_device(g3)["type"] == "cuda" and derive.stream_row_device(g3)["name"] == "NVIDIA H200"
    m = _stream_measured(g3, derive._why_not)
    assert (m["steps"], m["weights"], m["device"]["type"]) == (28, "random", "cuda")
    assert _stream_measured(gdir, derive._why_not)["weights"] == "hub"  # --weights DIR: the checkpoint path
    assert _stream_measured(rows["generate-8GB"], derive._why_not)["steps"] == 6
    smoke = {**g3, "smoke": True}
    assert derive._why_not(smoke) == "smoke row (flux-tiny on CPU)"
    uncapped = {k: v for k, v in g3.items() if k != "cap_fraction"}
    assert derive._why_not(uncapped) == "not measured on a GPU"
    assert derive.stream_row_device({**g3, "device": {"type": "cuda", "name": "X"}})["name"] == "X"


def test_the_derivation_reads_every_committed_result_file_and_the_committed_fit_is_reproduced():
    """``benchmarks/derive_calibration.py`` with no arguments reads every results file (it stopped at a
    ``compile=regional+graphs`` row that was stopped from outside: KeyError), and the committed calibration is
    exactly the fit over the files it names, so ``plan --check``'s leave-one-out refits start from it."""
    import glob

    every = derive.derive(derive.read(sorted(glob.glob(str(H200 / "*" / "*.jsonl")))), quiet=True)
    assert every["stream"]["rows"] and every["compile"]["regional"]["step_factor"] > 0
    cal = plan.calibration()
    assert derive.derive(derive.read(derive.source_files(cal)), quiet=True) == cal


def test_plan_check_predicts_the_per_tensor_fp8_row(tmp_path):
    """`plan --check` over session 15's speed rows stopped with ValueError('torchao-fp8dq-tensor'): the planner had
    no weight layout for per-tensor fp8. Now the row is predicted (as torchao-fp8dq's twin until it has its own fit)
    and lands within bounds; per-tensor stores one scale per weight where per-row stores one per output row."""
    import io
    import json

    from vramfit.plan.check import check_rows

    src = H200 / "2026-12-04-h200-s15" / "speed-call2.jsonl"
    row = next(r for r in map(json.loads, src.read_text().splitlines()) if r["scenario"] == "fp8-tensor")
    f = tmp_path / "one.jsonl"
    f.write_text(json.dumps(row) + "\n")
    out = io.StringIO()
    assert check_rows(str(f), file=out, out_of_sample=False) == 0
    line = next(x for x in out.getvalue().splitlines() if x.startswith("fp8-tensor"))
    assert line.rstrip().endswith("ok")
    per_row, per_tensor = (plan.layout("flux-dev", "transformer", v).total
                           for v in ("torchao-fp8dq", "torchao-fp8dq-tensor"))
    assert 0 < per_row - per_tensor < 0.01 * per_row
