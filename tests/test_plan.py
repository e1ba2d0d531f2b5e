"""The planner: weight accounting against real quantized modules, plan choice, budgets, JSON, OOM fallback,
and predictions against the committed H200 measurements (CPU only; no timing assertions)."""

from __future__ import annotations

import json
import warnings
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vramfit import plan
from vramfit.cli import main
from vramfit.errors import InputError, VramfitError
from vramfit.models import build_random_component, get_model
from vramfit.quant import quantize_component, weight_bytes
from vramfit.recipe import Recipe

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parent.parent
FOUNDATION = ROOT / "benchmarks" / "results" / "2026-11-21-h200" / "foundation.jsonl"
TINY = get_model("flux-tiny")

# every value that quantizes on CPU, per component (GGUF: transformer only)
TRANSFORMER_VALUES = [
    "bf16", "fp32", "torchao-int8wo", "torchao-int8dq", "torchao-fp8wo", "quanto-int8", "quanto-int4", "quanto-fp8",
    "fp8-layerwise", "fp8-layerwise-e5m2", "bnb-nf4", "bnb-fp4", "bnb-int8",
    "gguf-q8_0", "gguf-q5_1", "gguf-q5_0", "gguf-q4_1", "gguf-q4_0", "gguf-q4_k", "gguf-q2_k", "gguf-bf16",
]
ENCODER_VALUES = ["bf16", "fp32", "torchao-int8wo", "torchao-fp8wo", "quanto-int8", "quanto-int4", "fp8-layerwise",
                  "bnb-nf4", "bnb-int8"]


def _real_bytes(component: str, value: str) -> int:
    dtype = {"fp32": torch.float32}.get(value, torch.bfloat16)
    m = build_random_component(TINY, component, 0, "cpu", dtype)
    if value not in ("bf16", "fp32"):
        quantize_component(m, component, value, "cpu")
    return weight_bytes(m)


@pytest.mark.parametrize("value", TRANSFORMER_VALUES)
def test_weight_bytes_transformer(value):
    """Meta-device accounting == the storage of the real quantized module, byte for byte."""
    assert plan.layout("flux-tiny", "transformer", value).total == _real_bytes("transformer", value)


@pytest.mark.parametrize("component", ["text_encoder_2", "text_encoder"])
@pytest.mark.parametrize("value", ENCODER_VALUES)
def test_weight_bytes_text_encoders(component, value):
    assert plan.layout("flux-tiny", component, value).total == _real_bytes(component, value)


@pytest.mark.parametrize("value", ["bf16", "fp32", "fp8-layerwise"])
def test_weight_bytes_vae(value):
    assert plan.layout("flux-tiny", "vae", value).total == _real_bytes("vae", value)


def test_flux_dev_weights_match_the_h200_run():
    """bf16 flux-dev from the meta device == the bytes the H200 run recorded for every component."""
    row = json.loads(FOUNDATION.read_text().splitlines()[0])
    assert plan.weight_bytes("flux-dev", Recipe()) == row["weight_bytes"]
    # group-block: T5's blocks are nested (encoder.block) so it is one unstreamed group; the transformer has 57
    assert plan.layout("flux-dev", "text_encoder_2", "bf16").blocks == ()
    assert len(plan.layout("flux-dev", "transformer", "bf16").blocks) == 57


# ----------------------------------------------------------------------------------------------------------
# budgets and plans


@pytest.mark.parametrize("text,gb", [("8GB", 8.0), ("8 GiB", 8 * 2**30 / 1e9), ("24000MB", 24.0), ("1.5 gb", 1.5),
                                     ("auto", None), ("AUTO", None)])
def test_parse_size(text, gb):
    assert plan.parse_size(text) == (pytest.approx(gb) if gb is not None else None)


@pytest.mark.parametrize("text", ["8", "lots", "-1GB", "0GB", "8 GBs", ""])
def test_parse_size_rejects(text):
    with pytest.raises(InputError):
        plan.parse_size(text)


def test_bad_budget_exits_2(capsys):
    assert main(["plan", "flux-tiny", "--vram", "eight gigs"]) == 2
    assert "--vram" in capsys.readouterr().err


def test_gpu_aliases():
    assert plan.gpu_profile("4090")["profile"] == plan.gpu_profile("RTX 4090")["profile"] == "NVIDIA GeForce RTX 4090"
    assert plan.find_gpu("NVIDIA H200")["aliases"][0] == "h200"
    with pytest.raises(InputError, match="known"):
        plan.gpu_profile("voodoo5")


@pytest.fixture(scope="module")
def dev_4090():
    return plan.gpu_profile("4090")


