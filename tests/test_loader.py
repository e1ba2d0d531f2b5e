"""The one loader: pipeline-level quantization for --weights DIR, placement, and what a checkpoint really holds."""

import json

import pytest
import torch

from vramfit import apply, cli, models, quant
from vramfit.errors import InputError, RecipeError
from vramfit.recipe import Recipe
from vramfit.run import Runner, request_for

PROMPT = "a red fox in the snow"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("loader") / "tiny"
    assert cli.main(["export", "flux-tiny", "--out", str(d)]) == 0
    return d


def run(args, capsys):
    code = cli.main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dir_with_quantization_goes_through_pipeline_quantization_config(ckpt, tmp_path, capsys):
    png = tmp_path / "a.png"
    code, _, err = run(["generate", PROMPT, "--model", "flux-tiny", "--weights", str(ckpt), "--recipe",
                        "transformer=torchao-int8wo,text_encoder_2=quanto-int8", "--steps", "2", "--device", "cpu",
                        "--no-progress", "--out", str(png)], capsys)
    assert code == 0, err
    rec = json.loads(png.with_suffix(".json").read_text())
    [pq] = [s for s in rec["manifest"] if s["step"] == "pipeline-quantization"]
    assert pq["form"] == "mapping" and pq["verified"]
    assert "PipelineQuantizationConfig(quant_mapping=" in pq["api"]
    assert pq["configs"]["transformer"]["class"] == "diffusers.TorchAoConfig"
    assert pq["configs"]["text_encoder_2"]["class"] == "transformers.QuantoConfig"
    assert set(pq["configs"]) == {"transformer", "text_encoder_2"}
    assert pq["quantized_classes"]["transformer"] == {"Linear/Int8Tensor": 50}
    loads = {s["component"]: s for s in rec["manifest"] if s["step"] == "load"}
    assert "via PipelineQuantizationConfig" in loads["transformer"]["api"]
    assert "via PipelineQuantizationConfig" not in loads["vae"]["api"]
    # nothing was quantized a second time after loading
    assert not [s for s in rec["manifest"] if s["step"] == "quantize"]


def test_backend_form_and_its_refusals(ckpt):
    spec = models.get_model("flux-tiny")
    w = models.resolve_weights(spec, str(ckpt))
    recipe = Recipe.parse("transformer=torchao-int8wo")
    with pytest.raises(RecipeError, match="Alternative: --form mapping"):
        apply.load_pipeline(spec, w, recipe, CPU, apply.Manifest(), form="backend")
    configs = {c: apply.component_quantization_config(Recipe.parse("nf4"), w, c) for c in models.COMPONENTS}
    configs = {c: v for c, v in configs.items() if v is not None}
    pq = quant.pipeline_quantization_config(configs, Recipe.parse("nf4").components, "backend")
    assert pq.quant_backend == "bitsandbytes_4bit" and pq.components_to_quantize == ["text_encoder_2", "transformer"]
    assert pq.quant_kwargs["bnb_4bit_quant_type"] == "nf4"


def test_fp8_layerwise_is_applied_after_load_and_said_so(ckpt):
    spec = models.get_model("flux-tiny")
    w = models.resolve_weights(spec, str(ckpt))
    m = apply.Manifest()
    pipe = apply.build_pipeline(spec, w, Recipe.parse("transformer=fp8-layerwise"), CPU, m)
    assert not m.find("pipeline-quantization")
    [q] = m.find("quantize")
    assert q["component"] == "transformer" and q["when"].startswith("after from_pretrained")
    assert pipe.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn


def test_staged_loads_per_component_with_the_same_configs(ckpt):
    spec = models.get_model("flux-tiny")
    w = models.resolve_weights(spec, str(ckpt))
    r = Runner(spec, w, Recipe.parse("transformer=torchao-int8wo,offload=staged"), CPU, progress=False)
    rec = r.generate(request_for(spec, PROMPT, steps=1)).record
    [load] = [s for s in rec["manifest"] if s["step"] == "load" and s["component"] == "transformer"]
    assert "quantization_config=TorchAoConfig" in load["api"] and load["quantized_classes"]
    assert not [s for s in rec["manifest"] if s["step"] == "pipeline-quantization"]


class _Recorder(torch.nn.Module):
    def __init__(self, saved):
        super().__init__()
        self.config = {"quantization_config": saved} if saved else {}
        self.moved_to = None

    def to(self, device):  # noqa: D401 - records the call
        self.moved_to = device
        return self


