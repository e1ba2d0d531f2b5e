"""GPU tests (marker ``gpu``; skipped without CUDA): `PYTHONPATH=$PWD python -m pytest -m gpu -q tests/test_gpu.py`.

The real-loading-path matrix (issue 13): flux-tiny exported to a directory (``vramfit export``); for every
backend value that runs on CUDA, on each component it applies to (transformer and T5; GGUF: transformer only),
loaded two ways --

* ``dir``: ``--weights DIR`` with the recipe, quantized on load (``PipelineQuantizationConfig`` for the pipeline,
  the per-component configs for ``offload=staged``);
* ``saved``: from ``vramfit quantize``'s output directory (GGUF: a file from ``vramfit export-gguf`` + ``--gguf``),

and generating 2 steps at 64x64 on CUDA with every offload strategy the compatibility rules (``apply.problems``,
the code behind ``vramfit recipes``) allow, compile off. GGUF: q8_0, q4_1 and q2_k stand for the writable types
(one per block family; they share the loading path). Counts per cell are printed at the end and written to
``$VRAMFIT_MATRIX_JSON`` (default ``$OUT/gpu_matrix.json`` when ``$OUT`` is set).

``VRAMFIT_MATRIX_SHARD=i/n`` runs the backend values with index i mod n only (and the other GPU tests in shard 0):
``benchmarks/device_round.sh`` runs n shards side by side on one GPU (flux-tiny needs little of it); each shard
appends its cells to ``$OUT/gpu_matrix.jsonl``. Values are whole per shard, so the same-latents check holds per
shard.

``test_loading_matrix_cpu`` runs a handful of cells of the same code on CPU (not gpu-marked), so the matrix
logic itself is tested everywhere.
"""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vramfit import apply, cli, gguf_io, gguf_torch, models, quant, stream
from vramfit.recipe import OFFLOADS, Recipe
from vramfit.run import Runner, request_for

gpu = pytest.mark.gpu
GGUF_SAMPLE = ("gguf-q8_0", "gguf-q4_1", "gguf-q2_k")
RESULTS: dict[str, dict] = {}


def shard() -> tuple[int, int]:
    """(i, n) from ``VRAMFIT_MATRIX_SHARD=i/n`` (default 0/1: everything)."""
    raw = os.environ.get("VRAMFIT_MATRIX_SHARD", "0/1")
    i, n = (int(x) for x in raw.split("/"))
    if not 0 <= i < n:
        raise ValueError(f"VRAMFIT_MATRIX_SHARD={raw!r}: want i/n with 0 <= i < n")
    return i, n


def matrix_values(sharded: bool = True) -> list[str]:
    out = []
    for value, spec in quant.BACKENDS.items():
        if spec.family == "gguf" and value not in GGUF_SAMPLE:
            continue
        out.append(value)
    i, n = shard() if sharded else (0, 1)
    if n == 1:
        return out
    # balanced by cell count (longest first onto the least-loaded shard): an index-mod-n split left two of four
    # shards with twice the cells of the others on the H200 (2026-12-02), and they ran out of time
    count = {v: sum(allowed(v, o, "cuda") for o in OFFLOADS) for v in out}
    load, owner = [0] * n, {}
    for v in sorted(out, key=lambda v: -count[v]):
        k = min(range(n), key=lambda j: load[j])
        owner[v], load[k] = k, load[k] + count[v]
    return [v for v in out if owner[v] == i]


not_first_shard = pytest.mark.skipif(shard()[0] != 0, reason="VRAMFIT_MATRIX_SHARD: runs in shard 0")


@gpu
@not_first_shard
@pytest.mark.parametrize("qtype", ["q8_0", "q4_1", "q4_0", "q5_1", "q5_0", "q4_k", "q2_k"])
def test_cuda_gguf_quantizers_match_numpy_bytes(qtype):
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(512, 3072, generator=g) * torch.rand(512, 1, generator=g) * 0.1).to(torch.bfloat16)
    got = gguf_torch.quantize(t.cuda(), qtype, device="cuda")
    want = gguf_io.quantize_array(t.float().numpy(), qtype, backend="numpy")
    assert np.array_equal(got, want)


