"""The planner: weight accounting against real quantized modules, plan choice, budgets, JSON, OOM fallback,
and predictions against the committed H200 measurements (CPU only; no timing assertions)."""

from __future__ import annotations

import json
import warnings
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
    shape = plan.Shape(1024, 1024, 28)
    last = None
    for budget in (2.5, 3.5, 5, 8, 12, 16, 24, 40, 80):
        p = plan.make_plan("flux-dev", shape, dev_4090, budget)
        chosen = next((r for r in p["candidates"] if r["status"] == "chosen"), None)
        if chosen is None:
            assert last is None, f"{budget} GB fits nothing but a smaller budget did"
            continue
        assert chosen["needs_vram_gb"] <= budget
        t = chosen["predicted"]["total_s"]
        assert last is None or t <= last + 1e-9, (budget, t, last)
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
    assert set(data["budget"]) == {"vram_gb", "ram_gb", "margin", "reserve_gb", "max_error"}
    statuses = {"chosen", "fits", "too-big", "too-much-ram", "too-lossy", "refused"}
    keys = {"peak_vram_gb", "peak_host_gb", "weights_gb", "stage_peak_gb", "step_s", "encode_s", "denoise_s",
            "decode_s", "warm_s", "cold_s", "total_s", "expected_error", "fidelity", "assumed"}
    assert [r["status"] for r in data["candidates"]].count("chosen") == 1
    assert data["candidates"][0]["recipe"] == data["chosen"]
    for r in data["candidates"]:
        assert set(r) == {"recipe", "status", "reason", "needs_vram_gb", "predicted"} and r["status"] in statuses
        Recipe.parse(r["recipe"])  # every candidate is a valid recipe string
        if r["status"] == "refused":
            assert r["reason"] and r["predicted"] is None
        else:
            assert set(r["predicted"]) == keys
            assert r["predicted"]["fidelity"] in ("lossless", "near", "lossy")
        if r["status"] not in ("chosen", "fits"):
            assert r["reason"]
    # refusals come from the project's own combination rules
    assert any("illegal memory access" in (r["reason"] or "") for r in data["candidates"])


def test_fp8_compute_refused_without_fp8_tensor_cores():
    p = plan.make_plan("flux-dev", plan.Shape(), plan.gpu_profile("3090"), 24,
                       recipes=[Recipe(transformer="torchao-fp8dq", offload="model")])
    assert p["candidates"][0]["status"] == "refused" and "fp8" in p["candidates"][0]["reason"]


def test_text_plan_prints_every_candidate(capsys):
    assert main(["plan", "flux-dev", "--gpu", "h200", "--vram", "4GB"]) == 0
    out = capsys.readouterr().out
    n = len(plan.candidate_recipes(plan.Shape()))
    assert out.count("\n=>") == 1 and "chosen:" in out
    assert sum(line.startswith(("=>", "  ")) and any(s in line for s in ("fits", "too-big", "refused", "chosen"))
               for line in out.splitlines()) >= n


# ----------------------------------------------------------------------------------------------------------
# generate --vram: out-of-memory fallback


def test_oom_falls_back_to_the_next_candidate():
    calls, logs = [], []

    class FakeRunner:
        def __init__(self, recipe):
            self.recipe = recipe

        def generate(self, request):
            calls.append(str(self.recipe))
            if len(calls) == 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return SimpleNamespace(record={"memory": {"peak_allocated_gb": 0.01}, "timings": {"total_s": 1.0}})

    req = SimpleNamespace(height=128, width=128, steps=2, max_sequence_length=32)
    weights = SimpleNamespace(kind="random")
    result, rec = plan.generate_with_budget(TINY, weights, "2GB", req, torch.device("cpu"), FakeRunner,
                                            log=logs.append, gpu="h200")
    assert len(calls) == 2 and calls[0] != calls[1]
    assert rec["planned"] == calls[0] and rec["chosen"] == calls[1]
    assert rec["fallbacks"][0]["recipe"] == calls[0] and "OutOfMemoryError" in rec["fallbacks"][0]["error"]
    assert result.record["plan"] is rec and rec["predicted"]["peak_vram_gb"] > 0
    assert rec["measured"]["peak_vram_gb"] == 0.01
    assert any("out of memory" in m for m in logs) and any("falling back" in m for m in logs)


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
    assert main(["plan", "--check", str(FOUNDATION)]) == 0
    out = capsys.readouterr().out
    assert "7/7 rows within bounds" in out and out.strip().splitlines()[-2].startswith("worst:")


