"""Several images from one load (`generate --n`, `--prompts`), and a plain run that runs out of GPU memory."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vramfit import cli
from vramfit.run import Runner

BASE = ["--model", "flux-tiny", "--steps", "2", "--height", "64", "--width", "64"]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture
def loads(monkeypatch):
    """Counts real loads (the load itself runs unchanged)."""
    calls = []
    real = Runner.load

    def counted(self):
        calls.append(self.recipe)
        return real(self)

    monkeypatch.setattr(Runner, "load", counted)
    return calls


def test_n_images_one_load_each_equals_its_single_seed_run(tmp_path, capsys, loads):
    out = tmp_path / "x.png"
    assert cli.main(["generate", "a red fox", *BASE, "--seed", "7", "--n", "3", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert len(loads) == 1  # one load for the three images
    assert "images:" in err  # the bar over the images (stderr)
    index = json.loads((tmp_path / "x-index.json").read_text())
    assert index["images_written"] == 3 and [i["seed"] for i in index["images"]] == [7, 8, 9]
    assert not out.exists()  # several images are numbered; nothing at the plain name
    shas = set()
    for i in range(3):
        rec = json.loads((tmp_path / f"x-{i}.json").read_text())
        assert rec["request"]["seed"] == 7 + i and rec["output"]["image"] == str(tmp_path / f"x-{i}.png")
        assert rec["run_index"] == i + 1  # the same loaded runner made each one
        assert index["images"][i]["latents_sha256"] == rec["latents"]["sha256"]
        shas.add(rec["latents"]["sha256"])
    assert len(shas) == 3  # different seeds, different images
    for i in (0, 2):  # image i is bit-identical to a single run with seed 7+i
        single = tmp_path / f"single-{i}.png"
        assert cli.main(["generate", "a red fox", *BASE, "--seed", str(7 + i), "--out", str(single),
                         "--no-progress"]) == 0
        rec = json.loads(single.with_suffix(".json").read_text())
        assert rec["latents"]["sha256"] == json.loads((tmp_path / f"x-{i}.json").read_text())["latents"]["sha256"]
        assert np.array_equal(pixels(single), pixels(tmp_path / f"x-{i}.png"))
    assert "images:" not in capsys.readouterr().err  # --no-progress (and one image): no bar


def test_prompts_file_one_load_blank_lines_skipped_warnings_said_once(tmp_path, capsys, loads):
    f = tmp_path / "prompts.txt"
    long = " ".join(["fox"] * 100)
    f.write_text("a red fox\n\n   \n" + long + "\n")
    out = tmp_path / "p.png"
    assert cli.main(["generate", "--prompts", str(f), *BASE, "--n", "2", "--no-progress", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert len(loads) == 1
    index = json.loads((tmp_path / "p-index.json").read_text())
    got = [(i["prompt_line"], i["prompt"], i["seed"]) for i in index["images"]]
    assert got == [(1, "a red fox", 0), (1, "a red fox", 1), (4, long, 0), (4, long, 1)]
    assert all((tmp_path / f"p-{k}.png").is_file() for k in range(4))
    t5 = [x for x in cap.err.splitlines() if "T5 tokens" in x]
    # said once for the prompt (not once per image), with the line it came from; diffusers' own notice stays quiet
    assert len(t5) == 1 and "line 4: " in t5[0] and "prompt is 400 T5 tokens; the model reads 64: 336 dropped" in t5[0], cap.err
    assert "truncated" not in cap.err
    assert "images:" not in cap.err
    rec = json.loads((tmp_path / "p-3.json").read_text())
    assert any("T5 tokens" in n for n in rec["notes"])
    assert rec["prompt_read_by_t5"] == long[:63]  # stand-in T5 is byte-level: 63 bytes + end of sequence
    assert "prompt_read_by_t5" not in json.loads((tmp_path / "p-0.json").read_text())


def test_plain_generate_out_of_gpu_memory_is_one_line_with_the_hint(tmp_path, capsys, monkeypatch):
    """#13.10: a CUDA OOM (injected into the real runner after load, encode and denoise) ends in one line that
    names --vram and vramfit plan; the image made before it stays; no traceback; nothing half-written."""
    real = Runner._decode
    decodes = []

    def decode_then_oom(self, latents, req):
        decodes.append(req.seed)
        if len(decodes) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total "
                                         "capacity of 23.99 GiB of which 1.2 GiB is free.\nmore detail")
        return real(self, latents, req)

    monkeypatch.setattr(Runner, "_decode", decode_then_oom)
    monkeypatch.setattr(cli, "gpu_total_gb", lambda device: 24.5)
    out = tmp_path / "o.png"
    argv = ["generate", "a fox", *BASE, "--recipe", "bf16", "--n", "3", "--no-progress", "--out", str(out)]
    rc = cli.main(argv)
    cap = capsys.readouterr()
    assert rc in (1, 2)
    assert "Traceback" not in cap.err
    lines = [x for x in cap.err.splitlines() if x.startswith("vramfit: error:")]
    assert len(lines) == 1, cap.err
    msg = lines[0]
    assert msg.startswith("vramfit: error: out of GPU memory running transformer=bf16")
    assert "Tried to allocate 20.00 GiB" in msg and "more detail" not in msg
    assert "Try: vramfit generate 'a fox' --model flux-tiny" in msg and "--recipe" not in msg
    assert msg.endswith("--vram 24GB, or see vramfit plan flux-tiny --vram 24GB --height 64 --width 64")
    assert "1 image(s) written before it" in msg
    assert (tmp_path / "o-0.png").is_file()
    assert not (tmp_path / "o-1.png").exists() and not (tmp_path / "o-1.json").exists()
    assert json.loads((tmp_path / "o-index.json").read_text())["images_written"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
