import pytest

from vramfit.errors import RecipeError
from vramfit.recipe import COMPILES, OFFLOADS, PRESETS, QUANT_VALUES, Recipe


@pytest.mark.parametrize("text", [
    "",
    "offload=staged",
    "transformer=fp16,vae=fp32,vae=tiling",
    "offload=group-leaf,compile=regional,attention=_native_math",
    "transformer=bnb-nf4,text_encoder_2=bnb-nf4,offload=model",
    "transformer=gguf-q4_1,vae=slicing",
])
def test_round_trip(text):
    r = Recipe.parse(text)
    assert Recipe.parse(str(r)) == r
    # the expanded string names every key
    s = str(r)
    for key in ("transformer=", "text_encoder_2=", "text_encoder=", "offload=", "compile=", "attention="):
        assert key in s
    assert s.count("vae=") == 1 and s.count("vae_decode=") == 1  # precision and decode mode under their own keys


def test_defaults_and_overrides():
    assert Recipe.parse("") == Recipe()
    r = Recipe.parse("nf4,offload=model")
    assert (r.transformer, r.text_encoder_2, r.offload) == ("bnb-nf4", "bnb-nf4", "model")
    assert r.text_encoder == "bf16"
    assert r.quantized() == {"transformer": "bnb-nf4", "text_encoder_2": "bnb-nf4"}
    assert Recipe.parse("vae=fp32,vae=tiling").as_dict()["vae"] == "fp32"
    assert Recipe.parse("vae=fp32,vae=tiling").vae_decode == "tiling"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_expand(name):
    r = Recipe.parse(name)
    assert Recipe.parse(str(r)) == r


@pytest.mark.parametrize("text, fragment", [
    ("offload=fast", "offload='fast' is not valid; choose one of: " + ", ".join(OFFLOADS)),
    ("compile=max", ", ".join(COMPILES)),
    ("foo=1", "unknown recipe key 'foo'"),
    ("transformer=int3", "choose a precision (bf16, fp16, fp32)"),
    ("vae=huge", "decode mode with vae_decode=: none, tiling, slicing"),
    ("compile=full+regional", "two compile scopes"),
    ("compile=regional+turbo", "unknown flag 'turbo'"),
    ("compile=off+graphs", "need a compile scope"),
    ("offload=stream:x", "K in stream:K"),
    ("offload=model=none", "two '='"),
    ("cache=fbc", "cache=fbc:THRESHOLD"),
    ("cache=fbc:2", "threshold is a number in (0, 1]"),
    ("cache=fbc:nan", "threshold is a number in (0, 1]"),
    ("cache=taylorseer:0", "interval is an integer >= 1"),
    ("fuse_qkv=yes", "choose one of: off, on"),
    ("host_sync=never", "choose one of: keep, avoid"),
    ("turbo", "unknown preset 'turbo'"),
    ("offload=none,,compile=off", "empty item"),
    ("text_encoder_2=gguf-q8_0", "GGUF files hold a FLUX transformer only"),
    ("vae=bnb-nf4", "vae=bnb-nf4"),
    ("attention=warp", "not a diffusers attention backend"),
])
def test_errors_name_valid_choices(text, fragment):
    with pytest.raises(RecipeError) as e:
        Recipe.parse(text)
    assert fragment in str(e.value)


def test_quant_values_match_backends():
    from vramfit import quant

    assert set(QUANT_VALUES) == set(quant.BACKENDS)


def test_later_items_override_earlier_presets_included():
    # README: later items override earlier ones -- presets too (issue 13, point 4)
    assert Recipe.parse("fp16,bf16") == Recipe()
    assert Recipe.parse("bf16,fp16").transformer == "fp16"
    assert Recipe.parse("offload=model,offload=none").offload == "none"
    assert Recipe.parse("vae=tiling,vae=slicing").vae_decode == "slicing"
    r = Recipe.parse("nf4,transformer=bf16")
    assert (r.transformer, r.text_encoder_2) == ("bf16", "bnb-nf4")
    assert Recipe.parse("transformer=bf16,nf4").transformer == "bnb-nf4"


def test_vae_decode_key_and_old_form():
    new, old = Recipe.parse("vae_decode=tiling"), Recipe.parse("vae=tiling")
    assert new == old and new.vae_decode == "tiling" and new.vae == "bf16"
    assert "vae_decode=tiling" in str(old) and "vae=tiling" not in str(old)


@pytest.mark.parametrize("text, kind, k", [("offload=stream", "stream", None), ("offload=stream:0", "stream", 0),
                                           ("offload=stream:12", "stream", 12), ("offload=model", "model", None)])
def test_stream_offload(text, kind, k):
    r = Recipe.parse(text)
    assert (r.offload_kind, r.stream_k) == (kind, k)
    assert Recipe.parse(str(r)) == r


def test_compile_flags_and_speed_keys_round_trip():
    r = Recipe.parse("compile=full+autotune+graphs,fuse_qkv=on,cache=taylorseer:4,host_sync=avoid,compile_vae=on")
    assert (r.compile_scope, r.compile_graphs, r.compile_autotune) == ("full", True, True)
    assert (r.cache_kind, r.cache_param) == ("taylorseer", 4)
    assert Recipe.parse("cache=fbc:0.08").cache_param == 0.08
    s = str(r)
    assert "fuse_qkv=on" in s and "cache=taylorseer:4" in s and "host_sync=avoid" in s and "compile_vae=on" in s
    assert Recipe.parse(s) == r
    # defaults of the speed keys are not printed: records of earlier rounds keep their strings
    assert str(Recipe()) == ("transformer=bf16,text_encoder_2=bf16,text_encoder=bf16,vae=bf16,vae_decode=none,"
                             "offload=none,compile=off,attention=native")