def test_check_fails_on_a_doctored_row(tmp_path, capsys):
    rows = [json.loads(line) for line in FOUNDATION.read_text().splitlines()]
    # offload=model claimed to peak at 36 GB while generating (the check reads the generation peak)
    rows[1]["memory"]["generate_peak_allocated_gb"] *= 1.5
    rows.append({"scenario": "broken", "error": "CUDA error: an illegal memory access", "exit_code": 1})
    f = tmp_path / "doctored.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["plan", "--check", str(f)]) == 1
    out = capsys.readouterr().out
    assert "OUT OF BOUNDS" in out and "broken" in out and "skipped" in out


def _bench_row(recipe: Recipe, steps: int, *, warm: bool = True, role: str = "scenario", scale: float = 1.0) -> dict:
    """A synthetic vramfit.bench/1 row measured as the planner predicts it (times x ``scale``)."""
    pred = plan.predict("flux-dev", recipe, plan.Shape(1024, 1024, steps), plan.gpu_profile("h200"), "random")
    cold_total = pred["warm_s"] + pred["cold_s"]
    return {
        "schema": "vramfit.bench/1", "scenario": f"synthetic-{recipe.transformer}-{steps}", "role": role,
        "status": "ok", "exit_reason": None, "error": None, "model": "flux-dev",
        "weights": {"kind": "random", "seed": 0}, "recipe": str(recipe),
        "request": {"prompt": "p", "height": 1024, "width": 1024, "guidance": None, "steps": steps, "seeds": [0]},
        "steps": steps, "steps_default": 28, "steps_reduced": steps < 28,
        "device": {"type": "cuda", "name": "NVIDIA H200"},
        "memory": {"gpu": True, "after_load_gb": 1.0, "peak_gb": pred["peak_vram_gb"],
                   "peak_incl_load_gb": pred["peak_vram_gb"] * 3},  # the load peak is not what is checked
        "cold": {"total_s": cold_total * scale,  # a cold run's mean step carries the first step's extra
                 "s_per_step": (pred["denoise_s"] + plan.calibration()["pipeline"]["first_step_extra_s"]) / steps},
        "warm": {"n": 1 if warm else 0, "total_s_median": pred["warm_s"] * scale if warm else None,
                 "s_per_step_median": pred["denoise_s"] / steps * scale if warm else None},
    }


def test_check_reads_bench_rows(tmp_path, capsys):
    """plan --check parses vramfit.bench/1 rows: generation peak, warm mean step and total; error rows are
    skipped with their exit reason; a cold-only reference row is checked from its cold run."""
    good = _bench_row(Recipe(transformer="bnb-nf4", text_encoder_2="bnb-nf4"), 28)
    ref = _bench_row(Recipe(), 28, warm=False, role="reference")
    oom = {**_bench_row(Recipe(transformer="bf16"), 28), "status": "error", "exit_reason": "oom",
           "error": "CUDA out of memory", "memory": None, "warm": None, "cold": None}
    f = tmp_path / "bench.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in (good, ref, oom)))
    assert main(["plan", "--check", str(f)]) == 0
    out = capsys.readouterr().out
    assert "no comparable rows" not in out and "an error row" not in out
    assert "2/2 rows within bounds" in out and "synthetic-bnb-nf4-28" in out and "warm mean" in out
    assert "cold mean" in out and "skipped, status error (oom)" in out

    slow = _bench_row(Recipe(transformer="bnb-nf4", text_encoder_2="bnb-nf4"), 28, scale=1.5)
    f.write_text(json.dumps(slow) + "\n")
    assert main(["plan", "--check", str(f)]) == 1
    assert "OUT OF BOUNDS (s/step, total)" in capsys.readouterr().out


def test_check_several_files_and_reduced_steps(tmp_path, capsys):
    """Several files at once; an 8-step row's total is shown but not held to the tolerance."""
    row = _bench_row(Recipe(), 8)
    row["warm"]["total_s_median"] *= 2  # fixed costs of a short run: not checked
    f = tmp_path / "short.jsonl"
    f.write_text(json.dumps(row) + "\n")
    assert main(["plan", "--check", str(f), str(FOUNDATION)]) == 0
    out = capsys.readouterr().out
    assert "8/8 rows within bounds" in out and "~" in out and "largest unchecked (~) total error: -50.0%" in out