def test_more_budget_never_slower(dev_4090):
    """A larger budget never picks a slower recipe (by the ranking's own time: a recipe resting on an unmeasured
    factor counts 10 % slower)."""
    shape = plan.Shape(1024, 1024, 28)
    last = None
    for budget in (2.5, 3.5, 5, 8, 12, 16, 24, 40, 80):
        p = plan.make_plan("flux-dev", shape, dev_4090, budget)
        chosen = next((r for r in p["candidates"] if r["status"] == "chosen"), None)
        if chosen is None:
            assert last is None, f"{budget} GB fits nothing but a smaller budget did"
            continue
        assert chosen["needs_vram_gb"] <= budget
        pr = chosen["predicted"]
        t = pr["total_s"] * (plan.UNMEASURED_PENALTY if pr["unmeasured"] else 1)
        assert last is None or t <= last + 0.01, (budget, t, last)
        last = t
    assert last is not None


def test_fidelity_bound_is_honoured(dev_4090):
    p = plan.make_plan("flux-dev", plan.Shape(), dev_4090, 12, max_error=0.05)
    chosen = p["candidates"][0]
    assert chosen["status"] == "chosen" and chosen["predicted"]["expected_error"] <= 0.05
    assert any(r["status"] == "too-lossy" for r in p["candidates"])


