"""Every bad input is refused before any heavy work, with the fix named, exit status 2, and nothing written."""

import hashlib
import math
from pathlib import Path

import pytest

from vramfit import cli, models, validate
from vramfit.errors import InputError
from vramfit.run import Request, Runner, request_for

TINY = models.get_model("flux-tiny")
DEV = models.get_model("flux-dev")
RANDOM = models.Weights("random")


@pytest.fixture
def no_load(monkeypatch):
    """Any model construction fails the test: the refusal must come before it."""

    def boom(*a, **k):
        raise AssertionError("heavy work started before the input was refused")

    monkeypatch.setattr(Runner, "__init__", boom)


@pytest.fixture
def earlier(tmp_path):
    """An image and record from an earlier run at --out: a refused run must leave them as they were."""
    out = tmp_path / "img.png"
    out.write_bytes(b"earlier image")
    out.with_suffix(".json").write_text('{"earlier": true}')
    return out


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(d.rglob("*"))}


def refused(capsys, argv, earlier, *expect):
    before = _snapshot(earlier.parent)
    rc = cli.main(["generate", *argv, "--out", str(earlier)] if "--out" not in argv else ["generate", *argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    line = [x for x in err.splitlines() if x.startswith("vramfit: error:")]
    assert len(line) == 1, err
    for e in expect:
        assert e in line[0], line[0]
    assert _snapshot(earlier.parent) == before  # nothing appeared, nothing changed
    return line[0]


TINY_ARGS = ["a fox", "--model", "flux-tiny"]


def test_size_beyond_the_model_maximum_names_the_largest(capsys, no_load, earlier):
    line = refused(capsys, TINY_ARGS + ["--height", "16384", "--width", "16384"], earlier,
                   "16384x16384 is 268.44 MP", "flux-tiny allows at most 0.26 MP", "512x512", "--allow-large")
    assert "Give a smaller --height/--width" in line


def test_flux_dev_maximum_is_about_2_mp_at_the_same_aspect_ratio(capsys, no_load, earlier):
    refused(capsys, ["a fox", "--model", "flux-dev", "--weights", "random", "--height", "2048", "--width", "2048"],
            earlier, "at most 2.10 MP", "1440x1440")
    # the common 2 MP sizes stay inside
    for h, w in ((1024, 1024), (1440, 1440), (1088, 1920), (1024, 2048)):
        assert validate.check_size(DEV, h, w) == []
    h, w = validate.largest_size(DEV.max_pixels, 1088, 4096)
    assert h % 16 == 0 and w % 16 == 0 and h * w <= DEV.max_pixels and (h + 16) * (w + 16) > DEV.max_pixels


def test_allow_large_lifts_the_limit_with_a_warning():
    with pytest.raises(InputError):
        validate.check_size(TINY, 528, 512)
    warnings = validate.check_size(TINY, 528, 512, allow_large=True)
    assert len(warnings) == 1 and "--allow-large" in warnings[0] and "0.27 MP" in warnings[0]
    # the Request carries the flag, so the runner (which validates again) lets it through too
    req = request_for(TINY, "a fox", height=528, width=512, allow_large=True)
    assert req.validate(TINY) == warnings
    with pytest.raises(InputError, match="allows at most"):
        request_for(TINY, "a fox", height=528, width=512).validate(TINY)


@pytest.mark.parametrize("flag,value,expect", [
    ("--height", "100", "multiple of 16"),
    ("--width", "0", "multiple of 16"),
    ("--guidance", "nan", "--guidance nan: must be a finite number"),
    ("--guidance", "inf", "--guidance inf: must be a finite number"),
    ("--guidance", "-1", "--guidance -1.0: must be in 0.0..100.0"),
    ("--steps", "0", "--steps 0: must be in 1..1000"),
    ("--steps", "5000", "--steps 5000: must be in 1..1000"),
    ("--seed", "-1", "--seed -1: must be in 0..2**63-1"),
    ("--seed", str(2**63), "must be in 0..2**63-1"),
    ("--weights-seed", "-3", "--weights-seed -3"),
    ("--n", "0", "--n 0: must be in 1..1000"),
    ("--max-error", "nan", "--max-error nan"),
])
def test_out_of_range_numbers(capsys, no_load, earlier, flag, value, expect):
    refused(capsys, TINY_ARGS + [flag, value], earlier, expect)


def test_seed_plus_n_must_stay_a_seed(capsys, no_load, earlier):
    refused(capsys, TINY_ARGS + ["--seed", str(2**63 - 2), "--n", "3"], earlier,
            "image i uses seed", f"--seed {2**63 - 3} or less")


@pytest.mark.parametrize("budget,expect", [("0GB", "more than zero"), ("nanGB", "give a size with a unit"),
                                           ("-4GB", "give a size with a unit"), ("200000GB", "must be in 0.0..")])
def test_bad_vram_budgets(capsys, no_load, earlier, budget, expect):
    refused(capsys, TINY_ARGS + [f"--vram={budget}"], earlier, "--vram", expect)


def test_an_output_path_that_cannot_be_written(capsys, no_load, earlier, tmp_path):
    refused(capsys, TINY_ARGS + ["--out", "/proc/nope/x.png"], earlier, "/proc/nope", "writable directory")
    assert not Path("/proc/nope").exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    refused(capsys, TINY_ARGS + ["--out", str(blocker / "x.png")], earlier, "cannot write there")
    refused(capsys, TINY_ARGS + ["--out", str(tmp_path)], earlier, "must end in .png")


def test_out_path_check_leaves_nothing_behind(tmp_path):
    target = tmp_path / "a" / "b" / "x.png"
    assert validate.check_out_path(target, ".png") == target
    assert list(tmp_path.iterdir()) == []  # the directories it made to try are gone again


def test_t5_token_limit_per_model_from_its_own_tokenizer():
    prompt = " ".join(["fox"] * 5000)
    for spec in (DEV, models.get_model("flux-schnell"), TINY):
        _, t5 = models.stand_in_tokenizers(spec)
        n = len(t5(prompt)["input_ids"])  # counted independently of check_prompt
        seen, warnings = validate.check_prompt(spec, RANDOM, prompt)
        limit = {"flux-dev": 512, "flux-schnell": 256, "flux-tiny": TINY.max_sequence_length}[spec.name]
        assert warnings[0] == f"prompt is {n} T5 tokens; the model reads {limit}: {n - limit} dropped"
        assert "CLIP reads 77" in warnings[1]
        assert len(t5(seen)["input_ids"]) == limit  # what the model sees is exactly the limit
        with pytest.raises(InputError, match=f"{n - limit} would be dropped"):
            validate.check_prompt(spec, RANDOM, prompt, strict=True)
    assert validate.check_prompt(DEV, RANDOM, "a red fox") == ("a red fox", [])


def test_checkpoint_tokenizers_are_the_ones_counted(tmp_path, capsys):
    """--weights DIR: the tokenizers saved in the directory count (here: the export of the stand-in)."""
    ckpt = tmp_path / "ckpt"
    assert cli.main(["export", "flux-tiny", "--out", str(ckpt)]) == 0
    capsys.readouterr()
    w = models.resolve_weights(TINY, str(ckpt))
    assert (ckpt / "tokenizer_2").is_dir()
    prompt = "x" * 200
    _, warnings = validate.check_prompt(TINY, w, prompt)
    assert warnings[0].startswith(f"prompt is 201 T5 tokens; the model reads {TINY.max_sequence_length}")


def test_long_prompt_with_strict_and_empty_prompt_refused(capsys, no_load, earlier, tmp_path):
    long = " ".join(["fox"] * 400)
    refused(capsys, ["--strict", long, "--model", "flux-tiny"], earlier, "T5 tokens", "--strict", "Shorten")
    refused(capsys, ["   ", "--model", "flux-tiny"], earlier, "the prompt is empty")


def test_prompts_file_bad_line_refused_before_loading(capsys, no_load, earlier, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a red fox\n\n" + " ".join(["fox"] * 400) + "\n")
    refused(capsys, ["--prompts", str(f), "--model", "flux-tiny", "--strict"], earlier, f"{f} line 3", "T5 tokens")
    refused(capsys, ["--prompts", str(tmp_path / "missing.txt"), "--model", "flux-tiny"], earlier, "cannot read")
    (tmp_path / "blank.txt").write_text("\n  \n")
    refused(capsys, ["--prompts", str(tmp_path / "blank.txt"), "--model", "flux-tiny"], earlier, "no prompts")
    refused(capsys, ["a fox", "--prompts", str(f), "--model", "flux-tiny"], earlier, "not both")


def test_check_number_api():
    assert validate.check_number("x", 3, 1, 5, integer=True) == 3
    assert validate.check_number("x", 3.0, integer=True) == 3
    for bad in (math.nan, math.inf, -math.inf, "3", None, True):
        with pytest.raises(InputError):
            validate.check_number("x", bad)
    with pytest.raises(InputError, match="whole number"):
        validate.check_number("x", 2.5, integer=True)


def test_request_validate_without_and_with_spec():
    req = Request("a fox", steps=4, height=128, width=128, guidance=float("nan"))
    with pytest.raises(InputError, match="finite"):
        req.validate()
    big = Request("a fox", steps=4, height=4096, width=4096, guidance=3.5)
    assert big.validate() == []  # no model given: only the model-independent rules
    with pytest.raises(InputError, match="allows at most"):
        big.validate(DEV)


def test_plan_and_bench_files_use_the_same_rules(tmp_path, capsys):
    assert cli.main(["plan", "flux-dev", "--gpu", "4090", "--height", "4096", "--width", "4096"]) == 2
    assert "allows at most 2.10 MP" in capsys.readouterr().err
    assert cli.main(["plan", "flux-dev", "--gpu", "4090", "--height", "0"]) == 2
    assert "--height 0" in capsys.readouterr().err
    from vramfit import bench

    toml = tmp_path / "bad.toml"
    toml.write_text('[[scenario]]\nname = "g"\nrecipe = "bf16"\nmodel = "flux-tiny"\nguidance = nan\n')
    with pytest.raises(InputError, match="'g'.*--guidance nan"):
        bench.load_scenarios(toml)
    toml.write_text('[[scenario]]\nname = "big"\nrecipe = "bf16"\nmodel = "flux-tiny"\nsize = 4096\n')
    with pytest.raises(InputError, match="allows at most"):
        bench.load_scenarios(toml)


def test_export_and_gguf_outputs_checked_before_any_work(capsys, monkeypatch):
    from vramfit import apply

    def boom(*a, **k):
        raise AssertionError("built a component before refusing the output path")

    monkeypatch.setattr(models, "build_random_component", boom)
    monkeypatch.setattr(apply, "load_component", boom)
    for argv in (["export", "flux-tiny", "--out", "/proc/nope/ckpt"],
                 ["quantize", "flux-tiny", "--recipe", "transformer=torchao-int8wo", "--out", "/proc/nope/ckpt"],
                 ["export-gguf", "flux-tiny", "--type", "q8_0", "--out", "/proc/nope/t.gguf"]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "vramfit: error: --out '/proc/nope" in err and "cannot write there" in err, err
    assert not Path("/proc/nope").exists()
    assert cli.main(["export", "flux-tiny", "--weights-seed", "-5", "--out", "/tmp/never-written"]) == 2
    assert "--weights-seed -5: must be in 0..2**63-1" in capsys.readouterr().err
    assert not Path("/tmp/never-written").exists()
