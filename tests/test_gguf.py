"""GGUF export (community FLUX layout) and load through diffusers' GGUF quantizer.

flux-tiny is 128 wide, so K-quants (256-value blocks) apply only to a few of its tensors; K-quants are also
exercised on a 256-wide FluxTransformer2DModel built from a config here (4 M parameters).
Error bounds: relative L2 error of the transformer output vs bf16, measured, then ~1.5x.
"""

from __future__ import annotations

import json
import warnings

import gguf
import numpy as np
import pytest
import torch

from vramfit import gguf_io
from vramfit.errors import InputError
from vramfit.models import build_random_component, get_model, materialize_random
from vramfit.quant import quantize_component, weight_bytes

warnings.filterwarnings("ignore")
SPEC = get_model("flux-tiny")
WIDE = dict(attention_head_dim=64, num_attention_heads=4, axes_dims_rope=[16, 24, 24], guidance_embeds=True,
            in_channels=64, joint_attention_dim=256, num_layers=1, num_single_layers=1, patch_size=1,
            pooled_projection_dim=256)


def flux_inputs(joint=64, pooled=32, seq=64, txt=16):
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, seq, 64, generator=g).bfloat16(),
        encoder_hidden_states=torch.randn(1, txt, joint, generator=g).bfloat16(),
        pooled_projections=torch.randn(1, pooled, generator=g).bfloat16(),
        timestep=torch.full((1,), 0.5).bfloat16(),
        img_ids=torch.zeros(seq, 3),
        txt_ids=torch.zeros(txt, 3),
        guidance=torch.full((1,), 3.5).bfloat16(),
        return_dict=False,
    )


def forward(model, **kw):
    with torch.no_grad():
        return model(**flux_inputs(**kw))[0].float()


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def tiny():
    m = build_random_component(SPEC, "transformer", 0, "cpu", torch.bfloat16)
    return m, forward(m)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    from diffusers import FluxTransformer2DModel

    d = tmp_path_factory.mktemp("wide")
    (d / "transformer").mkdir()
    (d / "transformer" / "config.json").write_text(json.dumps(dict(WIDE, _class_name="FluxTransformer2DModel")))
    with torch.device("meta"):
        m = FluxTransformer2DModel.from_config(WIDE)
    materialize_random(m, 7, torch.device("cpu"), torch.bfloat16)
    m.eval()
    return m, forward(m, joint=256, pooled=256), d


def _gguf_types(model):
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    types = {}
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            assert isinstance(mod, GGUFLinear) and isinstance(mod.weight, GGUFParameter), type(mod)
            types[mod.weight.quant_type.name] = types.get(mod.weight.quant_type.name, 0) + 1
    return types


# qtype: (rel error bound, {GGUF type: linears} for flux-tiny)
TINY_CASES = {
    "q8_0": (0.015, {"Q8_0": 50}),
    "q4_1": (0.13, {"Q4_1": 50}),
    # 256-value blocks: only rows of 256/512 (time/guidance in_layer, the four MLP down projections)
    "q2_k": (0.04, {"Q2_K": 6, "BF16": 44}),
}


@pytest.mark.parametrize("qtype", list(TINY_CASES))
def test_export_load_tiny(qtype, tiny, tmp_path):
    model, ref = tiny
    bound, expected_types = TINY_CASES[qtype]
    info = gguf_io.export_gguf(model, qtype, tmp_path / f"t-{qtype}.gguf")
    assert gguf_io.read_gguf_type(info["path"]) == f"gguf-{qtype}"

    reader = gguf.GGUFReader(info["path"])
    names = {t.name for t in reader.tensors}
    # the community (original BFL) layout that diffusers' single-file converter expects
    for key in ["img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "vector_in.in_layer.weight",
                "guidance_in.out_layer.bias", "double_blocks.0.img_attn.qkv.weight", "double_blocks.1.txt_mlp.2.weight",
                "double_blocks.0.img_attn.norm.query_norm.scale", "single_blocks.1.linear1.weight",
                "single_blocks.0.linear2.weight", "final_layer.adaLN_modulation.1.weight", "final_layer.linear.bias"]:
        assert key in names
    assert not any(n.startswith(("transformer_blocks", "single_transformer_blocks")) for n in names)
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]) == b"flux"
    for t in reader.tensors:  # 1-D tensors stay F32 as in the community files
        if len(t.shape) == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32

    loaded = gguf_io.load_gguf_transformer(info["path"], SPEC.config_dir, torch.bfloat16, "cpu")
    assert _gguf_types(loaded) == expected_types
    err = rel_err(forward(loaded), ref)
    assert 1e-4 < err < bound, err
    assert weight_bytes(loaded) < weight_bytes(model)


def test_bf16_roundtrip_is_bit_identical(tiny, tmp_path):
    model, ref = tiny
    info = gguf_io.export_gguf(model, "bf16", tmp_path / "t.gguf")
    assert gguf_io.read_gguf_type(info["path"]) == "gguf-bf16"
    loaded = gguf_io.load_gguf_transformer(info["path"], SPEC.config_dir / "transformer", torch.bfloat16, "cpu")
    assert _gguf_types(loaded) == {"BF16": 50}
    assert torch.equal(forward(loaded), ref)


