"""Quantization backends on CPU with the flux-tiny transformer (random weights, fixed inputs).

Error bounds are relative L2 error of the transformer output vs bf16, measured on this model (torch 2.13 CPU,
diffusers 0.42.1) and set at ~1.5x the measurement; a lower bound checks that quantization happened at all.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from vramfit import quant
from vramfit.errors import RecipeError
from vramfit.models import build_random_component, get_model
from vramfit.quant import (
    BACKENDS,
    check_combination,
    compat_matrix,
    dynamo_settings,
    quantization_config,
    quantize_component,
    unavailable_reason,
    weight_bytes,
)

warnings.filterwarnings("ignore")
SPEC = get_model("flux-tiny")


def tiny():
    return build_random_component(SPEC, "transformer", 0, "cpu", torch.bfloat16)


def flux_inputs(seed=0, seq=64, txt=16):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, seq, 64, generator=g).bfloat16(),
        encoder_hidden_states=torch.randn(1, txt, 64, generator=g).bfloat16(),
        pooled_projections=torch.randn(1, 32, generator=g).bfloat16(),
        timestep=torch.full((1,), 0.5).bfloat16(),
        img_ids=torch.zeros(seq, 3),
        txt_ids=torch.zeros(txt, 3),
        guidance=torch.full((1,), 3.5).bfloat16(),
        return_dict=False,
    )


def forward(model):
    with torch.no_grad():
        return model(**flux_inputs())[0].float()


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def reference():
    m = tiny()
    return {"out": forward(m), "bytes": weight_bytes(m), "linears": _linear_shapes(m)}


def _linear_shapes(m):
    return {n: (mod.out_features, mod.in_features, mod.bias is not None)
            for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}


# ----------------------------------------------------------------------------------------------------------
# manual storage count: each library's documented layout, per quantized linear (out o, in i)


def _q_linear_bytes(value, o, i):
    if value in ("bnb-nf4", "bnb-fp4"):
        return o * i // 2 + (o * i // 64) * 4 + 16 * 4  # packed nibbles + fp32 absmax / 64 + 16-entry code
    if value == "bnb-int8":
        return o * i + o * 4  # int8 + fp32 row scale (SCB)
    if value in ("torchao-int8wo", "torchao-int8dq"):
        return o * i + o * 4 + o * 1  # int8 qdata + fp32 scale + int8 zero point, per row
    if value == "torchao-fp8wo":
        return o * i + o * 4  # e4m3 + fp32 row scale
    if value in ("quanto-int8", "quanto-fp8"):
        return o * i + o * 2  # 8-bit data + bf16 row scale
    if value == "quanto-int4":
        return o * i // 2 + 2 * o * max(1, i // 128) * 2  # nibbles + bf16 scale and shift per group of 128
    if value.startswith("gguf-"):
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, value[5:].upper())]
        return o * (i // block) * size
    raise ValueError(value)


def manual_bytes(model, value, shapes):
    total = 0
    for name, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if pname == "weight" and name in shapes and not value.startswith("fp8"):
                o, i, _ = shapes[name]
                total += _q_linear_bytes(value, o, i)
            else:  # biases, norms, (fp8 casting: every tensor is plain) -> numel x itemsize
                total += p.numel() * p.element_size()
        for b in mod.buffers(recurse=False):  # e.g. quanto QLinear's input_scale/output_scale scalars
            total += b.numel() * b.element_size()
    return total


# value: (module/weight class, rel error bound, bytes ratio vs bf16 (lo, hi))
CPU_CASES = {
    "bnb-nf4": ("Linear4bit/Params4bit", 0.20, (0.26, 0.31)),
    "bnb-fp4": ("Linear4bit/Params4bit", 0.23, (0.26, 0.31)),
    "bnb-int8": ("Linear8bitLt/Int8Params", 0.02, (0.50, 0.53)),
    "torchao-int8wo": ("Linear/Int8Tensor", 0.015, (0.50, 0.54)),
    "torchao-fp8wo": ("Linear/Float8Tensor", 0.055, (0.50, 0.53)),
    "torchao-int8dq": ("Linear/Int8Tensor", 0.02, (0.50, 0.54)),
    "quanto-int8": ("QLinear/WeightQBytesTensor", 0.015, (0.49, 0.53)),
    "quanto-int4": ("QLinear/", 0.14, (0.25, 0.29)),  # WeightQBitsTensor, TinyGemm variant where shapes allow
    "quanto-fp8": ("QLinear/WeightQBytesTensor", 0.055, (0.49, 0.53)),
    "fp8-layerwise": ("Linear/float8_e4m3fn", 0.04, (0.62, 0.67)),  # norms' linears and proj_out stay bf16
    "fp8-layerwise-e5m2": ("Linear/float8_e5m2", 0.07, (0.62, 0.67)),
    "gguf-q8_0": ("GGUFLinear/GGUFParameter[Q8_0]", 0.015, (0.51, 0.56)),
    "gguf-q5_1": ("GGUFLinear/GGUFParameter[Q5_1]", 0.065, (0.36, 0.40)),
    "gguf-q5_0": ("GGUFLinear/GGUFParameter[Q5_0]", 0.07, (0.33, 0.37)),
    "gguf-q4_1": ("GGUFLinear/GGUFParameter[Q4_1]", 0.13, (0.30, 0.34)),
    "gguf-q4_0": ("GGUFLinear/GGUFParameter[Q4_0]", 0.14, (0.27, 0.31)),
}


@pytest.mark.parametrize("value", list(CPU_CASES))
def test_cpu_backend(value, reference):
    cls, bound, (lo, hi) = CPU_CASES[value]
    assert unavailable_reason(value, "cpu") is None
    m = tiny()
    ident = id(m)
    entry = quantize_component(m, "transformer", value, "cpu")
    assert id(m) == ident  # in place

    assert entry["step"] == "quantize" and entry["component"] == "transformer" and entry["value"] == value
    assert entry["library"].startswith(BACKENDS[value].library + "==")
    assert all(k.startswith(cls) for k in entry["classes"]), entry["classes"]
    n_linear = len(reference["linears"])
    expected = 42 if value.startswith("fp8") else n_linear  # layerwise casting skips *norm*.linear and proj_out
    assert entry["quantized_modules"] == sum(entry["classes"].values()) == expected

    # storage: the manifest's figure is the real one, matches each library's layout, shrinks as expected
    assert entry["weight_bytes"] == weight_bytes(m)
    assert weight_bytes(m) == manual_bytes(m, value, reference["linears"])
    ratio = entry["weight_bytes"] / reference["bytes"]
    assert lo < ratio < hi, ratio

    out = forward(m)
    err = rel_err(out, reference["out"])
    assert 1e-4 < err < bound, err
    if value in ("bnb-nf4", "bnb-fp4"):
        # bitsandbytes repacks 4-bit layers for its CPU kernel at the first eval forward (absmax -> bf16)
        assert weight_bytes(m) <= entry["weight_bytes"]
    else:
        assert weight_bytes(m) == entry["weight_bytes"]


def test_weight_bytes_plain_and_tied():
    m = tiny()
    assert weight_bytes(m) == sum(p.numel() * p.element_size() for p in m.parameters())
    lin = torch.nn.Linear(8, 8, bias=False)
    tied = torch.nn.Sequential(lin, torch.nn.Linear(8, 8, bias=False))
    tied[1].weight = lin.weight  # one storage
    assert weight_bytes(tied) == 8 * 8 * 4
    view_owner = torch.nn.Module()
    base = torch.zeros(10, 10)
    view_owner.register_buffer("a", base[:5])
    view_owner.register_buffer("b", base[5:])
    assert weight_bytes(view_owner) == 400  # views of one storage count the storage once


SERIALIZABLE_ON_CPU = ["torchao-int8wo", "torchao-fp8wo", "torchao-int8dq", "quanto-int8", "quanto-int4", "quanto-fp8"]


@pytest.mark.parametrize("value", SERIALIZABLE_ON_CPU)
def test_save_reload_and_quantize_on_load(value, tmp_path):
    from diffusers import FluxTransformer2DModel

    assert BACKENDS[value].serializable
    m = tiny()
    m.save_pretrained(tmp_path / "bf16")
    quantize_component(m, "transformer", value, "cpu")
    out = forward(m)

    # pre-quantized checkpoint: quantized in memory, saved through the attached diffusers quantizer
    m.save_pretrained(tmp_path / "q")
    reloaded = FluxTransformer2DModel.from_pretrained(tmp_path / "q", torch_dtype=torch.bfloat16)
    assert reloaded.config.quantization_config is not None
    assert weight_bytes(reloaded) == weight_bytes(m)
    if value == "quanto-int4":
        # quanto re-creates plain WeightQBitsTensor on reload where the in-memory model used its TinyGemm
        # layout for some layers: same values, another kernel
        assert rel_err(forward(reloaded), out) < 1e-2
    else:
        assert torch.equal(forward(reloaded), out)

    # quantize-on-load from a bf16 checkpoint gives the same model as quantizing in memory
    onload = FluxTransformer2DModel.from_pretrained(
        tmp_path / "bf16", torch_dtype=torch.bfloat16, quantization_config=quantization_config(value, "transformer")
    )
    assert torch.equal(forward(onload), out)


def test_bnb_quantize_on_load_refused_on_cpu_by_diffusers(tmp_path):
    """bitsandbytes itself runs on CPU (above), but diffusers' quantizer refuses to load without a GPU."""
    from diffusers import FluxTransformer2DModel

    tiny().save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="No GPU found"):
        FluxTransformer2DModel.from_pretrained(tmp_path, quantization_config=quantization_config("bnb-nf4", "transformer"))
    assert "No GPU found" in BACKENDS["bnb-nf4"].note