@gpu
@not_first_shard
@pytest.mark.parametrize("recipe", ["offload=model", "offload=sequential", "offload=group-block",
                                    "offload=group-leaf", "offload=staged"])
def test_offload_strategies_bit_identical_on_gpu(recipe):
    spec = models.get_model("flux-tiny")
    w = models.resolve_weights(spec, "random")
    req = request_for(spec, "a fox", steps=2)
    dev = torch.device("cuda")
    ref = Runner(spec, w, Recipe(), dev, progress=False).generate(req)
    got = Runner(spec, w, Recipe.parse(recipe), dev, progress=False).generate(req)
    assert torch.equal(ref.latents, got.latents)
    assert np.array_equal(np.asarray(ref.image), np.asarray(got.image))


@gpu
@not_first_shard
def test_probe_bnb_int8_moves_between_host_and_gpu_under_model_offload():
    """The probe that lifted a refusal (``transformer=bnb-int8`` with ``offload=model``): diffusers 0.42.1 no longer
    blocks ``.to()`` of an 8-bit model with bitsandbytes >= 0.48. Here diffusers' own model offload is switched on
    over a resident bnb-int8 pipeline; the latents must equal the resident run's (the Int8Params and their SCB row
    scales survive the moves). The matrix below runs the cell on the real loading path."""
    spec = models.get_model("flux-tiny")
    w = models.resolve_weights(spec, "random")
    req = request_for(spec, "a fox", steps=2)
    r = Runner(spec, w, Recipe(transformer="bnb-int8"), torch.device("cuda"), progress=False)
    ref = r.generate(req)
    r.pipe.enable_model_cpu_offload(device="cuda")
    assert all(p.device.type == "cpu" for p in r.pipe.transformer.parameters()), "model offload did not move it out"
    got = r.generate(req)
    assert torch.equal(ref.latents, got.latents)
    r.close()


# ----------------------------------------------------------------------------------------------------------
# the real-loading-path matrix


def recipe_for(value: str) -> Recipe:
    spec = quant.get_spec(value)
    comps = {"transformer": value}
    if "text_encoder_2" in spec.components and spec.family != "gguf":
        comps["text_encoder_2"] = value
    return Recipe(**comps)




def allowed(value: str, offload: str, device_type: str) -> bool:
    r = recipe_for(value).with_(offload=offload)
    if any(True for _ in apply._unbuilt(r)) or any(True for _ in apply.model_problems(models.get_model("flux-tiny"),
                                                                                        r.components)):
        return False
    return not list(apply.problems(r.components, r.offload_kind, "off", "native", device_type))


def cells(device_type: str, sharded: bool = True) -> list[tuple[str, str, str]]:
    return [(v, o, src) for v in matrix_values(sharded) for o in OFFLOADS if allowed(v, o, device_type)
            for src in ("dir", "saved")]


class Checkpoints:
    """flux-tiny exported once; per value its ``vramfit quantize`` directory or ``export-gguf`` file, made once."""

    def __init__(self, root: Path, device: str):
        self.root, self.device = root, device
        self.dir = root / "export"
        assert cli.main(["export", "flux-tiny", "--out", str(self.dir)]) == 0
        self._saved: dict[str, Path] = {}

    def saved(self, value: str) -> Path:
        if value not in self._saved:
            if value.startswith("gguf-"):
                out = self.root / f"{value}.gguf"
                code = cli.main(["export-gguf", "flux-tiny", "--weights", str(self.dir), "--type",
                                 value.removeprefix("gguf-"), "--out", str(out)])
            else:
                out = self.root / f"q-{value}"
                rec = recipe_for(value)
                items = ",".join(f"{c}={v}" for c, v in rec.quantized().items())
                code = cli.main(["quantize", "flux-tiny", "--weights", str(self.dir), "--recipe", items,
                                 "--device", self.device, "--out", str(out)])
            assert code == 0, f"writing the {value} checkpoint failed"
            self._saved[value] = out
        return self._saved[value]


