"""vramfit bench on CPU with flux-tiny: shipped smoke scenarios, failures as rows, kill safety, planning.

One bench run (smoke.toml + a scenario that must be refused on CPU) is shared by the module; the kill tests start
their own short runs. No timing assertions: CPU timings on a shared 2-core machine are noise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vramfit import apply, bench
from vramfit.errors import InputError
from vramfit.recipe import Recipe

ROW_FIELDS = {
    "schema", "scenario", "role", "tags", "note", "source", "status", "exit_reason", "error", "model", "weights",
    "recipe", "recipe_requested", "gguf", "request", "steps", "steps_default", "steps_reduced", "repeats",
    "reference_key", "device", "versions", "manifest", "weight_bytes", "weight_gb_total", "import_s", "load_s",
    "memory", "cold",
    "warm", "runs", "images", "fidelity", "child_s", "wall_s", "log", "command",
}
SMOKE = ["bf16", "staged", "nf4", "gguf-q4_1"]
TINY = """
[defaults]
model = "flux-tiny"
steps = 2
repeats = 1
prompt = "a fox"
"""


def bench_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "vramfit", "bench", *map(str, args), "--device", "cpu"]


def toml(tmp: Path, name: str, body: str) -> Path:
    p = tmp / name
    p.write_text(TINY + body)
    return p


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    fail = tmp / "fail.toml"
    fail.write_text("""