def test_text_encoders_keep_t5_wo_unquantized():
    """T5 casts its input to wo's weight dtype; quantizing wo to uint8/fp8 garbles the output (rel err ~0.97
    seen with bnb-nf4 before honouring T5's _keep_in_fp32_modules)."""
    ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    ref_model = build_random_component(SPEC, "text_encoder_2", 0, "cpu", torch.bfloat16)
    with torch.no_grad():
        ref = ref_model(ids).last_hidden_state.float()
    for value, bound in [("bnb-nf4", 0.08), ("torchao-int8wo", 0.01), ("quanto-int8", 0.01), ("fp8-layerwise", 0.03)]:
        m = build_random_component(SPEC, "text_encoder_2", 0, "cpu", torch.bfloat16)
        entry = quantize_component(m, "text_encoder_2", value, "cpu")
        wo = m.encoder.block[0].layer[1].DenseReluDense.wo
        assert type(wo) is torch.nn.Linear and wo.weight.dtype == torch.bfloat16
        assert entry["quantized_modules"] >= 12
        with torch.no_grad():
            out = m(ids).last_hidden_state.float()
        assert rel_err(out, ref) < bound, (value, rel_err(out, ref))


def test_quantization_config_classes():
    import diffusers
    import transformers

    assert isinstance(quantization_config("bnb-nf4", "transformer"), diffusers.BitsAndBytesConfig)
    assert isinstance(quantization_config("bnb-nf4", "text_encoder_2"), transformers.BitsAndBytesConfig)
    assert quantization_config("bnb-nf4", "transformer").bnb_4bit_quant_type == "nf4"
    assert quantization_config("bnb-int8", "text_encoder").load_in_8bit
    assert isinstance(quantization_config("torchao-int8wo", "transformer"), diffusers.TorchAoConfig)
    assert isinstance(quantization_config("torchao-int8wo", "text_encoder"), transformers.TorchAoConfig)
    assert isinstance(quantization_config("quanto-int4", "transformer"), diffusers.QuantoConfig)
    assert isinstance(quantization_config("quanto-int4", "text_encoder_2"), transformers.QuantoConfig)
    assert isinstance(quantization_config("gguf-q8_0", "transformer"), diffusers.GGUFQuantizationConfig)
    assert quantization_config("fp8-layerwise", "vae") is None
    with pytest.raises(RecipeError, match="vae.*Alternative: vae=fp8-layerwise"):
        quantization_config("bnb-nf4", "vae")
    with pytest.raises(RecipeError, match="GGUF|transformer only"):
        quantization_config("gguf-q8_0", "text_encoder_2")