def test_place_moves_everything_but_what_bitsandbytes_placed():
    dev = torch.device("cuda")  # never touched: .to is recorded, not run
    for saved in (None, {"quant_method": "torchao"}, {"quant_method": "quanto"}):
        m = _Recorder(saved)
        assert models.place(m, dev).moved_to == dev  # the bug: quantized components stayed on the CPU
    m = _Recorder({"quant_method": "bitsandbytes", "load_in_8bit": True})
    assert models.place(m, dev).moved_to is None  # bnb placed itself; 8-bit refuses .to()


def test_quantize_on_load_onto_a_gpu_lands_each_weight_there():
    dev = torch.device("cuda")
    for value in ("torchao-int4wo", "torchao-int8wo", "quanto-int8"):
        cfg = quant.quantization_config(value, "transformer")
        kw = models.pretrained_load_kwargs("transformer", torch.bfloat16, dev, cfg)
        assert kw["device_map"] == {"": dev} and kw["low_cpu_mem_usage"]
        assert "device_map" not in models.pretrained_load_kwargs("transformer", torch.bfloat16, CPU, cfg)
    assert models.quantizes_on_cuda_only(quant.quantization_config("torchao-int4wo", "transformer"))
    assert not models.quantizes_on_cuda_only(quant.quantization_config("torchao-int8wo", "transformer"))
    # the pipeline: straight onto the GPU when everything is resident, or the quantizer is CUDA-only
    nf = Recipe.parse("transformer=torchao-int8wo")
    assert apply.pipeline_device_map(nf, dev, {}) == "cuda"
    assert apply.pipeline_device_map(nf.with_(offload="model"), dev, {"transformer": 0}) is None
    int4 = {"transformer": quant.quantization_config("torchao-int4wo", "transformer")}
    assert apply.pipeline_device_map(Recipe.parse("transformer=torchao-int4wo,offload=model"), dev, int4) == "cuda"
    assert apply.pipeline_device_map(nf, CPU, {}) is None
    # fp8 layerwise casting runs after loading: into host memory, cast, then placed (never bf16 whole on the GPU)
    for r in ("transformer=fp8-layerwise", "transformer=fp8-layerwise-e5m2,text_encoder_2=torchao-int8wo"):
        assert apply.pipeline_device_map(Recipe.parse(r), dev, {}) is None, r
    gguf = Recipe.parse("transformer=gguf-q4_1")  # quantized in memory after loading, unless it comes from a file
    assert apply.pipeline_device_map(gguf, dev, {}) is None
    assert apply.pipeline_device_map(gguf, dev, {}, None, "t.gguf") == "cuda"
    mixed = Recipe.parse("transformer=fp8-layerwise,text_encoder_2=torchao-int4wo")
    assert apply.pipeline_device_map(mixed, dev, {"text_encoder_2": quant.quantization_config(
        "torchao-int4wo", "text_encoder_2")}) == "cuda"  # a CUDA-only quantizer still needs the device


@pytest.mark.parametrize("method,want", [("quanto", None), ("torchao", "cuda"), (None, "cuda")])
def test_a_prequantized_quanto_checkpoint_loads_without_a_device_map(tmp_path, method, want):
    # the H200 matrix: quanto-int8 from `vramfit quantize`'s output with device_map="cuda" fails inside diffusers'
    # allocator warm-up ("...weight._data not found"); it loads into host memory and is placed after
    (tmp_path / "transformer").mkdir()
    cfg = {"_class_name": "FluxTransformer2DModel"}
    if method:
        cfg["quantization_config"] = {"quant_method": method}
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(cfg))
    w = models.Weights("dir", path=str(tmp_path))
    assert apply.pipeline_device_map(Recipe(), torch.device("cuda"), {}, w) == want