def run_cell(ck: Checkpoints, value: str, offload: str, source: str, device: torch.device) -> dict:
    spec = models.get_model("flux-tiny")
    recipe = recipe_for(value).with_(offload=offload)
    gguf_file = None
    if source == "saved" and value.startswith("gguf-"):
        gguf_file = str(ck.saved(value))
        weights = models.resolve_weights(spec, str(ck.dir))
    elif source == "saved":
        weights = models.resolve_weights(spec, str(ck.saved(value)))
        recipe = cli.resolve_recipe(f"offload={offload}", weights)  # what the checkpoint holds
        assert recipe.quantized() == recipe_for(value).quantized()
    else:
        weights = models.resolve_weights(spec, str(ck.dir))
    runner = Runner(spec, weights, recipe, device, gguf_file=gguf_file, progress=False)
    res = runner.generate(request_for(spec, "a red fox", steps=2, height=64, width=64))
    rec = res.record
    assert rec["latents"]["finite"]
    steps = rec["manifest"]
    family = quant.get_spec(value).family
    if source == "dir" and family in ("bnb", "torchao", "quanto"):
        if offload in ("staged", "stream"):  # component by component (each placed where its stage/executor wants)
            loads = {s["component"]: s for s in steps if s["step"] == "load"}
            for c, v in recipe.quantized().items():
                if offload == "stream" and (c == "transformer" or stream.blockwise_from_host(v, c)):
                    # bf16 into host memory, quantized per block
                    [qs] = [s for s in steps if s["step"] == "quantize" and s["component"] == c]
                    assert "quantize_streamed" in qs["api"] and qs["quantized_modules"], qs
                    continue
                assert "quantization_config=" in loads[c]["api"] and loads[c].get("quantized_classes"), loads[c]
        else:
            [pq] = [s for s in steps if s["step"] == "pipeline-quantization"]
            assert pq["verified"] and set(pq["configs"]) == set(recipe.quantized())
    if offload == "stream" and device.type == "cuda":
        on_gpu = [c for c, v in recipe.quantized().items()  # T5 quantized on load on the GPU, then parked
                  if c == "text_encoder_2" and stream.load_device(v, device, c).type == "cuda"
                  and not stream.blockwise_from_host(v, c)]
        if weights.kind == "dir" and not gguf_file:  # quantize-on-load: blocks parked before the next component
            parked = {s["component"] for s in steps if s["step"] == "stream-park"}
            assert set(on_gpu) <= parked, (on_gpu, parked)
    quantized_somewhere = [s for s in steps if s.get("quantized_classes") or (s["step"] == "quantize"
                                                                                and s.get("quantized_modules"))]
    assert quantized_somewhere, "no quantized layers recorded"
    if offload == "none" and device.type == "cuda":
        # the H200 bug: quantized components left on the CPU
        tr = runner.pipe.transformer
        assert all(p.device.type == "cuda" for p in tr.parameters()), "transformer weights left off the GPU"
    runner.close()
    return {"s_per_step": rec["timings"]["s_per_step"], "sha": rec["latents"]["sha256"]}


def record(value, offload, source, fn):
    key = f"{value}|{offload}|{source}"
    t0 = time.perf_counter()
    try:
        info = fn()
    except BaseException as e:  # noqa: BLE001 - counted, then re-raised so pytest reports it
        RESULTS[key] = {"value": value, "offload": offload, "source": source, "ok": False,
                        "wall_s": round(time.perf_counter() - t0, 2), "error": f"{type(e).__name__}: {str(e)[:300]}"}
        _append(RESULTS[key])
        raise
    RESULTS[key] = {"value": value, "offload": offload, "source": source, "ok": True,
                    "wall_s": round(time.perf_counter() - t0, 2), **info}
    _append(RESULTS[key])


def _append(cell: dict) -> None:
    """Each cell as it ends, one JSON line (``$OUT/gpu_matrix.jsonl``): a run stopped by its time limit keeps them."""
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "gpu_matrix.jsonl", "a") as f:
            f.write(json.dumps(cell, default=str) + "\n")