def test_backends_table():
    required = ["bnb-nf4", "bnb-fp4", "bnb-int8", "torchao-int8wo", "torchao-int4wo", "torchao-fp8wo", "torchao-fp8dq",
                "torchao-int8dq", "quanto-int8", "quanto-int4", "quanto-fp8", "fp8-layerwise", "fp8-layerwise-e5m2",
                "gguf-q8_0", "gguf-q4_1", "gguf-q2_k"]
    assert set(required) <= set(BACKENDS)
    for v, s in BACKENDS.items():
        assert s.value == v and v.startswith({"bnb": "bnb-", "torchao": "torchao-", "quanto": "quanto-",
                                              "layerwise": "fp8-layerwise", "gguf": "gguf-"}[s.family])
        assert 2 < s.bits <= 16
        if s.family == "gguf":
            assert s.components == ("transformer",) and not s.serializable
        if "vae" in s.components:
            assert s.family == "layerwise"
    assert math.isclose(BACKENDS["gguf-q4_1"].bits, 5.0) and math.isclose(BACKENDS["gguf-q2_k"].bits, 2.625)
    assert [v for v, s in BACKENDS.items() if s.needs_cuda] == ["torchao-int4wo", "torchao-fp8dq", "torchao-fp8dq-tensor"]


@pytest.mark.parametrize("value", ["torchao-int4wo", "torchao-fp8dq"])
def test_needs_cuda_on_cpu(value):
    reason = unavailable_reason(value, "cpu")
    assert reason and "needs CUDA" in reason and "Alternative on cpu:" in reason
    with pytest.raises(RecipeError, match=f"transformer={value}: .*needs CUDA"):
        quantize_component(tiny(), "transformer", value, "cpu")
    with pytest.raises(RecipeError, match=f"transformer={value}.*needs CUDA.*Alternative"):
        check_combination({"transformer": value}, "none", "off", "cpu")
    check_combination({"transformer": value}, "none", "off", "cuda")  # fine where CUDA is