def test_impossible_budget_names_the_minimum(capsys):
    assert main(["plan", "flux-dev", "--gpu", "h200", "--vram", "1GB", "--json"]) == 1
    out, err = capsys.readouterr()
    data = json.loads(out)
    need = data["min_vram_gb"]
    assert data["chosen"] is None and need > 1
    assert f"the smallest budget that works is {need:.2f} GB" in err
    # ... and that budget does work
    assert main(["plan", "flux-dev", "--gpu", "h200", "--vram", f"{need:.2f}GB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["chosen"] is not None


def test_plan_json_schema(capsys):
    assert main(["plan", "flux-dev", "--gpu", "4090", "--vram", "8GB", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schema"] == "vramfit.plan/1" and data["model"] == "flux-dev"
    assert data["gpu"]["profile"] == "NVIDIA GeForce RTX 4090"
    assert data["request"] == {"height": 1024, "width": 1024, "steps": 28, "batch": 1, "text_tokens": 512, "images": 1}
    assert set(data["budget"]) == {"vram_gb", "ram_gb", "ram_source", "margin", "reserve_gb", "max_error"}
    # a named profile carries an assumed typical host RAM, said so; its libraries are assumed installed there
    assert data["budget"]["ram_gb"] == 64 and "assumed" in data["budget"]["ram_source"]
    assert data["gpu"]["libraries"].startswith("assumed installed")
    statuses = {"chosen", "fits", "too-big", "too-much-ram", "too-lossy", "refused"}
    keys = {"peak_vram_gb", "peak_host_gb", "weights_gb", "stage_peak_gb", "step_s", "encode_s", "denoise_s",
            "decode_s", "warm_s", "cold_s", "total_s", "expected_error", "fidelity", "assumed", "compile_cached",
            "error_source", "unmeasured"}
    assert [r["status"] for r in data["candidates"]].count("chosen") == 1
    assert data["candidates"][0]["recipe"] == data["chosen"]
    for r in data["candidates"]:
        assert set(r) == {"recipe", "status", "reason", "needs_vram_gb", "predicted"} and r["status"] in statuses
        Recipe.parse(r["recipe"])  # every candidate is a valid recipe string
        if r["status"] == "refused":
            assert r["reason"] and r["predicted"] is None
        else:
            stream = Recipe.parse(r["recipe"]).offload_kind == "stream"  # + each server worker's own need
            assert set(r["predicted"]) == keys | ({"stage_own_gb"} if stream else set())
            assert r["predicted"]["fidelity"] in ("lossless", "near", "lossy")
        if r["status"] not in ("chosen", "fits"):
            assert r["reason"]
    # refusals come from the project's own combination rules
    assert any("illegal memory access" in (r["reason"] or "") for r in data["candidates"])


def test_fp8_compute_refused_without_fp8_tensor_cores():
    p = plan.make_plan("flux-dev", plan.Shape(), plan.gpu_profile("3090"), 24,
                       recipes=[Recipe(transformer="torchao-fp8dq", offload="model")])
    assert p["candidates"][0]["status"] == "refused" and "fp8" in p["candidates"][0]["reason"]


def test_plan_prints_a_short_list_by_default(capsys):
    assert main(["plan", "flux-dev", "--gpu", "h200", "--vram", "4GB"]) == 0
    out = capsys.readouterr().out
    n = len(plan.candidate_recipes(plan.Shape()))
    rows = [line for line in out.splitlines() if line.startswith(("=>", "  ")) and
            any(s in line for s in (" fits ", " too-big ", " refused ", " chosen ", " too-much-ram "))]
    assert out.count("\n=>") == 1 and "chosen:" in out
    assert len(rows) == plan.DEFAULT_TOP and f"... {n - plan.DEFAULT_TOP} more (all of them: --top 0" in out
    assert main(["plan", "flux-dev", "--gpu", "h200", "--vram", "4GB", "--top", "0"]) == 0
    out = capsys.readouterr().out
    assert "more (all of them" not in out
    assert sum(line.startswith(("=>", "  ")) and any(s in line for s in ("fits", "too-big", "refused", "chosen",
                                                                         "too-much-ram"))
               for line in out.splitlines()) >= n


# ----------------------------------------------------------------------------------------------------------
# generate --vram: out-of-memory fallback


class FakeGPU:
    """A fake allocator: pipelines reserve their recipe's predicted peak and give it back only when they are
    garbage; ``generate`` runs out of memory when the reserved total exceeds the capacity."""

    def __init__(self, capacity_gb):
        self.capacity, self.reserved = capacity_gb, 0.0


class FakePipeline:
    def __init__(self, gpu, gb):
        self.gpu, self.gb = gpu, gb
        gpu.reserved += gb
        weakref.finalize(self, FakeGPU.__setattr__, gpu, "reserved", 0.0)  # freed when unreachable


REQ = SimpleNamespace(height=128, width=128, steps=2, max_sequence_length=32)
DEV_REQ = SimpleNamespace(height=1024, width=1024, steps=28, max_sequence_length=512)


# over 1000 images the compiled bf16 recipe is fastest, plain bf16 next (the same peak), NF4 last (a smaller one)
FALLBACK_RECIPES = [Recipe(), Recipe(compile="regional"), Recipe(transformer="bnb-nf4", text_encoder_2="bnb-nf4")]


def test_oom_falls_back_by_memory_after_freeing_and_restoring():
    """On CUDA out-of-memory: the next candidate is the fastest with a smaller predicted VRAM peak (not the next
    by time, which needs as much), it starts only after the failed pipeline is garbage, and the failed recipe's
    dynamo settings are back."""
    import torch._dynamo

    from vramfit import apply

    shape = plan.Shape(1024, 1024, 28, 1, 512, 1000)
    fitting = plan.make_plan("flux-dev", shape, plan.gpu_profile("h200"), 140.0, plan.host_ram_gb(),
                             device_type="cpu", weights_kind="random", here=True, recipes=FALLBACK_RECIPES)["candidates"]
    peak = {r["recipe"]: r["predicted"]["peak_vram_gb"] for r in fitting}
    compiled, plain, nf4 = str(FALLBACK_RECIPES[1]), str(FALLBACK_RECIPES[0]), str(FALLBACK_RECIPES[2])
    assert [r["recipe"] for r in fitting] == [compiled, plain, nf4] and peak[plain] == peak[compiled] > peak[nf4]
    gpu = FakeGPU(capacity_gb=(peak[plain] + peak[nf4]) / 2)  # bf16 runs out, NF4 fits (if bf16 was freed)
    calls, alive, logs = [], [], []
    def current_limit():  # torch renamed it recompile_limit; some builds hide the old name (apply handles both)
        try:
            return torch._dynamo.config.cache_size_limit
        except AttributeError:
            return torch._dynamo.config.recompile_limit

    limit = current_limit()

    class FakeRunner:
        def __init__(self, recipe):
            # the previous attempt's pipeline must be gone before this one is built
            assert all(ref() is None for ref in alive), "the failed pipeline is still referenced"
            assert current_limit() == limit, "the failed recipe's dynamo settings stayed"
            self.recipe = str(recipe)
            self.pipe = FakePipeline(gpu, peak[self.recipe])
            alive.append(weakref.ref(self.pipe))

        def generate(self, request):
            calls.append(self.recipe)
            apply.apply_dynamo_settings({"cache_size_limit": limit + 7}, apply.Manifest())
            if gpu.reserved > gpu.capacity:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return SimpleNamespace(record={"memory": {"peak_allocated_gb": 5.0, "generate_peak_allocated_gb": 0.01},
                                           "timings": {"total_s": 1.0, "s_per_step_median": 0.1}})

    try:
        result, rec = plan.generate_with_budget(get_model("flux-dev"), SimpleNamespace(kind="random"), "140GB",
                                                DEV_REQ, torch.device("cpu"), FakeRunner, log=logs.append, gpu="h200",
                                                images=1000, recipes=FALLBACK_RECIPES)
    finally:
        apply.restore_dynamo_settings(0)
    assert calls == [compiled, nf4]  # plain bf16 (next by time, same peak) skipped
    assert rec["planned"] == compiled and rec["chosen"] == nf4 and len(rec["fallbacks"]) == 1
    f = rec["fallbacks"][0]
    assert f["recipe"] == compiled and f["ran_out_of"] == "vram" and "OutOfMemoryError" in f["error"]
    assert f["dynamo_settings_restored"] == ["cache_size_limit"]
    assert result.record["plan"] is rec and rec["images"] == 1000
    # like with like: the generation peak (loading excluded) beside the predicted generation peak
    assert rec["measured"]["peak_vram_gb"] == 0.01 and rec["measured"]["peak_vram_incl_load_gb"] == 5.0
    assert any("out of GPU memory" in m for m in logs) and any("falling back" in m for m in logs)


def test_next_candidate_needs_less_of_what_ran_out():
    rows = [{"recipe": n, "predicted": {"peak_vram_gb": v, "peak_host_gb": h}}
            for n, v, h in (("a", 5, 10), ("b", 6, 2), ("c", 4, 30), ("d", 3, 1))]
    assert plan.next_candidate(rows, {"a"}, rows[0], "vram")["recipe"] == "c"
    assert plan.next_candidate(rows, {"a"}, rows[0], "host")["recipe"] == "b"
    assert plan.next_candidate(rows, {"a", "b", "c", "d"}, rows[3], "vram") is None
    assert plan.oom_resource(torch.OutOfMemoryError("CUDA out of memory")) == "vram"
    assert plan.oom_resource(MemoryError()) == "host" and plan.oom_resource(ValueError("x")) is None


def test_other_errors_are_not_swallowed():
    class Broken:
        def __init__(self, recipe):
            pass

        def generate(self, request):
            raise ValueError("a bug")

    req = SimpleNamespace(height=128, width=128, steps=2, max_sequence_length=32)
    with pytest.raises(ValueError, match="a bug"):
        plan.generate_with_budget(TINY, SimpleNamespace(kind="random"), "2GB", req, torch.device("cpu"), Broken,
                                  log=lambda m: None, gpu="h200")
    with pytest.raises(VramfitError, match="smallest budget"):
        plan.generate_with_budget(TINY, SimpleNamespace(kind="random"), "1MB", req, torch.device("cpu"), Broken,
                                  log=lambda m: None, gpu="h200")


# ----------------------------------------------------------------------------------------------------------
# plan --check


def test_check_passes_on_the_h200_foundation_runs(capsys):
    assert main(["plan", "--check", str(FOUNDATION), "--in-sample-only"]) == 0
    out = capsys.readouterr().out
    assert "in sample: 7/7 rows within bounds" in out and out.strip().splitlines()[-2].startswith("in sample worst:")


def test_check_fails_on_a_doctored_row(tmp_path, capsys):
    rows = [json.loads(line) for line in FOUNDATION.read_text().splitlines()]
    # offload=model claimed to peak at 36 GB while generating (the check reads the generation peak)
    rows[1]["memory"]["generate_peak_allocated_gb"] *= 1.5
    rows.append({"scenario": "broken", "error": "CUDA error: an illegal memory access", "exit_code": 1})
    f = tmp_path / "doctored.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["plan", "--check", str(f), "--in-sample-only"]) == 1
    out = capsys.readouterr().out
    assert "OUT OF BOUNDS" in out and "broken" in out and "skipped" in out


SEEDS = ROOT / "benchmarks" / "results" / "2026-11-21-h200" / "bench-seeds-call1.jsonl"


def test_check_reads_measured_bench_rows(capsys):
    """plan --check on a committed H200 bench file: ok rows compared (generation peak, warm mean step, total),
    error/skipped rows named with their exit reason, the cold-only references checked from their cold run."""
    rows = [json.loads(line) for line in SEEDS.read_text().splitlines()]
    ok = [r for r in rows if r["status"] == "ok"]
    main(["plan", "--check", str(SEEDS), "--in-sample-only"])
    out = capsys.readouterr().out
    assert f"/{len(ok)} rows within bounds" in out and "warm mean" in out and "cold mean" in out
    for r in rows:
        if r["status"] != "ok":
            assert f"skipped, status {r['status']} ({r['exit_reason']})" in out
    assert "out of sample" not in out.split("note:")[0]


def test_check_catches_a_doctored_measured_row(tmp_path, capsys):
    """The same committed rows with one measured step made 1.5x slower: that row is out of bounds."""
    rows = [json.loads(line) for line in SEEDS.read_text().splitlines()]
    nf4 = next(r for r in rows if r["scenario"] == "nf4")
    for k in ("s_per_step_median", "total_s_median", "denoise_s_median"):
        nf4["warm"][k] *= 1.5
    f = tmp_path / "doctored.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["plan", "--check", str(f), "--in-sample-only"]) == 1
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("nf4 "))
    assert "OUT OF BOUNDS (s/step, total)" in line


@pytest.mark.slow
def test_check_out_of_sample_refits_without_the_row(tmp_path, capsys):
    """Leave-one-out on committed measured rows: a fitting row is predicted from a calibration refitted without
    it and reported beside the in-sample figure; a row that alone fixes a constant is said to be so."""
    loo = plan.LeaveOneOut()
    assert loo.available() is None
    row = next(json.loads(x) for x in SEEDS.read_text().splitlines() if json.loads(x).get("scenario") == "nf4")
    inside = plan.compare_row(row)
    outside, refit = loo.compare(row)
    assert refit and outside["pairs"]["s/step"][1] == inside["pairs"]["s/step"][1]  # same measurement
    assert outside["pairs"]["s/step"][0] != inside["pairs"]["s/step"][0]  # a different prediction
    seq = json.loads(FOUNDATION.read_text().splitlines()[2])  # the only offload=sequential run
    f = tmp_path / "two.jsonl"
    f.write_text(json.dumps(row) + "\n" + json.dumps(seq) + "\n")
    main(["plan", "--check", str(f)])
    out = capsys.readouterr().out
    assert "in sample: 2/2" in out and "out of sample: 1/1" in out and "(refit without it)" in out
    assert "the fit cannot do without this row" in out


# ----------------------------------------------------------------------------------------------------------
# host RAM, the named GPU, fidelity sources


def test_host_ram_defaults_to_this_machine():
    mem = next(int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
    assert plan.host_ram_gb() == pytest.approx(mem * 1024 / 1e9, abs=0.1)
    assert plan.ram_budget({"local": True, "host_ram_gb": None, "profile": "x"}, None) == \
        (plan.host_ram_gb(), "this machine's RAM")
    assert plan.ram_budget(plan.gpu_profile("4060"), None)[0] == 32  # a named profile's assumed typical RAM
    assert plan.ram_budget(plan.gpu_profile("4060"), 7.5) == (7.5, "--ram")


def test_too_much_ram_is_refused_and_ram_bounds_generate(capsys):
    """--gpu 4060 --vram 8GB plans within the profile's 32 GB of host RAM (the issue: it chose a 69 GB recipe)."""
    assert main(["plan", "flux-dev", "--gpu", "4060", "--vram", "8GB", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["budget"]["ram_gb"] == 32
    assert data["candidates"][0]["predicted"]["peak_host_gb"] <= 32
    heavy = [r for r in data["candidates"] if r["status"] == "too-much-ram"]
    assert heavy and all(r["predicted"]["peak_host_gb"] > 32 and "> 32.0 GB" in r["reason"] for r in heavy)
    # generate --vram: this machine's RAM unless --ram; too little RAM for every candidate is an error up front
    with pytest.raises(VramfitError, match="host RAM"):
        plan.generate_with_budget(TINY, SimpleNamespace(kind="random"), "2GB", REQ, torch.device("cpu"),
                                  lambda r: None, log=lambda m: None, gpu="h200", ram="1GB")


def test_named_gpu_is_judged_by_its_own_capability_and_libraries(monkeypatch):
    from vramfit import quant

    fp8 = Recipe(transformer="torchao-fp8dq")
    why = plan.refusal(fp8, "cuda", plan.gpu_profile("3090"), here=False)
    assert why and "compute capability >= 8.9" in why and "8.6" in why
    assert plan.refusal(fp8, "cuda", plan.gpu_profile("4090"), here=False) is None  # 8.9: fine, whatever is local
    monkeypatch.setattr(quant, "_installed", lambda dist: False)  # nothing installed on this machine
    nf4 = Recipe(transformer="bnb-nf4")
    assert plan.refusal(nf4, "cuda", plan.gpu_profile("4090"), here=False) is None  # assumed installed there
    assert "not installed" in plan.refusal(nf4, "cpu", plan.gpu_profile("4090"), here=True)


def test_fidelity_comes_from_measured_h200_rows():
    rows = [json.loads(line) for line in SEEDS.read_text().splitlines()]
    nf4 = [r["fidelity"]["latent_rel_l2"] for r in rows if r.get("scenario") == "nf4"]
    e = plan.expected_error(Recipe(transformer="bnb-nf4", text_encoder_2="bnb-nf4"))
    assert e["error"] == pytest.approx(nf4[0], abs=2e-4) and e["source"].startswith("measured on the H200")
    q = plan.expected_error(Recipe(transformer="gguf-q4_k"))  # no row: marked assumed
    assert q["assumed"] == ["gguf-q4_k"] and q["source"].startswith("assumed")


# ----------------------------------------------------------------------------------------------------------
# offload=stream and the planning horizon


def _stream(tr="bnb-nf4", k=None):
    from dataclasses import replace

    return replace(Recipe(transformer=tr, text_encoder_2=tr), offload="stream" if k is None else f"stream:{k}")


def test_stream_k_for_budgets():
    shape = plan.Shape()
    r = _stream()
    n = plan.stream_blocks("flux-dev")
    assert n == 57
    peak = [max(plan.memory.stream_stage_peaks("flux-dev", r, shape, k).values()) for k in range(n + 1)]
    need0 = plan.fits_gb(peak[0])
    ks = [plan.stream_k("flux-dev", r, shape, gb * 1e9) for gb in (0.5, need0 - 0.01, need0 + 0.01, 4, 6, 8, 12, 200)]
    assert ks == sorted(ks)  # monotone in the budget
    assert ks[0] == 0 and ks[1] == 0  # nothing fits but the non-block part: 0
    assert ks[-1] == n and plan.stream_k("flux-dev", r, shape, None) == 0  # all resident; no budget: all streamed
    for gb, k in zip((4, 6, 8), ks[3:6]):
        assert plan.fits_gb(peak[k]) <= gb and (k == n or plan.fits_gb(peak[k + 1]) > gb)  # the largest K that fits


def test_stream_prediction_follows_the_executor_model():
    """Streamed bytes over the link bound the step; host RAM holds the streamed blocks once; more resident blocks
    mean a higher peak and less streaming."""
    shape, h200 = plan.Shape(), plan.gpu_profile("h200")
    bf16 = [plan.predict("flux-dev", _stream("bf16", k), shape, h200) for k in (0, 57)]
    lay = plan.layout("flux-dev", "transformer", "bf16")
    link = h200["h2d_pinned_gbps"] * plan.calibration().get("stream", {}).get("link_fraction_of_pinned", 1.0)
    # the streamed blocks less their modulation layers (6.5 GB, copied once per image: hoisted) each step
    per_step = sum(lay.stream_blocks) - sum(lay.stream_mods)
    assert per_step / 1e9 == pytest.approx(17.2, abs=0.1)
    assert per_step / 1e9 / link <= bf16[0]["step_s"] < sum(lay.stream_blocks) / 1e9 / link
    assert bf16[0]["denoise_s"] == pytest.approx(shape.steps * bf16[0]["step_s"] + sum(lay.stream_mods) / 1e9 / link,
                                                 abs=0.01)
    with plan.memory.modulation_hoisting(False):  # as runs before 2026-12-04 streamed it: 23.8 GB a step
        assert plan.predict("flux-dev", _stream("bf16", 0), shape, h200)["step_s"] >= sum(lay.stream_blocks) / 1e9 / link
    peaks = [plan.memory.stream_stage_peaks("flux-dev", r, shape, 0)["denoise"]
             for r in (_stream("bf16", 0), _stream("bf16", 0).with_(compile="regional"))]
    assert peaks[1] > peaks[0]  # no hoisting under compile: slots for whole blocks
    assert bf16[1]["step_s"] < bf16[0]["step_s"] and bf16[1]["peak_vram_gb"] > bf16[0]["peak_vram_gb"]
    streamed = sum(lay.stream_blocks) + sum(plan.layout("flux-dev", "text_encoder_2", "bf16").stream_blocks)
    base = plan.calibration()["pipeline"]["host_base_gb"]
    random = plan.predict("flux-dev", _stream("bf16", 0), shape, h200, "random")  # drawn block by block
    assert random["peak_host_gb"] == pytest.approx(base + streamed / 1e9, abs=0.02)
    # from a checkpoint the transformer lands whole in host memory (bf16) beside T5's parked blocks
    t5_parked = sum(plan.layout("flux-dev", "text_encoder_2", "bf16").stream_blocks)
    assert bf16[0]["peak_host_gb"] == pytest.approx(base + (t5_parked + lay.total) / 1e9, abs=0.02)
    # bf16 streamed link-bound was measured on the H200 (stream-call3.jsonl); nf4 streamed never ran (its 3 GB row
    # ran out of memory): that one rests on unmeasured stream figures
    assert not any("offload=stream" in a for a in bf16[0]["unmeasured"])
    # nf4 streamed compute-bound was measured on 2026-12-02 (stream-s5-call2.jsonl, K=4 under 3 GB); bnb-fp4 and
    # quanto-int8 were never streamed at full size: those rest on unmeasured stream figures
    nf4 = plan.predict("flux-dev", _stream("bnb-nf4", 0), shape, h200)
    assert not any("offload=stream" in a for a in nf4["unmeasured"])
    for value in ("bnb-fp4", "quanto-int8"):
        other = plan.predict("flux-dev", _stream(value, 0), shape, h200)
        assert any("offload=stream" in a for a in other["unmeasured"]), value


@pytest.mark.skipif(not hasattr(Recipe, "stream_k"), reason="the recipe grammar has no offload=stream yet")
def test_plan_resolves_stream_k_and_ranks_unmeasured_after_measured():
    p = plan.make_plan("flux-dev", plan.Shape(), plan.gpu_profile("h200"), 4.0, 100.0)
    streams = [r for r in p["candidates"] if "offload=stream:" in r["recipe"]]
    assert streams and not any("offload=stream," in r["recipe"] for r in p["candidates"])
    fits = [r for r in p["candidates"] if r["status"] in ("chosen", "fits")]
    for a, b in zip(fits, fits[1:]):  # ordered by the penalised time
        assert plan.rank_key(a) <= plan.rank_key(b)
    measured = [r for r in fits if not r["predicted"]["unmeasured"]]
    unmeasured = [r for r in fits if r["predicted"]["unmeasured"]]
    assert measured  # the measured stream rows cover some recipe that fits 4 GB
    # DESIGN's rule: an unmeasured recipe ranks after every measured one within 10 % of its time
    for u in unmeasured:
        for m in measured:
            if m["predicted"]["total_s"] <= u["predicted"]["total_s"] * plan.UNMEASURED_PENALTY:
                assert fits.index(m) < fits.index(u)


def test_horizon_chooses_compile_only_when_it_pays_off(capsys):
    """One image: compiling costs more than it saves; a thousand: it pays off; a cached compile counts as cached."""
    h200 = plan.gpu_profile("h200")
    one = plan.make_plan("flux-dev", plan.Shape(images=1), h200, 140.0, 256.0)
    many = plan.make_plan("flux-dev", plan.Shape(images=1000), h200, 140.0, 256.0)
    assert "compile=off" in one["chosen"] and "compile=off" not in many["chosen"]
    cached = plan.make_plan("flux-dev", plan.Shape(images=1), h200, 140.0, 256.0, cached=lambda r: True)
    assert "compile=off" not in cached["chosen"] and cached["candidates"][0]["predicted"]["compile_cached"]
    assert main(["plan", "flux-dev", "--gpu", "h200", "--vram", "140GB", "--images", "1000", "--top", "3"]) == 0
    assert "horizon 1000 image(s)" in capsys.readouterr().out


def test_stream_host_peak_from_a_checkpoint_counts_the_component_landing_in_host_memory():
    """`generate --vram 3GB --weights DIR` (nf4 T5 + transformer, streamed) peaked at 30.7 GB of host memory on the
    H200 (2026-12-02, stream-s7-calls1-4.jsonl): each component lands in bf16 in host memory before it is quantized
    block by block, beside the blocks already parked. The random stand-in is drawn block by block (16.3 GB).
    The prediction for the checkpoint is within 10 % of the measured peak and says "too-much-ram" on a 24 GB
    machine, where the stand-in still fits."""
    shape, h200 = plan.Shape(), plan.gpu_profile("h200")
    r = Recipe.parse("transformer=bnb-nf4,text_encoder_2=bnb-nf4,offload=stream:4,vae_decode=tiling")
    hub = plan.predict("flux-dev", r, shape, h200, "dir")["peak_host_gb"]
    rnd = plan.predict("flux-dev", r, shape, h200, "random")["peak_host_gb"]
    assert hub == pytest.approx(30.7, rel=0.10) and rnd < 16.3
    rows = {w: {c["recipe"]: c["status"] for c in plan.make_plan(
        "flux-dev", shape, h200, 3.0, 24.0, recipes=[r], weights_kind=w)["candidates"]} for w in ("dir", "random")}
    assert list(rows["dir"].values()) == ["too-much-ram"] and list(rows["random"].values())[0] in ("chosen", "fits")


def test_compile_cold_start_is_keyed_by_coordinate_descent_tuning():
    """The calibration keeps torchao's compile cold start with inductor's coordinate-descent tuning (+cdtune: the
    2026-11-21 rows, 144-193 s, when torchao's configs switched it on themselves) apart from the default without it
    (session 10: 19 s); the planner reads the key the recipe says."""
    from vramfit.calibration import derive
    from vramfit.plan.latency import cold_start

    old = {"recipe": "transformer=torchao-fp8dq,compile=regional",
           "manifest": [{"step": "quantize", "api": "quantize_(module, Float8DynamicActivationFloat8WeightConfig())"}]}
    new = {"recipe": old["recipe"], "manifest": [{"step": "quantize", "api": "...(set_inductor_config=False)"}]}
    assert derive.cd_tuned(old) and not derive.cd_tuned(new)
    assert derive.cd_tuned({"recipe": "compile=regional+cdtune"}) and not derive.cd_tuned({"recipe": "compile=regional"})
    assert derive.speed_variant({"recipe": "compile=regional,cache=taylorseer:4"})
    assert derive.speed_variant({"recipe": "fuse_qkv=on,compile=regional"})
    assert not derive.speed_variant({"recipe": "transformer=torchao-fp8dq,compile=regional+nocdtune"})
    fam = plan.calibration()["compile"]["regional"]["cold_s_by_family"]
    assert fam["torchao+cdtune"]["s"] > 5 * fam["torchao"]["s"]
    plain, _ = cold_start(Recipe.parse("transformer=torchao-fp8dq,compile=regional"), [])
    tuned, _ = cold_start(Recipe.parse("transformer=torchao-fp8dq,compile=regional+cdtune"), [])
    assert tuned - plain == pytest.approx(fam["torchao+cdtune"]["s"] - fam["torchao"]["s"], abs=0.01)


def test_planner_counts_the_steps_a_fixed_schedule_cache_computes():
    """TaylorSeer's schedule is diffusers' fixed rule (3 warm-up steps, then every interval-th): 9 of 28 steps at
    interval 4, as the H200 rows computed (steps 0, 1, 2, 4, ..., 24); a threshold cache counts every step, marked
    assumed."""
    from vramfit.plan.latency import cache_steps

    assumed: list = []
    assert cache_steps(Recipe.parse("cache=taylorseer:4"), 28, assumed) == 9 and not assumed
    assert cache_steps(Recipe.parse("cache=taylorseer:2"), 8, assumed) == 5  # 0, 1, 2, 4, 6
    assert cache_steps(Recipe.parse("cache=fbc:0.1"), 28, assumed) == 28 and "fbc" in assumed[0]
    gpu, shape = plan.gpu_profile("h200"), plan.Shape(1024, 1024, 28, 1, 512)
    full = plan.predict("flux-dev", Recipe.parse("bf16"), shape, gpu)
    cached = plan.predict("flux-dev", Recipe.parse("cache=taylorseer:4"), shape, gpu)
    assert cached["denoise_s"] < 0.4 * full["denoise_s"] and cached["peak_vram_gb"] == full["peak_vram_gb"]


def test_stream_rows_are_predicted_as_their_modulation_ran():
    """A row's offload entry says whether the modulation was hoisted; the executor's counts whether any step computed
    it anew; an old row without either ran before hoisting. Each is predicted that way."""
    from vramfit.plan import memory

    hoisted = {"offload": {"components": {"transformer": {"modulation": {"hoisted_layers": 76}}}},
               "stream_measured": {"transformer": {"modulation": {"hits": 5, "unpredicted": 0}}}}
    every = {**hoisted, "stream_measured": {"transformer": {"modulation": {"hits": 0, "unpredicted": 6}}}}
    assert memory.row_hoisted(hoisted) is True and memory.row_hoisted(every) == memory.EVERY_STEP
    assert memory.row_hoisted({"offload": {"strategy": "stream", "k": 0}}) is False
    assert memory.row_hoisted({"command": "device_stream.py @ 2026-12-02T08:00:00Z"}) is False
    assert memory.row_hoisted({"command": "device_stream.py @ 2026-12-04T02:00:00Z"}) is True
    shape, h200, r = plan.Shape(), plan.gpu_profile("h200"), _stream("bf16", 0)
    pred = {}
    for mode in (True, memory.EVERY_STEP, False):
        with memory.modulation_hoisting(mode):
            pred[mode] = (plan.predict("flux-dev", r, shape, h200)["step_s"],
                          memory.stream_stage_peaks("flux-dev", r, shape, 0)["denoise"])
    # every step: the layers cross the link each step (as before hoisting) through the hoisted, smaller slots
    assert pred[True][0] < pred[memory.EVERY_STEP][0] == pytest.approx(pred[False][0], rel=0.01)
    assert pred[memory.EVERY_STEP][1] < pred[False][1]
