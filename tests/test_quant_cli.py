"""quantize -> reload, export-gguf -> --gguf, and the recipes matrix, through the CLI on flux-tiny (CPU)."""

import json

import pytest

from vramfit import apply, cli

PROMPT = "a red fox in the snow"
RECIPE = "transformer=torchao-int8wo,text_encoder_2=quanto-int8"


def run(args, capsys):
    code = cli.main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def generate(tmp_path, name, extra, capsys):
    png = tmp_path / f"{name}.png"
    code, out, err = run(["generate", PROMPT, "--model", "flux-tiny", "--steps", "2", "--device", "cpu",
                          "--no-progress", "--out", str(png), *extra], capsys)
    assert code == 0, err
    return json.loads(png.with_suffix(".json").read_text())


def test_quantize_then_reload_matches_in_memory(tmp_path, capsys):
    in_memory = generate(tmp_path, "mem", ["--recipe", RECIPE], capsys)
    ckpt = tmp_path / "q"
    code, out, err = run(["quantize", "flux-tiny", "--recipe", RECIPE, "--device", "cpu", "--out", str(ckpt)], capsys)
    assert code == 0, err
    marker = json.loads((ckpt / "vramfit.json").read_text())
    assert marker["stored"]["transformer"] == "torchao-int8wo"  # saved quantized (diffusers + torchao serialize)
    assert marker["applied_on_load"] == {"text_encoder_2": "quanto-int8"}  # transformers: quantize-on-load
    assert json.loads((ckpt / "transformer" / "config.json").read_text())["quantization_config"]["quant_method"] \
        == "torchao"

    reloaded = generate(tmp_path, "reload", ["--weights", str(ckpt)], capsys)
    assert reloaded["recipe"] == in_memory["recipe"]  # taken from the checkpoint
    loads = {s["component"]: s for s in reloaded["manifest"] if s["step"] == "load"}
    assert "pre-quantized checkpoint" in loads["transformer"]["api"]
    assert not any(s["step"] == "quantize" and s["component"] == "transformer" for s in reloaded["manifest"])
    assert loads["transformer"]["quantized_classes"]  # real torchao tensors came back from disk
    assert reloaded["weight_bytes"]["transformer"] == in_memory["weight_bytes"]["transformer"]
    assert reloaded["latents"]["sha256"] == in_memory["latents"]["sha256"]
    assert reloaded["timings"]["load_s"] > 0

    # asking the checkpoint for another quantization is refused, naming what it holds
    code, _, err = run(["generate", PROMPT, "--model", "flux-tiny", "--weights", str(ckpt), "--recipe",
                        "transformer=quanto-int4", "--device", "cpu", "--out", str(tmp_path / "x.png")], capsys)
    assert code == 2 and "holds transformer=torchao-int8wo" in err


def test_quantize_refuses_gguf_and_plain_recipes(tmp_path, capsys):
    code, _, err = run(["quantize", "flux-tiny", "--recipe", "transformer=gguf-q4_1", "--out", str(tmp_path / "a")],
                       capsys)
    assert code == 2 and "vramfit export-gguf flux-tiny --type q4_1" in err
    code, _, err = run(["quantize", "flux-tiny", "--recipe", "offload=staged", "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "offload and compile are applied at run time" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_export_gguf_then_generate(tmp_path, capsys):
    f = tmp_path / "t.gguf"
    code, out, err = run(["export-gguf", "flux-tiny", "--type", "q8_0", "--out", str(f)], capsys)
    assert code == 0, err
    rec = generate(tmp_path, "g", ["--gguf", str(f)], capsys)
    assert rec["recipe"].startswith("transformer=gguf-q8_0,")
    load = [s for s in rec["manifest"] if s["step"] == "load" and s["component"] == "transformer"][0]
    assert load["source"] == f"gguf:{f}" and load["quantized_classes"] == {"GGUFLinear/GGUFParameter[Q8_0]": 50}
    code, _, err = run(["export-gguf", "flux-tiny", "--type", "q3_k", "--out", str(tmp_path / "x.gguf")], capsys)
    assert code == 2 and "vramfit writes" in err


def test_recipes_matrix_comes_from_the_enforcing_rules(capsys):
    rows = apply.compat_matrix()
    for r in rows:
        recipe = {r["component"]: r["value"]}
        found = list(apply.problems(recipe, r["offload"], r["compile"], "native", "cuda"))
        assert r["ok"] == (not found)
    bad = {(r["value"], r["offload"]) for r in rows if not r["ok"] and r["compile"] == "off"}
    assert ("bnb-nf4", "group-block") in bad and ("bnb-int8", "sequential") in bad and ("gguf-q4_1", "sequential") in bad
    assert ("bf16", "sequential") not in bad and ("bnb-int8", "model") not in bad
    code, out, _ = run(["recipes"], capsys)
    assert code == 0 and "CUDA illegal memory access" in out and "bnb-nf4" in out
    code, out, _ = run(["recipes", "--json"], capsys)
    assert json.loads(out)["matrix"] == rows


@pytest.mark.parametrize("value", ["torchao-int4wo", "torchao-fp8dq"])
def test_cuda_only_backends_refused_on_cpu(value, capsys, tmp_path):
    code, _, err = run(["generate", PROMPT, "--model", "flux-tiny", "--recipe", f"transformer={value}", "--device",
                        "cpu", "--out", str(tmp_path / "x.png")], capsys)
    assert code == 2 and f"transformer={value}" in err and "Alternative" in err


def test_export_creates_missing_parent_folders(tmp_path):
    """README: `vramfit export flux-tiny --out ckpt/tiny` where ckpt/ does not exist yet."""
    from vramfit import cli

    out = tmp_path / "ckpt" / "tiny"
    assert cli.main(["export", "flux-tiny", "--out", str(out)]) == 0
    assert (out / "model_index.json").is_file() and (out / "vramfit.json").is_file()
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]  # no temporary folder left beside it