def test_torchao_int4wo_really_fails_on_cpu():
    """The reason above is what torchao 0.18 does on CPU, for both int4 layouts."""
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    for fmt, err in [("plain", "mslk"), ("tile_packed_to_4d", "CUDA")]:
        with pytest.raises((ImportError, AssertionError, RuntimeError), match=err):
            quantize_(tiny(), Int4WeightOnlyConfig(group_size=128, int4_packing_format=fmt))


def test_missing_library(monkeypatch):
    monkeypatch.setattr(quant, "_installed", lambda dist: dist != "bitsandbytes")
    reason = unavailable_reason("bnb-nf4", "cuda")
    assert "bitsandbytes" in reason and "not installed" in reason and "Alternative" in reason
    with pytest.raises(RecipeError, match="not installed"):
        check_combination({"transformer": "bnb-nf4"}, "none", "off", "cuda")
    assert all(r["ok"] for r in compat_matrix() if r["value"] == "bnb-nf4" and r["offload"] == "none")


REFUSED = [
    ({"transformer": "bnb-nf4"}, "sequential", "cuda", "sequential"),
    ({"transformer": "gguf-q8_0"}, "sequential", "cuda", "sequential"),
    ({"text_encoder_2": "quanto-int8"}, "sequential", "cuda", "sequential"),
    ({"transformer": "bnb-int8"}, "sequential", "cuda", "per-parameter offload hooks"),
    ({"transformer": "quanto-fp8"}, "stream", "cuda", "MarlinF8PackedTensor"),
    ({"text_encoder_2": "quanto-fp8"}, "stream", "cuda", "MarlinF8PackedTensor"),
    ({"transformer": "bnb-nf4"}, "group-block", "cuda", "CUDA illegal memory access inside diffusers 0.42.1 group offload, seen on H200"),
    ({"transformer": "bnb-fp4"}, "group-leaf", "cuda", "illegal memory access"),
    ({"transformer": "bnb-int8"}, "group-block", "cuda", "SCB"),
    ({"transformer": "quanto-int4"}, "group-leaf", "cuda", "wrapper tensor"),
    ({"transformer": "torchao-int8wo"}, "model", "cpu", "accelerator"),
    ({"vae": "bnb-nf4"}, "none", "cuda", "VAE is convolutions"),
    ({"text_encoder": "gguf-q4_1"}, "none", "cuda", "transformer only"),
    ({"transformer": "nonsense"}, "none", "cuda", "unknown quantization"),
    ({"transformer": "bf16"}, "warp", "cuda", "unknown offload"),
]


@pytest.mark.parametrize("components,offload,device,msg", REFUSED)
def test_refused_combinations(components, offload, device, msg):
    with pytest.raises(RecipeError, match="Alternative") as e:
        check_combination(components, offload, "off", device)
    assert msg in str(e.value)


@pytest.mark.parametrize("components,offload,device", [
    ({"transformer": "bnb-nf4", "text_encoder_2": "bnb-nf4"}, "model", "cuda"),
    ({"transformer": "torchao-int8wo"}, "group-block", "cuda"),
    ({"transformer": "fp8-layerwise", "vae": "fp8-layerwise"}, "group-leaf", "cuda"),
    ({"transformer": "gguf-q4_1"}, "model", "cuda"),
    ({"transformer": "quanto-int8", "text_encoder": "bf16"}, "staged", "cpu"),
    ({"transformer": "bf16", "vae": "bf16"}, "none", "cpu"),
])
def test_accepted_combinations(components, offload, device):
    check_combination(components, offload, "regional", device)


