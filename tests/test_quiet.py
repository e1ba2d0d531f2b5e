"""Quiet start-up: in a fresh process, every line `vramfit generate` prints is vramfit's own; `-v` lets the
libraries' lines through. Backends are not imported by vramfit for a recipe that does not use them."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the first word of every line vramfit prints for `generate` (summary labels, its own notes, its progress bars)
OWN = re.compile(r"^(vramfit: |model |recipe |device |applied |time |memory |weights |wrote |denoise: |images: )")
BACKENDS = ("torchao", "bitsandbytes", "optimum.quanto", "gguf")

RUN = """
import json, sys
from vramfit.cli import main
rc = main(sys.argv[2:])
json.dump({"rc": rc, "modules": sorted(m for m in %r if m in sys.modules)}, open(sys.argv[1], "w"))
""" % (BACKENDS,)


def _run(tmp_path, *argv):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TRANSFORMERS_", "DIFFUSERS_", "TORCH_LOGS", "PYTHONWARNINGS"))}
    env["PYTHONPATH"] = str(ROOT)
    info = tmp_path / "info.json"
    p = subprocess.run([sys.executable, "-c", RUN, str(info), *argv], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300)
    lines = [x for x in re.split(r"[\r\n]+", p.stdout + p.stderr) if x.strip()]
    return json.loads(info.read_text()) if info.exists() else {"rc": p.returncode}, lines


@pytest.mark.slow  # two fresh processes: about 25 s of CPU, over a minute on a shared 2-core machine
def test_generate_prints_only_its_own_lines_and_v_shows_the_libraries(tmp_path):
    gen = ["generate", "a fox", "--model", "flux-tiny", "--steps", "2", "--height", "64", "--width", "64",
           "--out", str(tmp_path / "q.png")]
    info, lines = _run(tmp_path, *gen)
    assert info["rc"] == 0, lines
    foreign = [x for x in lines if not OWN.match(x)]
    assert foreign == [], foreign
    assert any(x.startswith("wrote ") for x in lines)
    # a bf16 recipe needs no quantization backend; optimum-quanto is imported by vramfit alone, so it must be
    # absent. (torchao, bitsandbytes and gguf are imported by diffusers/transformers themselves whenever they are
    # installed -- transformers.quantizers.quantizer_torchao, diffusers.quantizers.{bitsandbytes,gguf} -- which
    # is why their import-time lines are silenced rather than avoided.)
    assert "optimum.quanto" not in info["modules"]

    vinfo, vlines = _run(tmp_path, "-v", *gen)
    assert vinfo["rc"] == 0
    vforeign = [x for x in vlines if not OWN.match(x)]
    if not vforeign:
        pytest.skip("no library prints anything on this machine, so -v has nothing to show")
    # what -v shows comes from the libraries (their names, file paths or warning categories)
    assert any(re.search(r"torchao|bitsandbytes|transformers|diffusers|torch|Warning|\.py:\d+", x) for x in vforeign)


def test_vramfit_modules_import_no_backend(tmp_path):
    """vramfit's own modules (CLI, planner, bench, runner, quantization) import a backend only inside the code
    that applies it."""
    code = ("import sys, vramfit.cli, vramfit.apply, vramfit.run, vramfit.plan, vramfit.bench, vramfit.quant, "
            "vramfit.validate, vramfit.logs; vramfit.cli.build_parser(); "
            "print(sorted(m for m in %r if m in sys.modules))" % (BACKENDS,))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "[]"