[defaults]
model = "flux-tiny"
seeds = [0, 1]
prompt = "a red fox in the snow"
[[scenario]]
name = "model-offload"
recipe = "offload=model"
""")
    out = tmp / "out"
    p = subprocess.run(bench_cmd("smoke", fail, "--out", out), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p.stdout, {r["scenario"]: r for r in bench.read_rows(out / "results.jsonl")}


def test_smoke_rows_have_every_field(smoke):
    out, stdout, rows = smoke
    assert list(rows) == SMOKE + ["model-offload"]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["schema"] == bench.SUMMARY_SCHEMA
    assert (summary["ok"], summary["error"], summary["exit_reasons"]) == (4, 1, {"refused": 1})
    for name in SMOKE:
        r = rows[name]
        assert r["status"] == "ok" and r["exit_reason"] is None, r.get("error")
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert r["schema"] == bench.ROW_SCHEMA and r["model"] == "flux-tiny"
        assert r["weights"] == {"kind": "random", "seed": 0}
        assert r["device"]["type"] == "cpu" and "torch" in r["versions"] and "diffusers" in r["versions"]
        assert r["recipe"] == str(Recipe.parse(r["recipe_requested"]))
        # cold + 2 warm runs cycling seeds [0, 1]; stats over the warm ones
        assert [x["seed"] for x in r["runs"]] == [0, 1, 0]
        assert r["warm"]["n"] == 2 and r["warm"]["total_s_median"] > 0
        assert r["warm"]["total_s_p90"] >= r["warm"]["total_s_median"] - 1e-9
        assert r["cold"]["total_s"] > 0 and r["load_s"] > 0 and r["import_s"] > 0 and r["cold"]["compile_s"] is None
        assert r["memory"]["gpu"] is False and r["memory"]["host_peak_rss_gb"] > 0
        assert set(r["images"]) == {"0", "1"} and all((out / p).is_file() for p in r["images"].values())
        assert r["fidelity"]["seeds"] == 2 and r["fidelity"]["error"] is None
    assert rows["staged"]["manifest"][0]["strategy"] == "staged"
    quantized = {s["component"]: s["value"] for s in rows["nf4"]["manifest"] if s["step"] == "quantize"}
    assert quantized == {"transformer": "bnb-nf4", "text_encoder_2": "bnb-nf4"}


def test_reference_and_fidelity(smoke):
    out, _, rows = smoke
    ref = rows["bf16"]
    assert ref["role"] == "reference"  # the bf16 scenario produced the reference, no extra run
    assert ref["fidelity"]["latent_rel_l2"] == 0.0 and ref["fidelity"]["images_identical"] is True
    assert ref["fidelity"]["psnr_db"] is None and ref["fidelity"]["ssim"] == 1.0  # PSNR infinite
    for seed in (0, 1):
        lat, png = bench.ref_paths(out, ref["reference_key"], seed)
        assert png.is_file() and torch.load(lat).shape == (1, 64, 64)
    # staged offload computes the same thing in another order: bit-identical
    assert rows["staged"]["fidelity"]["images_identical"] and rows["staged"]["fidelity"]["latent_rel_l2"] == 0.0
    for name in ("nf4", "gguf-q4_1"):
        f = rows[name]["fidelity"]
        assert rows[name]["reference_key"] == ref["reference_key"]
        assert 0 < f["latent_rel_l2"] < 0.5, (name, f)
        assert 20 < f["psnr_db"] < 90 and 0.5 < f["ssim"] < 1.0, (name, f)
        assert not f["images_identical"]


def test_failing_scenario_is_a_row_with_reason(smoke):
    _, stdout, rows = smoke
    r = rows["model-offload"]
    assert r["status"] == "error" and r["exit_reason"] == "refused"
    assert "needs a CUDA GPU" in r["error"] and "Alternative" in r["error"]
    assert r["device"]["type"] == "cpu" and r["versions"]  # known even though it never loaded
    assert "refused: RecipeError" in stdout  # in the printed table too


def test_report_from_bench_rows(smoke, tmp_path):
    from vramfit import report

    out, _, rows = smoke
    summary = report.make_report([out / "results.jsonl"], tmp_path / "rep")
    html = (tmp_path / "rep" / "index.html").read_text()
    for name in rows:
        assert name in html
    assert "needs a CUDA GPU" in html and "random stand-in" in html
    assert {"grid.png", "grid-2.png", "memory_latency.png", "bars.png"} <= set(summary["files"])  # 2 seeds, 2 grids
    # rows with no run behind them (device_speed.py's left-out scenarios and profile row: no model, no request) are
    # named in the notes, not charted; the report of those files used to stop with KeyError 'model'
    mixed = tmp_path / "mixed.jsonl"
    unrun = {"schema": bench.ROW_SCHEMA, "scenario": "fast-graphs", "role": "candidate", "recipe": "compile=full",
             "status": "skipped", "exit_reason": "not-run", "error": "budget: estimated 480 s, 0 s left"}
    scan = {"schema": bench.ROW_SCHEMA, "scenario": "attention-backends", "role": "scan", "recipe": None,
            "status": "ok", "error": None, "runs_here": ["flex", "native"]}
    mixed.write_text((out / "results.jsonl").read_text() + json.dumps(unrun) + "\n" + json.dumps(scan) + "\n")
    again = report.make_report([mixed], tmp_path / "rep2")
    assert again["rows"] == summary["rows"]
    md = (tmp_path / "rep2" / "results.md").read_text()
    assert "fast-graphs (skipped: budget" in md
    assert "attention-backends (ok: attention backends that run here: flex, native)" in md


def test_timeout_is_a_row(tmp_path):
    f = toml(tmp_path, "t.toml", '[[scenario]]\nname = "slow"\nrecipe = "bf16"\ntimeout = 1\n')
    p = subprocess.run(bench_cmd(f, "--out", tmp_path / "o"), capture_output=True, text=True, timeout=120)
    (row,) = bench.read_rows(tmp_path / "o" / "results.jsonl")
    assert p.returncode == 0
    assert (row["status"], row["exit_reason"]) == ("error", "timeout") and "killed after 1 s" in row["error"]


def _children_of(out: Path) -> list[int]:
    """Scenario processes still running for this results directory (their job JSON names it)."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError):
            continue
        if d.name.isdigit() and "vramfit.bench" in cmd and str(out) in cmd:
            pids.append(int(d.name))
    return pids