def test_dynamo_settings():
    assert dynamo_settings({"transformer": "bnb-nf4"}, "none", "off") == {}
    assert dynamo_settings({"transformer": "bnb-nf4"}, "none", "regional") == {"capture_dynamic_output_shape_ops": True}
    s = dynamo_settings({"transformer": "fp8-layerwise"}, "group-block", "full")
    assert s == {"cache_size_limit": quant.OFFLOAD_COMPILE_CACHE_LIMIT} and s["cache_size_limit"] > 57
    assert dynamo_settings({"transformer": "torchao-fp8dq"}, "staged", "full") == {}
    assert set(dynamo_settings({"text_encoder_2": "bnb-int8"}, "model", "full")) == {
        "capture_dynamic_output_shape_ops", "cache_size_limit"}
    # torchao int8 weight-only on CUDA: inductor's _weight_int8pack_mm rewrite stays off (65 s/step on the H200)
    assert dynamo_settings({"transformer": "torchao-int8wo"}, "none", "regional", "cuda") == quant.WOQ_INT8_REWRITE_OFF
    assert quant.WOQ_INT8_REWRITE_OFF == {"torch.backends.mkldnn.enabled": False,
                                          "torch.compiler.config.force_disable_caches": True}
    assert dynamo_settings({"transformer": "torchao-int8wo"}, "none", "regional", "cpu") == {}  # the CPU kernel is good
    assert dynamo_settings({"transformer": "torchao-int8wo"}, "none", "off", "cuda") == {}
    assert dynamo_settings({"transformer": "torchao-fp8wo"}, "none", "full", "cuda") == {}


def test_apply_dynamo_settings_sets_full_paths_and_records(monkeypatch):
    import torch._dynamo

    from vramfit.apply import Manifest, apply_dynamo_settings

    monkeypatch.setattr(torch.backends.mkldnn, "enabled", True)
    monkeypatch.setattr(torch._dynamo.config, "cache_size_limit", 8)
    m = Manifest()
    apply_dynamo_settings({"cache_size_limit": 99, "torch.backends.mkldnn.enabled": False}, m)
    assert torch._dynamo.config.cache_size_limit == 99 and torch.backends.mkldnn.enabled is False
    assert m.steps[-1]["settings"] == {"cache_size_limit": 99, "torch.backends.mkldnn.enabled": False}


def test_compat_matrix():
    rows = compat_matrix()
    assert len(rows) == len(BACKENDS) * len(quant.OFFLOADS) * len(quant.COMPILES)
    by = {(r["value"], r["offload"], r["compile"]): r for r in rows}
    assert by[("torchao-int8wo", "none", "off")]["ok"] and by[("torchao-int8wo", "none", "off")]["reason"] == ""
    assert not by[("bnb-nf4", "group-leaf", "full")]["ok"]
    assert "illegal memory access" in by[("bnb-nf4", "group-block", "off")]["reason"]
    assert by[("bnb-int8", "model", "off")]["ok"]  # lifted after the H200 probe; the GPU matrix runs it
    assert not by[("bnb-int8", "sequential", "off")]["ok"]
    assert by[("torchao-int4wo", "none", "off")]["ok"]  # judged for a CUDA device
    for r in rows:
        assert r["ok"] == (r["reason"] == "")
        if not r["ok"]:
            assert "Alternative" in r["reason"]
        # the matrix is check_combination's verdict (every library is installed here)
        try:
            check_combination({"transformer": r["value"]}, r["offload"], r["compile"], "cuda")
            raised = False
        except RecipeError:
            raised = True
        assert raised == (not r["ok"]), r


@pytest.mark.parametrize("component", ["transformer", "text_encoder_2"])
def test_quanto_block_by_block_equals_whole_module_quantize(component):
    """vramfit quantizes quanto one block at a time (the bf16 component never whole on the device); the result is
    the same set of quanto modules with the same quantized weights as one optimum.quanto.quantize call."""
    from optimum.quanto import freeze, qint8, quantize
    from optimum.quanto.nn import QModuleMixin

    a = build_random_component(SPEC, component, 0, "cpu", torch.bfloat16)
    b = build_random_component(SPEC, component, 0, "cpu", torch.bfloat16)
    entry = quantize_component(a, component, "quanto-int8", "cpu")
    assert "blocks moved to the device one at a time" in entry["api"]
    skip = quant._not_convert_keys(b)
    quantize(b, weights=qint8, exclude=[n for n, _ in b.named_modules() if n and quant._skipped(n, skip)] or None)
    freeze(b)
    qa = {n: type(m).__name__ for n, m in a.named_modules() if isinstance(m, QModuleMixin)}
    qb = {n: type(m).__name__ for n, m in b.named_modules() if isinstance(m, QModuleMixin)}
    assert qa == qb and len(qa) > 10
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        ta, tb = sa[k], sb[k]
        if hasattr(ta, "_data"):  # QTensor: compare the stored int8 data and scales
            assert torch.equal(ta._data, tb._data) and torch.equal(ta._scale, tb._scale), k
        else:
            assert torch.equal(ta, tb), k