def test_prequantized_dir_without_vramfit_json_records_what_it_holds(tmp_path, capsys):
    ck = tmp_path / "q"
    code, _, err = run(["quantize", "flux-tiny", "--recipe", "transformer=torchao-int8wo", "--device", "cpu",
                        "--out", str(ck)], capsys)
    assert code == 0, err
    (ck / "vramfit.json").unlink()  # e.g. copied without it, or written by another tool
    png = tmp_path / "a.png"
    code, _, err = run(["generate", PROMPT, "--model", "flux-tiny", "--weights", str(ck), "--steps", "1",
                        "--device", "cpu", "--no-progress", "--out", str(png)], capsys)
    assert code == 0, err
    rec = json.loads(png.with_suffix(".json").read_text())
    assert rec["recipe"].startswith("transformer=torchao-int8wo,")  # the record says what really loaded
    [load] = [s for s in rec["manifest"] if s["step"] == "load" and s["component"] == "transformer"]
    assert "pre-quantized" in load["api"] and load["quantized_classes"] == {"Linear/Int8Tensor": 50}

    code, _, err = run(["generate", PROMPT, "--model", "flux-tiny", "--weights", str(ck), "--recipe",
                        "transformer=quanto-int8", "--device", "cpu", "--out", str(tmp_path / "b.png")], capsys)
    assert code == 2 and "holds transformer=torchao-int8wo" in err and "Alternative" in err
    assert not (tmp_path / "b.png").exists()

    cfg = ck / "transformer" / "config.json"
    data = json.loads(cfg.read_text())
    data["quantization_config"] = {"quant_method": "hqq"}
    cfg.write_text(json.dumps(data))
    with pytest.raises(InputError, match="cannot name"):
        models.checkpoint_recipe(models.resolve_weights(models.get_model("flux-tiny"), str(ck)))


@pytest.mark.parametrize("saved,value", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "bnb-nf4"),
    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "bnb-int8"),
    ({"quant_method": "quanto", "weights_dtype": "float8"}, "quanto-fp8"),
    ({"quant_method": "quanto", "weights": "int4"}, "quanto-int4"),
    ({"quant_method": "torchao", "quant_type": {"default": {"_type": "Int4WeightOnlyConfig"}}}, "torchao-int4wo"),
    ({"quant_method": "gptq"}, None),
])
def test_saved_configs_name_their_value(saved, value):
    assert quant.value_of_saved_config(saved) == value


@pytest.mark.parametrize("value", [v for v, s in quant.BACKENDS.items() if s.family in ("torchao", "quanto", "bnb")])
def test_every_config_vramfit_writes_reads_back_as_its_value(value):
    # the H200 matrix: a torchao-fp8dq-tensor checkpoint read back as torchao-fp8dq (granularity is saved as an
    # (activation, weight) list, which the reader took for a dict)
    cfg = quant.quantization_config(value, "transformer")
    saved = json.loads(json.dumps(cfg.to_dict(), default=str))  # what config.json holds
    assert quant.value_of_saved_config(saved) == value


def test_from_pretrained_with_a_quantization_config_is_placed(ckpt, monkeypatch):
    # the H200 bug: with a quantization_config the component was never moved ("mat2 is on cpu")
    seen = []
    real = models.place
    monkeypatch.setattr(models, "place", lambda m, d: seen.append(d) or real(m, d))
    cfg = quant.quantization_config("torchao-int8wo", "transformer")
    m = models.load_pretrained_component(str(ckpt), "transformer", torch.bfloat16, CPU, cfg)
    assert seen == [CPU] and quant.quantized_classes(m)  # placed through the one placement point


def test_per_tensor_fp8_is_refused_where_torchao_misreads_128x128_weights():
    # the H200 matrix: every flux-tiny cell with torchao-fp8dq-tensor failed in torchao's matmul ("input_tensor
    # must be 1x128 scaled"): a per-tensor scale of a 128x128 weight is taken for 128x128 block scaling
    tiny, dev = models.get_model("flux-tiny"), models.get_model("flux-dev")
    r = Recipe.parse("transformer=torchao-fp8dq-tensor")
    with pytest.raises(RecipeError, match="128x128.*Alternative: transformer=torchao-fp8dq"):
        apply.check(r, CPU, tiny)
    assert not list(apply.model_problems(dev, r.components))  # FLUX.1-dev has no 128x128 linear layer
    assert not list(apply.model_problems(tiny, Recipe.parse("transformer=torchao-fp8dq").components))
    from vramfit.plan.choice import refusal

    assert "128x128" in refusal(r, "cuda", {"capability": "9.0"}, here=False, model="flux-tiny")
    assert refusal(r, "cuda", {"capability": "9.0"}, here=False, model="flux-dev") is None


def test_int4_weights_are_refused_with_group_offload():
    # the H200 matrix: diffusers' group offload calls is_pinned(), which torchao's int4 tensor lacks
    for o in ("group-block", "group-leaf"):
        probs = list(apply.problems({"transformer": "torchao-int4wo"}, o, "off", "native", "cuda", installed=False))
        assert any("is_pinned" in why and "offload=stream" in alt for why, alt in probs)
    assert not list(apply.problems({"transformer": "torchao-int4wo"}, "model", "off", "native", "cuda",
                                   installed=False))
