"""`vramfit code`: the printed program runs without vramfit and makes the same image as `vramfit generate`."""

import ast
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vramfit import cli, quant
from vramfit.recipe import Recipe

PROMPT = "a red fox in the snow"


def run(args, capsys):
    code = cli.main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("code") / "tiny"
    assert cli.main(["export", "flux-tiny", "--out", str(d)]) == 0
    return d


def program(ckpt, recipe, form, tmp_path, capsys, image):
    prog = tmp_path / f"prog-{form}.py"
    code, _, err = run(["code", recipe, "--model", "flux-tiny", "--weights", str(ckpt), "--form", form,
                        "--device", "cpu", "--steps", "2", "--prompt", PROMPT, "--image", str(image),
                        "--out", str(prog)], capsys)
    assert code == 0, err
    return prog


def imported_modules(src: str) -> set:
    mods = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mods.add(node.module.split(".")[0])
    return mods


def run_without_vramfit(prog):
    # a fresh interpreter where `import vramfit` fails: the program must stand on diffusers/transformers alone
    boot = ("import sys, runpy; sys.modules['vramfit'] = None; "
            f"runpy.run_path({str(prog)!r}, run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", boot], capture_output=True, text=True, timeout=300,
                       cwd=str(prog.parent))
    assert p.returncode == 0, p.stderr[-3000:]


@pytest.mark.parametrize("recipe,form", [
    ("bf16", "backend"),  # nothing quantized: the two forms print the same program
    ("transformer=torchao-int8wo,text_encoder_2=quanto-int8", "mapping"),
    ("fp8-layerwise", "backend"),  # not a quantizer: no PipelineQuantizationConfig, casting after load
])
def test_printed_code_is_bit_identical_to_generate(ckpt, recipe, form, tmp_path, capsys):
    code_png, gen_png = tmp_path / "code.png", tmp_path / "gen.png"
    prog = program(ckpt, recipe, form, tmp_path, capsys, code_png)
    src = prog.read_text()
    assert "vramfit" not in imported_modules(src) and {"torch", "diffusers"} <= imported_modules(src)
    quantized = Recipe.parse(recipe).quantized()
    uses_pq = any(not v.startswith("fp8-layerwise") for v in quantized.values())
    assert ("PipelineQuantizationConfig(" in src) == uses_pq
    if any(v.startswith("fp8-layerwise") for v in quantized.values()):
        assert "enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn" in src
        assert "apply_layerwise_casting(pipe.text_encoder_2" in src
    run_without_vramfit(prog)

    code, _, err = run(["generate", PROMPT, "--model", "flux-tiny", "--weights", str(ckpt), "--recipe", recipe,
                        "--steps", "2", "--device", "cpu", "--no-progress", "--out", str(gen_png)], capsys)
    assert code == 0, err
    rec = json.loads(gen_png.with_suffix(".json").read_text())
    assert rec["recipe"] == str(Recipe.parse(recipe))
    a, b = np.asarray(Image.open(code_png)), np.asarray(Image.open(gen_png))
    assert a.shape == b.shape and np.array_equal(a, b)


def test_backend_form_text(ckpt, tmp_path, capsys):
    # bitsandbytes is the backend diffusers 0.42 accepts in the quant_backend form (it cannot load on CPU here,
    # so only the text is checked; tests/test_gpu.py runs it)
    code, out, err = run(["code", "nf4+model-offload", "--model", "flux-tiny", "--weights", str(ckpt),
                          "--form", "backend"], capsys)
    assert code == 0, err
    assert "quant_backend='bitsandbytes_4bit'" in out
    assert "components_to_quantize=['text_encoder_2', 'transformer']" in out
    assert "'bnb_4bit_quant_type': 'nf4'" in out and "pipe.enable_model_cpu_offload(device='cuda')" in out


def test_refusals_name_the_reason_and_an_alternative(ckpt, capsys):
    code, _, err = run(["code", "bf16", "--model", "flux-tiny"], capsys)
    assert code == 2 and "vramfit export flux-tiny" in err
    code, _, err = run(["code", "transformer=torchao-int8wo", "--model", "flux-tiny", "--weights", str(ckpt),
                        "--form", "backend", "--device", "cpu"], capsys)
    assert code == 2 and "don't match" not in err and "Alternative: --form mapping" in err
    code, _, err = run(["code", "transformer=bnb-nf4,text_encoder_2=bnb-int8", "--model", "flux-tiny", "--weights",
                        str(ckpt), "--form", "backend"], capsys)
    assert code == 2 and "bnb-int8 and bnb-nf4" in err and "--form mapping" in err
    code, _, err = run(["code", "transformer=gguf-q4_1", "--model", "flux-tiny", "--weights", str(ckpt)], capsys)
    assert code == 2 and "vramfit export-gguf flux-tiny --type q4_1" in err
    code, _, err = run(["code", "offload=model", "--model", "flux-tiny", "--weights", str(ckpt), "--device", "cpu"],
                       capsys)
    assert code == 2 and "Alternative" in err


def test_steps_diffusers_cannot_express_are_comments_with_the_stock_call(ckpt, capsys):
    code, out, _ = run(["code", "offload=staged", "--model", "flux-tiny", "--weights", str(ckpt)], capsys)
    assert code == 0
    assert "# offload=staged" in out and "Nearest stock equivalent" in out
    assert "pipe.enable_model_cpu_offload(device='cuda')" in out
    code, out, _ = run(["code", "transformer=bnb-nf4,compile=regional,offload=model", "--model", "flux-tiny",
                        "--weights", str(ckpt)], capsys)
    assert code == 0
    assert "torch._dynamo.config.capture_dynamic_output_shape_ops = True" in out
    assert "torch._dynamo.config.cache_size_limit = " in out
    assert "pipe.transformer.compile_repeated_blocks(fullgraph=True)" in out
    code, out, _ = run(["code", "transformer=torchao-int8wo,compile=full", "--model", "flux-tiny",
                        "--weights", str(ckpt)], capsys)
    assert code == 0
    for k, v in quant.WOQ_INT8_REWRITE_OFF.items():
        assert f"{k} = {v!r}" in out


@pytest.mark.parametrize("value", [v for v, s in quant.BACKENDS.items() if s.family in ("bnb", "torchao", "quanto")])
@pytest.mark.parametrize("component", ["transformer", "text_encoder_2"])
def test_config_source_builds_the_loaders_config(value, component):
    imports, expr = quant.config_source(value, component)
    ns: dict = {}
    exec("import torch\n" + "\n".join(imports), ns)
    built = eval(expr, ns)
    want = quant.quantization_config(value, component)
    assert type(built) is type(want)
    assert built.to_dict() == want.to_dict() or repr(built.to_dict()) == repr(want.to_dict())