@pytest.fixture(scope="module")
def summary(request):
    yield RESULTS
    if not RESULTS:
        return
    passed = sum(r["ok"] for r in RESULTS.values())
    lines = [f"loading matrix: {passed} passed, {len(RESULTS) - passed} failed of {len(RESULTS)} cells"]
    by_source: dict = {}
    for r in RESULTS.values():
        d = by_source.setdefault(r["source"], [0, 0])
        d[0 if r["ok"] else 1] += 1
    lines += [f"  source={s}: {p} passed, {f} failed" for s, (p, f) in sorted(by_source.items())]
    lines += [f"  FAILED {k}: {r['error']}" for k, r in RESULTS.items() if not r["ok"]]
    i, n = shard()
    name = "gpu_matrix.json" if n == 1 else f"gpu_matrix-{i}of{n}.json"
    target = os.environ.get("VRAMFIT_MATRIX_JSON") or (str(Path(os.environ["OUT"]) / name)
                                                      if os.environ.get("OUT") else None)
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(json.dumps({"passed": passed, "failed": len(RESULTS) - passed,
                                            "cells": list(RESULTS.values())}, indent=1) + "\n")
        lines.append(f"  written to {target}")
    tr = request.config.pluginmanager.getplugin("terminalreporter")
    for line in lines:
        (tr.write_line if tr else print)(line)


@pytest.fixture(scope="module")
def gpu_checkpoints(tmp_path_factory):
    return Checkpoints(tmp_path_factory.mktemp("gpu-matrix"), "cuda")


@gpu
@pytest.mark.parametrize("value,offload,source", cells("cuda"))
def test_loading_matrix_gpu(gpu_checkpoints, summary, value, offload, source):
    record(value, offload, source, lambda: run_cell(gpu_checkpoints, value, offload, source, torch.device("cuda")))


@gpu
def test_loading_matrix_every_offload_gives_the_same_latents(summary):
    """After the matrix cells (pytest runs them first, in file order): per backend value and source, every offload
    strategy that ran produced the same latents (sha256) -- offloading moves weights, it must not change a bit.
    Seen on the H200 on 2026-12-01 for the 18 groups that ran (benchmarks/results/2026-12-01-h200/)."""
    groups: dict = {}
    for r in RESULTS.values():
        if r["ok"]:
            groups.setdefault((r["value"], r["source"]), {})[r["offload"]] = r["sha"]
    if not groups:
        pytest.skip("no matrix cell ran")
    differ = {k: v for k, v in groups.items() if len(set(v.values())) > 1}
    assert not differ, differ


def test_matrix_shards_partition_the_values(monkeypatch):
    everything = matrix_values(sharded=False)
    seen = []
    for i in range(3):
        monkeypatch.setenv("VRAMFIT_MATRIX_SHARD", f"{i}/3")
        seen += matrix_values()
    assert sorted(seen) == sorted(everything) and len(seen) == len(set(seen))
    monkeypatch.setenv("VRAMFIT_MATRIX_SHARD", "3/3")
    with pytest.raises(ValueError):
        shard()


CPU_CELLS = [("torchao-int8wo", "none", "dir"), ("quanto-int8", "staged", "dir"), ("fp8-layerwise", "none", "saved"),
             ("torchao-int8wo", "staged", "saved"), ("gguf-q8_0", "none", "saved"), ("quanto-int8", "stream", "dir")]


@not_first_shard
def test_loading_matrix_cpu(tmp_path, summary):
    allowed_here = {c for c in cells("cpu", sharded=False)}
    assert set(CPU_CELLS) <= allowed_here  # the rules allow them on CPU
    assert not any(o in ("model", "group-block") for _, o, _ in allowed_here)  # accelerator offloads refused
    ck = Checkpoints(tmp_path, "cpu")
    for value, offload, source in CPU_CELLS:
        record(value, offload, source, lambda: run_cell(ck, value, offload, source, torch.device("cpu")))
    assert all(RESULTS[f"{v}|{o}|{s}"]["ok"] for v, o, s in CPU_CELLS)
