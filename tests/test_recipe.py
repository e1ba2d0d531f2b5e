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
    assert s.count("vae=") == 2  # precision and decode mode


def test_defaults_and_overrides():
    assert Recipe.parse("") == Recipe()
    r = Recipe.parse("nf4,offload=model")
    assert (r.transformer, r.text_encoder_2, r.offload) == ("bnb-nf4", "bnb-nf4", "model")
    assert r.text_encoder == "bf16"
    assert r.quantized() == {"transformer": "bnb-nf4", "text_encoder_2": "bnb-nf4"}
    assert Recipe.parse("vae=fp32,vae=tiling").as_dict()["vae"] == "fp32"
    assert Recipe.parse("vae=fp32,vae=tiling").vae_mode == "tiling"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_expand(name):
    r = Recipe.parse(name)
    assert Recipe.parse(str(r)) == r


@pytest.mark.parametrize("text, fragment", [
    ("offload=fast", "offload='fast' is not valid; choose one of: " + ", ".join(OFFLOADS)),
    ("compile=max", ", ".join(COMPILES)),
    ("foo=1", "unknown recipe key 'foo'"),
    ("transformer=int3", "choose a precision (bf16, fp16, fp32)"),
    ("vae=huge", "decode mode: none, tiling, slicing"),
    ("offload=model,offload=none", "contradictory"),
    ("vae=tiling,vae=slicing", "contradictory"),
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