def _wait_for(cond, timeout=120.0):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, "timed out waiting"
        time.sleep(0.2)


def test_kill_keeps_finished_rows(tmp_path):
    f = toml(tmp_path, "k.toml", '[[scenario]]\nname = "a"\nrecipe = "bf16"\n'
                                 '[[scenario]]\nname = "b"\nrecipe = "staged"\n')
    out = tmp_path / "o"
    results = out / "results.jsonl"
    proc = subprocess.Popen(bench_cmd(f, "--out", out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: results.exists() and results.read_text().count("\n") >= 1)
        proc.send_signal(signal.SIGKILL)  # no chance to clean up
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = results.read_text().splitlines()
    rows = [json.loads(x) for x in lines]  # every line parses: no torn row
    assert rows[0]["scenario"] == "a" and rows[0]["status"] == "ok" and rows[0]["fidelity"]["latent_rel_l2"] == 0.0
    assert [r["scenario"] for r in rows] == ["a"]  # b was running: no row, and no half row
    _wait_for(lambda: not _children_of(out), timeout=10)  # the running scenario died with the bench


def test_sigterm_writes_interrupted_row_and_kills_child(tmp_path):
    f = toml(tmp_path, "s.toml", '[[scenario]]\nname = "skipped"\nrecipe = "bf16"\nskip = "not today"\n'
                                 '[[scenario]]\nname = "running"\nrecipe = "bf16"\n'
                                 '[[scenario]]\nname = "later"\nrecipe = "staged"\n')
    out = tmp_path / "o"
    proc = subprocess.Popen(bench_cmd(f, "--out", out), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    _wait_for(lambda: (out / "logs" / "running.log").exists())
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    rows = bench.read_rows(out / "results.jsonl")
    # "running" (bf16) produces the reference, so it runs first
    assert [(r["scenario"], r["exit_reason"]) for r in rows] == [
        ("running", "interrupted"), ("skipped", "skipped"), ("later", "not-run")]
    assert rows[1]["error"] == "not today"
    assert rows[0]["wall_s"] >= 0 and "last_phase" in rows[0]  # how far it got: None before its first phase
    assert json.loads(stdout.strip().splitlines()[-1])["stopped"] is True
    assert not _children_of(out)


def test_rerun_appends_and_resume_skips_done(tmp_path):
    out = tmp_path / "o"
    results = out / "results.jsonl"
    out.mkdir()
    earlier = {**bench.skipped_row(bench.load_scenarios(toml(tmp_path, "a.toml", '[[scenario]]\nname = "x"\n'
                                                                              'recipe = "bf16"\nskip = "s"\n'))[0])}
    bench.append_row(results, {**earlier, "status": "ok"})
    f = toml(tmp_path, "b.toml", '[[scenario]]\nname = "x"\nrecipe = "bf16"\nskip = "s"\n'
                                 '[[scenario]]\nname = "y"\nrecipe = "bf16"\nskip = "s"\n')
    p = subprocess.run(bench_cmd(f, "--out", out, "--resume"), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert [r["scenario"] for r in bench.read_rows(results)] == ["x", "y"]  # x kept, not rerun; y appended


# ----------------------------------------------------------------------------------------------------------
# writers killed mid-write (#13.7): real SIGKILLs, injected at the write or just before the rename

KILLER = """
import fnmatch, os, signal
_replace_pat = os.environ.get("VRAMFIT_TEST_KILL_AT_REPLACE")
if _replace_pat:
    _real_replace = os.replace
    def _replace(src, dst, *a, **k):
        if fnmatch.fnmatch(os.fspath(dst), _replace_pat):  # the temp file is complete; the rename never happens
            os.kill(os.getpid(), signal.SIGKILL)
        return _real_replace(src, dst, *a, **k)
    os.replace = _replace
if os.environ.get("VRAMFIT_TEST_KILL_IN_WRITE"):
    _real_write = os.write
    def _write(fd, data):
        _real_write(fd, bytes(data)[: len(data) // 2])  # half the line reaches the file, then the process dies
        os.kill(os.getpid(), signal.SIGKILL)
    os.write = _write
"""


def killer_env(tmp: Path, **env) -> dict:
    import os

    d = tmp / "killer"
    d.mkdir(exist_ok=True)
    (d / "sitecustomize.py").write_text(KILLER)
    return {**os.environ, "PYTHONPATH": f"{d}:{Path(bench.__file__).parents[1]}", **env}


def test_killed_writers_leave_whole_files(tmp_path):
    target = tmp_path / "row.json"
    target.write_text('{"old": 1}')
    code = f"from vramfit import bench; bench.write_atomic(__import__('pathlib').Path({str(target)!r}), b'x' * 100000)"
    p = subprocess.run([sys.executable, "-c", code], env=killer_env(tmp_path, VRAMFIT_TEST_KILL_AT_REPLACE="*row.json"))
    assert p.returncode == -signal.SIGKILL
    assert target.read_text() == '{"old": 1}'  # the old file, whole; the new one only as a .tmp beside it
    assert [x.name for x in tmp_path.glob(".row.json.*.tmp")]

    results = tmp_path / "results.jsonl"
    bench.append_row(results, {"scenario": "a", "status": "ok"})
    code = (f"from vramfit import bench; bench.append_row(__import__('pathlib').Path({str(results)!r}), "
            "{'scenario': 'b', 'status': 'ok', 'pad': 'x' * 5000})")
    p = subprocess.run([sys.executable, "-c", code], env=killer_env(tmp_path, VRAMFIT_TEST_KILL_IN_WRITE="1"))
    assert p.returncode == -signal.SIGKILL
    assert not results.read_text().endswith("\n")  # really torn
    torn = []
    assert [r["scenario"] for r in bench.read_rows(results, on_torn=lambda n, t: torn.append(n))] == ["a"]
    assert torn == [2]  # skipped and reported, not a JSONDecodeError
    note = bench.append_row(results, {"scenario": "c", "status": "ok"})
    assert "torn" in note and "results.jsonl.torn" in note
    assert [json.loads(x)["scenario"] for x in results.read_text().splitlines()] == ["a", "c"]  # every line parses
    assert (tmp_path / "results.jsonl.torn").read_text().startswith('{"scenario": "b"')  # kept, not lost
    assert bench.append_row(results, {"scenario": "d", "status": "ok"}) is None


def test_torn_results_line_is_reported_on_resume(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    results = out / "results.jsonl"
    results.write_text(json.dumps({"scenario": "x", "status": "ok"}) + "\n" + '{"scenario": "y", "sta')
    f = toml(tmp_path, "b.toml", '[[scenario]]\nname = "x"\nrecipe = "bf16"\nskip = "s"\n'
                                 '[[scenario]]\nname = "y"\nrecipe = "bf16"\nskip = "s"\n')
    p = subprocess.run(bench_cmd(f, "--out", out, "--resume"), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "line 2 does not parse (torn by a kill" in p.stdout and "moved to results.jsonl.torn" in p.stdout
    assert [json.loads(x)["scenario"] for x in results.read_text().splitlines()] == ["x", "y"]


def test_reference_record_catches_truncation(tmp_path):
    from PIL import Image

    key = "k"
    bench.write_reference(tmp_path, key, 0, torch.zeros(1, 4, 4), Image.new("RGB", (8, 8)))
    assert bench.reference_problem(tmp_path, key, 0) is None
    lat, png = bench.ref_paths(tmp_path, key, 0)
    lat.write_bytes(lat.read_bytes()[:-7])  # a torn tensor file: exists, wrong size
    assert "size or hash differs" in bench.reference_problem(tmp_path, key, 0)
    assert bench.reference_problem(tmp_path, key, 1) == "missing"


@pytest.mark.slow
def test_reference_killed_before_rename_is_redone_on_resume(tmp_path):
    """The bf16 reference child is SIGKILLed between writing the reference PNG and renaming it into place: the
    results file stays readable (a crash row), and --resume finds the reference incomplete and makes it again."""
    f = toml(tmp_path, "r.toml", '[[scenario]]\nname = "a"\nrecipe = "bf16"\n'
                                 '[[scenario]]\nname = "s"\nrecipe = "staged"\n')
    out = tmp_path / "o"
    env = killer_env(tmp_path, VRAMFIT_TEST_KILL_AT_REPLACE="*/reference/*.png")
    p = subprocess.run(bench_cmd(f, "--out", out, "--only", "a"), capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    (row,) = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert (row["status"], row["exit_reason"]) == ("error", "crash") and "SIGKILL" in row["error"]
    key = row["reference_key"]
    lat, png = bench.ref_paths(out, key, 0)
    assert lat.exists() and not png.exists()  # the old check (latents exist) would have trusted this
    assert bench.reference_problem(out, key, 0) == "no completion record (cut short)"
    p = subprocess.run(bench_cmd(f, "--out", out, "--resume", "--skip", "a"), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "cut short); it is made again" in p.stdout
    rows = bench.read_rows(out / "results.jsonl")
    assert [(r["scenario"], r["status"]) for r in rows] == [("a", "error"), (f"reference:{key}", "ok"), ("s", "ok")]
    assert bench.reference_problem(out, key, 0) is None
    assert rows[2]["fidelity"]["error"] is None and rows[2]["fidelity"]["latent_rel_l2"] == 0.0


# ----------------------------------------------------------------------------------------------------------
# scenario files and planning (no processes)


def test_scenario_file_errors_name_the_scenario(tmp_path):
    with pytest.raises(InputError, match="'bad'.*unknown keys.*'stpes'"):
        bench.load_scenarios(toml(tmp_path, "a.toml", '[[scenario]]\nname = "bad"\nrecipe = "bf16"\nstpes = 3\n'))
    with pytest.raises(InputError, match="'q'.*transformer='bnb-nf5' is not a valid value"):
        bench.load_scenarios(toml(tmp_path, "b.toml", '[[scenario]]\nname = "q"\nrecipe = "transformer=bnb-nf5"\n'))
    with pytest.raises(InputError, match="unique"):
        bench.load_scenarios(toml(tmp_path, "c.toml", '[[scenario]]\nname = "d"\nrecipe = "bf16"\n' * 2))
    with pytest.raises(InputError, match="unknown scenario 'nope'.*smoke"):
        bench.resolve_scenario_file("nope")


def test_sizes_expand_and_select_by_tag(tmp_path):
    sc = bench.load_scenarios(toml(tmp_path, "a.toml", '[[scenario]]\nname = "m"\nrecipe = "bf16"\n'
                                                       'sizes = ["64x64", "64x128"]\ntags = ["fast"]\n'
                                                       '[[scenario]]\nname = "n"\nrecipe = "staged"\nsteps = 1\n'))
    assert [(s.name, s.height, s.width) for s in sc] == [("m@64x64", 64, 64), ("m@64x128", 64, 128), ("n", 128, 128)]
    assert sc[2].steps == 1 and sc[2].steps_default == 2 and bench.base_row(sc[2])["steps_reduced"] is True
    assert [s.name for s in bench.select(sc, "fast", None)] == ["m@64x64", "m@64x128"]
    assert [s.name for s in bench.select(sc, None, "m@*")] == ["n"]
    with pytest.raises(InputError):
        bench.select(sc, "nothing", None)


def test_plan_adds_references_where_needed(tmp_path):
    sc = bench.load_scenarios(toml(tmp_path, "a.toml", """
[[scenario]]
name = "q"
recipe = "transformer=quanto-int8"
seeds = [3]
[[scenario]]
name = "ref"
recipe = "bf16"
seeds = [0]
repeats = 4
[[scenario]]
name = "short"
recipe = "staged"
steps = 1
[[scenario]]
name = "gone"
recipe = "staged"
steps = 3
skip = "no"
"""))
    runs = bench.plan(sc, tmp_path / "out")
    # the bf16 scenario moves first and covers every seed of its group; the 1-step group gets its own
    # reference; the skipped 3-step group needs none
    assert [(r.name.split(":")[0], r.role, r.seeds) for r in runs] == [
        ("ref", "reference", [3, 0]), ("q", "scenario", [3]), ("reference", "reference", [0]),
        ("short", "scenario", [0]), ("gone", "scenario", [0])]
    assert runs[0].repeats == 4 and runs[2].repeats == 0 and runs[2].expanded == str(Recipe())
    assert runs[2].steps == 1 and runs[2].ref_key == runs[3].ref_key != runs[1].ref_key


def test_run_sequence_and_stats():
    assert bench.run_sequence([0], 0) == [0]
    assert bench.run_sequence([0], 2) == [0, 0, 0]
    assert bench.run_sequence([5, 6, 7], 1) == [5, 6, 7]  # every seed at least once
    assert bench._median([3.0, 1.0, 2.0]) == 2.0 and bench._median([1.0, 2.0]) == 1.5
    assert bench._p90([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]) == 10.0
    assert bench._p90([]) is None
    assert bench.finite({"a": [float("nan"), 1.0], "b": float("inf")}) == {"a": [None, 1.0], "b": None}


def test_seeds_file_covers_the_published_rows_and_none_is_refused():
    sc = bench.load_scenarios(bench.resolve_scenario_file("seeds"))
    assert {(s.model, s.weights, s.height, s.width, s.steps_default) for s in sc} == {
        ("flux-dev", "random", 1024, 1024, 28)}
    recipes = {s.expanded for s in sc}
    expected = [
        "bf16", "sequential-offload", "model-offload", "staged", "nf4", "nf4+model-offload", "int8",
        *(f"transformer={v},text_encoder_2={v}{c}" for v in ("torchao-int4wo", "torchao-int8wo", "torchao-fp8wo")
          for c in ("", ",compile=regional")),
        *(f"transformer={v},text_encoder_2={v}" for v in ("quanto-int4", "quanto-int8", "quanto-fp8")),
        "transformer=gguf-q2_k", "transformer=gguf-q4_1", "transformer=gguf-q8_0",
        "fp8-layerwise", "fp8-layerwise+group-offload", "nf4,compile=regional", "nf4,compile=regional,offload=model",
    ]
    missing = [e for e in expected if str(Recipe.parse(e)) not in recipes]
    assert not missing, missing
    for s in sc:  # a refusal on the GPU would waste a device call: check with the same rules now
        apply.check(Recipe.parse(s.recipe), torch.device("cuda"))
        assert s.skip or s.est_s, s.name
    # GGUF rows export the 12B transformer first (torch quantizers on the GPU): each has a timeout of its own
    assert all(s.timeout for s in sc if s.expanded.startswith("transformer=gguf-"))
    parts = {}
    for s in sc:
        if not s.skip:
            parts[s.tags[0]] = parts.get(s.tags[0], 0) + s.est_s
    assert all(v <= 480 for v in parts.values()), parts  # each part fits one device call with its reference


def test_gpu_memory_and_timing_summaries():
    """The CUDA branch of the row summaries, on records shaped like the H200's (benchmarks/results)."""
    def rec(total, step, gen_peak, peak, compile_s=None):
        t = {"total_s": total, "encode_s": 0.1, "denoise_s": total - 0.2, "decode_s": 0.1, "s_per_step": step,
             "load_s": 14.0, **({"compile_s": compile_s} if compile_s else {})}
        m = {"after_load": {"allocated_gb": 33.8, "reserved_gb": 33.9, "rss_gb": 1.1}, "peak_allocated_gb": peak,
             "peak_reserved_gb": peak + 1, "generate_peak_allocated_gb": gen_peak,
             "generate_peak_reserved_gb": gen_peak + 1, "host_peak_rss_gb": 2.0}
        return {"timings": t, "memory": m}

    records = [rec(20.0, 0.7, 36.3, 48.0, compile_s=15.0), rec(5.0, 0.18, 36.3, 48.0), rec(6.0, 0.2, 36.4, 48.0)]
    mem = bench._memory(records)
    assert mem["gpu"] and (mem["after_load_gb"], mem["after_load_reserved_gb"]) == (33.8, 33.9)
    assert (mem["peak_gb"], mem["peak_reserved_gb"], mem["peak_incl_load_gb"]) == (36.4, 37.4, 48.0)
    t = bench._timings(records)
    assert t["cold"]["total_s"] == 20.0 and t["cold"]["compile_s"] == 15.0  # compile stays out of warm numbers
    assert t["warm"]["n"] == 2 and t["warm"]["total_s_median"] == 5.5 and t["warm"]["s_per_step_p90"] == 0.198


def test_compare_to_scores_a_scenario_against_another_and_profile_adds_a_breakdown(tmp_path):
    """A step-cache row scored against the uncached run of the same recipe (``compare_to`` -> ``fidelity_vs``),
    in process when that run came first and from the files both left when it came after; ``profile`` adds one
    more warm run's kernel breakdown. (device_speed.py's cache rows use both.)"""
    def sc(name, recipe, **kw):
        return bench.Scenario(name=name, recipe=recipe, expanded=str(Recipe.parse(recipe)), model="flux-tiny",
                              weights="random", weights_seed=0, height=64, width=64, steps=6, steps_default=6,
                              seeds=[0], repeats=0, prompt="a fox", guidance=None, **kw)

    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    plain = bench.run_scenario(sc("plain", "bf16", role="reference"), out, "cpu", timeout=300)
    cached = bench.run_scenario(sc("cached", "cache=taylorseer:2", compare_to="plain", profile=True), out, "cpu",
                                timeout=300)
    assert plain["status"] == cached["status"] == "ok", (plain.get("error"), cached.get("error"))
    vs = cached["fidelity_vs"]
    assert vs["scenario"] == "plain" and vs["error"] is None and vs["images_identical"] is False
    assert vs["latent_rel_l2"] > 0 and vs["latent_rel_l2"] == cached["fidelity"]["latent_rel_l2"]  # plain is bf16
    br = cached["breakdown"]
    assert set(br["s_per_step"]) == {"linear", "attention", "other"} and br["total_kernel_s"] > 0
    assert br["steps_profiled"] == 6 and "breakdown" not in plain
    # the other order: scored afterwards from the files (the same numbers)
    back = bench.fidelity_vs_files(out, "cached", "plain", [0])
    assert back["latent_rel_l2"] == vs["latent_rel_l2"] and back["psnr_db"] == vs["psnr_db"]
    missing = bench.fidelity_vs_files(out, "cached", "never-ran", [0])
    assert missing["error"] and "never-ran" in missing["error"]


def test_kernel_classes_of_the_h200_profile():
    """Kernel names from the fp8dq + fused QKV + regional profile on the H200 (session 10): inductor's fused
    pointwise/reduction kernels are "other" even when named after the matmul or attention they feed."""
    from vramfit.measure import kernel_class

    assert kernel_class("nvjet_sm90_qqtst_128x128_128x6_2x1_v_bz_ovscale_bias_TNT") == "linear"
    assert kernel_class("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128") == "attention"
    assert kernel_class("triton_red_fused__scaled_mm__to_copy_abs_amax_clamp_div_gelu_t_unsqueeze_view_17") == "other"
    assert kernel_class("triton_red_fused__fused_rms_norm__scaled_dot_product_cudnn_attention__to_copy_add") == "other"
    assert kernel_class("triton_tem_fused_mm_0") == "linear"
    assert kernel_class("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::BFloat16>") == "other"


def test_a_kept_compiler_cache_is_resumed_and_said_and_otherwise_starts_empty(tmp_path):
    """``keep_compiler_cache`` (device_speed's VRAMFIT_SPEED_RESUME, for a compile longer than one device command):
    the scenario's own inductor/Triton dirs survive the run, and a run that starts from them says so in its row. Without
    it, dirs left by an earlier run are emptied first, so the cold start stays an uncached one."""
    s = bench.Scenario(name="anchor", recipe="bf16", expanded=str(Recipe.parse("bf16")), model="flux-tiny",
                       weights="random", weights_seed=0, height=64, width=64, steps=2, steps_default=2, seeds=[0],
                       repeats=0, prompt="a fox", guidance=None)
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    left = out / "logs" / "anchor.compiler-cache" / "inductor" / "fxgraph" / "partial"
    left.parent.mkdir(parents=True)
    left.write_text("from a call that ran out of time")
    row = bench.run_scenario(s, out, "cpu", timeout=300, keep_compiler_cache=True)
    assert row["status"] == "ok", row.get("error")
    assert row["compiler_cache"] == {"kept": True, "resumed": True, "dir": "logs/anchor.compiler-cache"}
    assert left.read_text() == "from a call that ran out of time"  # kept for the next call
    row = bench.run_scenario(s, out, "cpu", timeout=300)
    assert row["status"] == "ok" and "compiler_cache" not in row
    assert not left.exists() and not (out / "logs" / "anchor.compiler-cache").exists()


def test_an_unfinished_compiler_cache_travels_in_parts_and_fills_only_an_empty_cache(tmp_path, monkeypatch):
    """device_speed's pack_cache / unpack_cache (a compile longer than one device command resumes in the next call on
    another machine): the cache comes back as numbered parts under the device tool's 16 MiB a file, Triton's builds
    are dropped when the whole would pass the limit, and the parts fill only an empty cache dir."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("device_speed", Path(__file__).parents[1] / "benchmarks" / "device_speed.py")
    ds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ds)
    monkeypatch.setattr(ds, "PART_BYTES", 4096)
    work, back = tmp_path / "work", tmp_path / "OUT" / "cache"
    src = ds.cache_dir_of(work, "flux-fast-anchor")
    (src / "inductor" / "ab").mkdir(parents=True)
    (src / "inductor" / "ab" / "k.py").write_text("kernel")
    (src / "inductor" / "ab" / "k.best_config").write_text('{"XBLOCK": 1024}')
    (src / "triton" / "h").mkdir(parents=True)
    (src / "triton" / "h" / "k.cubin").write_bytes(os.urandom(20000))  # incompressible: several parts
    got = ds.pack_cache(work, "flux-fast-anchor", back)
    assert got["triton"] and len(got["parts"]) >= 5 and got["best_configs"] == 1 and got["triton_builds"] == 1
    assert all((back / p).stat().st_size <= 4096 for p in got["parts"])
    fresh = tmp_path / "fresh"
    into = ds.unpack_cache(back, fresh, "flux-fast-anchor")
    assert into["best_configs"] == 1 and into["triton_builds"] == 1
    dest = ds.cache_dir_of(fresh, "flux-fast-anchor")
    assert (dest / "triton" / "h" / "k.cubin").read_bytes() == (src / "triton" / "h" / "k.cubin").read_bytes()
    (dest / "inductor" / "ab" / "k.best_config").write_text("newer, from this machine")
    assert ds.unpack_cache(back, fresh, "flux-fast-anchor") is None  # a cache already there is newer: kept
    assert (dest / "inductor" / "ab" / "k.best_config").read_text() == "newer, from this machine"
    small = ds.pack_cache(work, "flux-fast-anchor", tmp_path / "small", limit_mb=0.001)
    assert not small["triton"] and len(small["parts"]) == 1  # over the limit: the tuned configs without Triton
    assert ds.unpack_cache(tmp_path / "small", tmp_path / "other", "flux-fast-anchor")["triton_builds"] == 0