# K-quants on a model wide enough that every linear except x_embedder (64 inputs) takes the type
WIDE_CASES = {"q2_k": (0.36, "Q2_K"), "q4_k": (0.085, "Q4_K"), "q8_0": (0.015, "Q8_0"), "q4_0": (0.14, "Q4_0")}


@pytest.mark.parametrize("qtype", list(WIDE_CASES))
def test_export_load_wide(qtype, wide, tmp_path):
    model, ref, cfg_dir = wide
    bound, name = WIDE_CASES[qtype]
    info = gguf_io.export_gguf(model, qtype, tmp_path / "w.gguf")
    loaded = gguf_io.load_gguf_transformer(info["path"], cfg_dir, torch.bfloat16, "cpu")
    types = _gguf_types(loaded)
    assert types.get(name, 0) >= 29 and set(types) <= {name, "BF16"}, types
    err = rel_err(forward(loaded, joint=256, pooled=256), ref)
    assert 1e-3 < err < bound, err


def test_k_quant_ports_decode_with_both_dequantizers():
    """Our Q2_K/Q4_K bytes decode identically (to fp16 rounding) with gguf-py's and diffusers' dequantizers,
    with errors a correct 2-/4-bit quantizer gives on uniform data (and far below a broken layout's ~1)."""
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

    x = np.random.default_rng(0).uniform(-1, 1, (16, 512)).astype(np.float32)
    for qtype, (lo, hi), nbytes in [("q2_k", (0.15, 0.30), 84), ("q4_k", (0.03, 0.07), 144)]:
        t = getattr(gguf.GGMLQuantizationType, qtype.upper())
        q = gguf_io.quantize_array(x, qtype)
        assert q.dtype == np.uint8 and q.shape == (16, 2 * nbytes)
        a = gguf.quants.dequantize(q, t)
        b = dequantize_gguf_tensor(GGUFParameter(torch.from_numpy(q), quant_type=t)).float().numpy()
        assert np.abs(a - b).max() < 2e-3
        err = np.linalg.norm(a - x) / np.linalg.norm(x)
        assert lo < err < hi, (qtype, err)
    # all-zero and constant blocks do not produce NaNs
    z = np.zeros((2, 256), np.float32)
    z[1] = 0.5
    for qtype in ("q2_k", "q4_k"):
        d = gguf.quants.dequantize(gguf_io.quantize_array(z, qtype), getattr(gguf.GGMLQuantizationType, qtype.upper()))
        assert np.isfinite(d).all() and np.abs(d[0]).max() == 0 and np.abs(d[1] - 0.5).max() < 0.05


def test_mapping_is_the_inverse_of_diffusers_converter():
    """At FLUX.1's real width (3072: diffusers' converter hard-codes it) diffusers' own converter undoes our
    mapping exactly. Tensors are [rows, 2] so this costs nothing."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    cfg = dict(WIDE, attention_head_dim=128, num_attention_heads=24, axes_dims_rope=[16, 56, 56], num_layers=2,
               num_single_layers=2)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in FluxTransformer2DModel.from_config(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn((s[0], 2) if len(s) > 1 else (s[0],), generator=g) for k, s in shapes.items()}
    bfl = gguf_io.diffusers_to_bfl(dict(sd), cfg)
    assert "single_blocks.1.linear1.weight" in bfl and bfl["single_blocks.1.linear1.weight"].shape[0] == 3 * 3072 + 4 * 3072
    back = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    # and our width-generic inverse agrees
    rows = {k: s[0] for k, s in shapes.items()}
    ours = gguf_io.bfl_to_diffusers(dict(bfl), cfg, rows)
    assert all(torch.equal(ours[k], sd[k]) for k in sd)


def test_norm_out_shift_scale_swap(tiny):
    model, _ = tiny
    bfl = gguf_io.diffusers_to_bfl(model.state_dict(), dict(model.config))
    w = model.state_dict()["norm_out.linear.weight"]  # diffusers: (scale, shift)
    scale, shift = w.chunk(2)
    assert torch.equal(bfl["final_layer.adaLN_modulation.1.weight"], torch.cat([shift, scale]))


def test_read_gguf_type_errors(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(InputError, match="not a GGUF file"):
        gguf_io.read_gguf_type(bad)
    with pytest.raises(InputError, match="no such"):
        gguf_io.read_gguf_type(tmp_path / "missing.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), arch="llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InputError, match="not a FLUX transformer"):
        gguf_io.read_gguf_type(tmp_path / "llama.gguf")
    with pytest.raises(InputError, match="cannot be written"):
        gguf_io.export_gguf(torch.nn.Linear(2, 2), "q6_k", tmp_path / "y.gguf")


def test_quantize_component_gguf_in_place(tiny):
    _, ref = tiny
    m = build_random_component(SPEC, "transformer", 0, "cpu", torch.bfloat16)
    entry = quantize_component(m, "transformer", "gguf-q8_0", "cpu")
    assert entry["classes"] == {"GGUFLinear/GGUFParameter[Q8_0]": 50}
    assert entry["library"].startswith("gguf==")
    assert _gguf_types(m) == {"Q8_0": 50}
    assert rel_err(forward(m), ref) < 0.015
