"""vramfit report on hand-made bench rows (no model runs): offline HTML, sortable table data, PNGs, blind test."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vramfit import report
from vramfit.bench import ROW_SCHEMA, append_row
from vramfit.errors import InputError


def row(name, *, peak, step, psnr=30.0, role="scenario", status="ok", seed=0, image=None, **extra) -> dict:
    r = {"schema": ROW_SCHEMA, "scenario": name, "role": role, "status": status, "exit_reason": None, "error": None,
         "model": "flux-dev", "weights": {"kind": "random", "seed": 0}, "recipe": f"recipe-of-{name}",
         "recipe_requested": name, "request": {"prompt": "a fox", "height": 512, "width": 512, "seeds": [seed]},
         "steps": 28, "steps_reduced": False, "device": {"type": "cuda", "name": "NVIDIA H200"},
         "versions": {"torch": "2.11.0", "diffusers": "0.42.1"}, "weight_gb_total": peak - 1, "load_s": 12.0,
         "memory": {"gpu": True, "after_load_gb": peak - 2, "after_load_reserved_gb": peak - 1.5, "peak_gb": peak,
                    "peak_reserved_gb": peak + 1, "host_peak_rss_gb": 2.0},
         "cold": {"total_s": step * 30, "compile_s": None, "s_per_step": step},
         "warm": {"n": 2, "total_s_median": step * 28, "total_s_p90": step * 29, "s_per_step_median": step},
         "fidelity": {"psnr_db": None if psnr == float("inf") else psnr, "ssim": 0.9, "latent_rel_l2": 0.01,
                      "images_identical": psnr == float("inf")},
         "images": {str(seed): image} if image else {}}
    if status != "ok":
        r.update(exit_reason="oom", error="OutOfMemoryError: CUDA out of memory", memory=None, cold=None, warm=None,
                 fidelity=None)
    r.update(extra)
    return r


@pytest.fixture()
def results(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    rows = []
    specs = [("bf16", 36.0, 0.18, float("inf")), ("nf4", 9.0, 0.19, 31.0), ("fp8", 17.0, 0.21, 40.0),
             ("slow-big", 40.0, 0.5, 35.0), ("seq-offload", 2.6, 3.6, float("inf"))]
    for name, peak, step, psnr in specs:
        img = f"images/{name}-s0.png"
        Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(tmp_path / img)
        role = "reference" if name == "bf16" else "scenario"
        rows.append(row(name, peak=peak, step=step, psnr=psnr, image=img, role=role))
    rows.append(row("int8-offload", peak=0, step=0, status="error"))
    rows.append(row("nf4", peak=8.0, step=0.2, psnr=31.0, image="images/nf4-s0.png"))  # rerun: the last row counts
    for r in rows:
        append_row(tmp_path / "results.jsonl", r)
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write('{"schema": "vramfit.bench/1", "scen')  # a torn last line from a killed bench is ignored
    return tmp_path / "results.jsonl"


def embedded(html: str, element_id: str):
    m = re.search(rf'<script type="application/json" id="{element_id}">(.*?)</script>', html, re.S)
    return json.loads(m.group(1).replace("<\\/", "</"))


def test_report_is_offline_and_complete(results, tmp_path):
    out = tmp_path / "rep"
    p = subprocess.run([sys.executable, "-m", "vramfit", "report", str(results), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["rows"] == 6
    for name in ("index.html", "blind.html", "memory_latency.png", "bars.png", "grid.png"):
        assert (out / name).is_file(), name
    for name in ("memory_latency.png", "bars.png", "grid.png"):
        assert Image.open(out / name).format == "PNG"
    for page in ("index.html", "blind.html"):
        html = (out / page).read_text()
        # nothing is fetched when the page opens: no external src/href, no stylesheet or script files
        assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", html, re.I), page
        assert "<link" not in html and not re.search(r"<script[^>]*\bsrc=", html) and "@import" not in html
        assert "http://" not in html and "https://" not in html
    html = (out / "index.html").read_text()
    assert html.count('src="data:image/png;base64,') == 3  # scatter, bars, grid embedded
    assert "random stand-in" in html and "NVIDIA H200" in html and "torch 2.11.0" in html
    assert html.count("measured more than once") == 1
    assert "1 scenario(s) measured more than once; the last row of each is shown: nf4 (2x)" in html
    assert "1 torn line(s) skipped" in html


def test_report_opens_with_chart_and_pareto_table(results, tmp_path):
    report.make_report([results], tmp_path / "rep")
    html = (tmp_path / "rep" / "index.html").read_text()
    body = html[html.index("<body>"):]
    order = [body.index(x) for x in ('<div id="chart">', '<table id="pareto">', 'id="summary"', "<h2>Provenance")]
    assert order == sorted(order), order  # chart, then the Pareto table, then the rest
    pareto_table = body[body.index('<table id="pareto">'):body.index("</table>", body.index('<table id="pareto">'))]
    # front by latency: bf16 (0.18 s, 36 GB), nf4 (rerun row: 0.2 s, 8 GB), seq-offload (3.6 s, 2.6 GB);
    # fp8 (0.21 s, 17 GB) and slow-big are beaten on both axes
    names = re.findall(r"<tr><td class=\"\">([^<]+)</td>", pareto_table)
    assert names == ["bf16", "nf4", "seq-offload"], names
    md = (tmp_path / "rep" / "results.md").read_text()
    assert md.index("## Pareto front") < md.index("## All rows") and md.count("measured more than once") == 1


def test_table_data_has_every_row_and_error(results, tmp_path):
    report.make_report([results], tmp_path / "rep")
    html = (tmp_path / "rep" / "index.html").read_text()
    data = {d["scenario"]: d for d in embedded(html, "rows")}
    cols = [c[0] for c in embedded(html, "cols")]
    assert set(data) == {"bf16", "nf4", "fp8", "slow-big", "seq-offload", "int8-offload"}
    assert data["int8-offload"]["status"] == "oom" and "out of memory" in data["int8-offload"]["error"]
    assert data["nf4"]["peak_gb"] == 8.0  # the later row
    assert data["bf16"]["psnr_db"] == "inf"  # identical image, sorts above every number
    for key in ("load_s", "after_load_gb", "after_load_reserved_gb", "peak_gb", "peak_reserved_gb", "compile_s",
                "warm_s", "warm_p90_s", "s_per_step", "psnr_db", "ssim", "latent_rel_l2", "error"):
        assert key in cols


def test_pareto_front():
    # (latency, memory, id): 1 is fastest, 3 is smallest, 2 is between, 4 is beaten by 2 on both
    pts = [(0.18, 36.0, 1), (0.21, 17.0, 2), (3.6, 2.6, 3), (0.5, 40.0, 4), (0.19, 9.0, 5)]
    assert report.pareto(pts) == [1, 5, 3]
    assert report.pareto([(1.0, 1.0, 0)]) == [0]


def test_grid_stays_small_and_blind_page_hides_then_reveals(results, tmp_path, monkeypatch):
    report.make_report([results], tmp_path / "full")
    full = tmp_path / "full" / "grid.png"
    assert 400_000 < full.stat().st_size < report.GRID_MAX_BYTES  # noise thumbnails hardly compress
    monkeypatch.setattr(report, "GRID_MAX_BYTES", 400_000)
    report.make_report([results], tmp_path / "rep")
    grid = tmp_path / "rep" / "grid.png"
    assert grid.stat().st_size < 400_000  # the thumbnails shrank until it fit
    assert Image.open(grid).height < Image.open(full).height
    blind = (tmp_path / "rep" / "blind.html").read_text()
    cards = embedded(blind, "cards")
    assert len(cards) == 5  # every measured image of the prompt/seed, the error row has none
    assert all(c["src"].startswith("data:image/png;base64,") for c in cards)
    assert sorted(re.search(r"<b>(.*?)</b>", c["label"]).group(1) for c in cards) == sorted(
        ["bf16", "nf4", "fp8", "slow-big", "seq-offload"])
    # names appear only inside the cards' labels (revealed by the script on click), never as visible text
    visible = re.sub(r'<script type="application/json" id="cards">.*?</script>', "", blind, flags=re.S)
    assert "slow-big" not in visible and "Math.random" in blind


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="no such results file"):
        report.make_report([tmp_path / "missing.jsonl"], tmp_path / "rep")
    (tmp_path / "other.jsonl").write_text('{"schema": "vramfit.run/1", "scenario": "x"}\n')
    with pytest.raises(InputError, match="expected vramfit.bench/1"):
        report.make_report([tmp_path / "other.jsonl"], tmp_path / "rep")


def test_chart_labels_do_not_overlap_and_keep_the_front():
    from vramfit import report

    plt = report._plt()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.set_xscale("log")
    ax.set_xlim(0.1, 5)
    ax.set_ylim(0, 40)
    crowd = [(f"scenario-{k}", 0.2 + 0.001 * k, 20.0 + 0.01 * k, k < 2) for k in range(12)]  # 12 on one spot
    lone = [("far-away", 3.0, 5.0, False), ("at-the-right-edge-with-a-long-name", 4.9, 30.0, False)]
    placed, hidden = report.place_labels(fig, ax, crowd + lone)
    renderer = fig.canvas.get_renderer()
    boxes = [a.get_window_extent(renderer) for a in placed]
    assert all(not boxes[i].overlaps(boxes[j]) for i in range(len(boxes)) for j in range(i))
    frame = ax.get_window_extent(renderer)
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 for b in boxes)  # none cut off at the edges
    names = [a.get_text() for a in placed]
    assert {"scenario-0", "scenario-1", "far-away", "at-the-right-edge-with-a-long-name"} <= set(names)
    assert hidden == 14 - len(placed) and hidden > 0
    plt.close(fig)


def _stream_row(name, recipe, s, peak, cap=None, budget=None, value=None, host=None, stored=(2.0, 8e9), k=None):
    row = {"schema": "vramfit.stream/1", "name": name, "recipe": recipe, "cap_gb": cap,
           "timings": {"s_per_step_median": s}, "memory": {"peak_reserved_gb": peak, "host_peak_rss_gb": host},
           "weight_gb_total": stored[0], "device": {"type": "cuda", "name": "NVIDIA H200"},
           "offload": {"k": k, "pinned_host_bytes": stored[1]} if k is not None else {}}
    if budget is not None:
        row["scenario"] = {"value": value, "budget_gb": budget}
    return row


def test_stream_sweep_section_compares_each_budget_with_the_fastest_stock_row_that_fits(tmp_path):
    from vramfit import stream_report

    nf4 = "transformer=bnb-nf4,text_encoder_2=bnb-nf4"
    rows = [
        _stream_row("sweep-nf4-3GB", f"{nf4},offload=stream:4", 0.205, 2.9, cap=3, budget=3, value="nf4", host=11.0,
                    k=4),
        _stream_row("sweep-nf4-8GB", f"{nf4},offload=stream:30", 0.19, 7.5, cap=8, budget=8, value="nf4", host=16.5,
                    k=30),
        _stream_row("stock-nf4-model", f"{nf4},offload=model", 0.30, 7.3, cap=8),  # fits 8 GB, not 3 GB
        _stream_row("stock-nf4-group", f"{nf4},offload=group-leaf", 0.45, 2.6, cap=3),  # fits both, slower
        _stream_row("nf4-resident", nf4, 0.185, 14.0),  # uncapped: fits by its measured peak only (>= 14 GB)
        {"schema": "vramfit.stream/1", "name": "sweep-nf4-4GB", "skipped": "left out"},
        {"schema": "vramfit.stream/1", "name": "sweep-nf4-12GB", "error": "OutOfMemoryError"},
    ]
    table = stream_report.sweep_table(rows)
    assert [(e["budget_gb"], e["stock"]) for e in table] == [(3.0, "stock-nf4-group"), (8.0, "stock-nf4-model")]
    assert table[0]["ratio"] == round(0.45 / 0.205, 2) and table[1]["ratio"] == round(0.30 / 0.19, 2)
    # host goal: 1.15 x (2 GB on the GPU + 8 GB pinned) + 2 GB = 13.5 GB
    assert table[0]["host_goal_gb"] == 13.5 and table[0]["host_ok"] is True and table[1]["host_ok"] is False
    results = tmp_path / "stream.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = report.make_report([results], tmp_path / "rep")
    assert "stream_sweep.png" in summary["files"] and (tmp_path / "rep" / "stream_sweep.png").stat().st_size > 0
    page = (tmp_path / "rep" / "index.html").read_text()
    assert 'id="stream-sweep"' in page and "stock-nf4-group" in page and "NVIDIA H200" in page
    md = (tmp_path / "rep" / "results.md").read_text()
    assert "| nf4 | 8 | 30 | 0.19 | 7.5 | stock-nf4-model | 0.3 | 1.58 |" in md


def test_stream_sweep_takes_checkpoint_loader_rows_as_uncapped_stock_and_capped_headline_rows_as_points():
    from vramfit import stream_report

    nf4 = "transformer=bnb-nf4,text_encoder_2=bnb-nf4"
    headline = _stream_row("nf4-stream-3GB", f"{nf4},offload=stream:4", 0.205, 2.9, cap=3, k=4)  # no "sweep-" name
    sweep8 = _stream_row("sweep-nf4-8GB", f"{nf4},offload=stream:30", 0.19, 7.5, cap=8, budget=8, value="nf4", k=30)
    loader = {"at": "2026-12-02T01:30:00Z", "kind": "generate", "status": "ok", "name": "nf4", "offload": "model",
              "weights": "dir", "recipe_run": f"{nf4},offload=model", "s_per_step_median": 0.19,
              "peak_gb": 7.0, "peak_reserved_gb": 7.6}
    too_big = {**loader, "weights": "random", "s_per_step_median": 0.18, "peak_reserved_gb": 11.2}
    export = {"at": "2026-12-02T01:18:42Z", "kind": "export", "status": "ok"}
    assert stream_report.is_loader_row(loader) and stream_report.is_loader_row(export)
    assert not stream_report.is_loader_row(headline)
    table = stream_report.sweep_table([headline, sweep8, loader, too_big, export])
    assert [(e["budget_gb"], e["stock"]) for e in table] == [(3.0, None), (8.0, "loader:nf4:model:dir")]
    assert table[1]["ratio"] == 1.0 and table[0]["ratio"] is None


def test_stream_sweep_point_prefers_the_sweep_row_over_a_generate_row_of_the_same_budget():
    """A `generate --vram` row (kind cli) stands for a (value, budget) point only where no sweep or headline row ran
    that budget, whichever order the files come in."""
    from vramfit import stream_report

    nf4 = "transformer=bnb-nf4,text_encoder_2=bnb-nf4"
    sweep8 = _stream_row("sweep-nf4-8GB", f"{nf4},offload=stream:45", 0.1876, 7.9, cap=8, budget=8, value="nf4", k=45)
    gen8 = {**_stream_row("generate-8GB", f"{nf4},offload=stream:22", 0.2152, 7.7, cap=8, k=22),
            "scenario": {"name": "generate-8GB", "kind": "cli", "budget_gb": 8}}
    gen12 = {**_stream_row("generate-12GB", f"{nf4},offload=stream:57", 0.1845, 11.4, cap=12, k=57),
             "scenario": {"name": "generate-12GB", "kind": "cli", "budget_gb": 12}}
    for order in ([sweep8, gen8, gen12], [gen8, sweep8, gen12]):
        table = stream_report.sweep_table(order)
        assert [(e["budget_gb"], e["name"]) for e in table] == [(8.0, "sweep-nf4-8GB"), (12.0, "generate-12GB")]


def test_stream_sweep_point_is_the_latest_measurement_whatever_the_file_order():
    """Two measurements of one (value, budget): the later one (device_stream's `@ TIME` stamp) stands for the point,
    in whichever order the files are given (a shell glob sorts session directories by name, not by date)."""
    from vramfit import stream_report

    nf4 = "transformer=bnb-nf4,text_encoder_2=bnb-nf4"
    old = {**_stream_row("nf4-stream-3GB", f"{nf4},offload=stream:4", 0.205, 2.87, cap=3, k=4),
           "command": "device_stream.py --budget-s 470 @ 2026-12-02T01:26:40Z"}
    new = {**_stream_row("nf4-stream-3GB", f"{nf4},offload=stream:4", 0.1887, 2.955, cap=3, k=4),
           "command": "device_stream.py --budget-s 330 @ 2026-12-02T13:59:00Z"}
    for order in ([old, new], [new, old]):
        (e,) = stream_report.sweep_table(order)
        assert e["s_per_step"] == 0.1887
    # a later streamed + compiled row of the same budget is not the sweep's point: the sweep compares eager runs
    compiled = {**_stream_row("nf4-stream-3GB-regional", f"{nf4},offload=stream:4,compile=regional", 0.1583, 2.77,
                              cap=3, k=4), "command": "device_stream.py --budget-s 540 @ 2026-12-02T18:00:47Z"}
    (e,) = stream_report.sweep_table([old, new, compiled])
    assert e["s_per_step"] == 0.1887
