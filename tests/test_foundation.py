"""Foundation on the tiny stand-in (CPU): registry, stand-ins, staged runner identity, CLI, errors, manifest."""

import json

import numpy as np
import pytest
import torch

from vramfit import cli, models
from vramfit.errors import InputError, RecipeError
from vramfit.recipe import Recipe
from vramfit.run import Runner, request_for

PROMPT = "a watercolor fox in a snowy forest"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    return models.get_model("flux-tiny")


@pytest.fixture(scope="module")
def plain(tiny):
    runner = Runner(tiny, models.resolve_weights(tiny, "random"), Recipe(), CPU, progress=False)
    result = runner.generate(request_for(tiny, PROMPT, steps=3, seed=7))
    return runner, result


# ---------------------------------------------------------------------------------------------- registry


def test_flux_dev_architecture_param_counts():
    counts = models.count_params(models.get_model("flux-dev"))
    assert counts == {"text_encoder": 123_060_480, "text_encoder_2": 4_762_310_656,
                      "transformer": 11_901_408_320, "vae": 83_819_683}
    # bf16 pipeline = 33.74 GB, the real model's size
    assert round(sum(counts.values()) * 2 / 1e9, 1) == 33.7


def test_schnell_has_no_guidance_embedding():
    assert models.get_model("flux-schnell").config("transformer")["guidance_embeds"] is False
    assert models.get_model("flux-dev").config("transformer")["guidance_embeds"] is True


def test_unknown_model_lists_known():
    with pytest.raises(InputError, match="known models: flux-dev, flux-schnell, flux-tiny"):
        models.get_model("flux-pro")


def test_random_weights_seeded_per_component(tiny):
    a = models.build_random_component(tiny, "transformer", 0, CPU, torch.bfloat16)
    b = models.build_random_component(tiny, "transformer", 0, CPU, torch.bfloat16)
    c = models.build_random_component(tiny, "transformer", 1, CPU, torch.bfloat16)
    for (n, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert p.dtype == torch.bfloat16 and p.device.type == "cpu", n
        assert torch.equal(p, q), n
    assert any(not torch.equal(p, r) for p, r in zip(a.parameters(), c.parameters()))
    # norms start at one, not random (a random scale near zero would kill the signal)
    assert torch.all(a.norm_out.linear.bias == 0)


def test_tied_t5_embedding_stays_tied(tiny):
    t5 = models.build_random_component(tiny, "text_encoder_2", 0, CPU, torch.bfloat16)
    assert t5.shared.weight is t5.encoder.embed_tokens.weight


def test_stand_in_tokenizers_deterministic(tiny):
    t1, t1b = models.stand_in_tokenizers(tiny)
    t2, t2b = models.stand_in_tokenizers(tiny)
    ids = t1(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    assert ids == t2(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == 318 and max(ids) == 319  # bos, ..., eos at the top of the vocab
    assert t1b(PROMPT).input_ids == t2b(PROMPT).input_ids and t1b(PROMPT).input_ids[-1] == 1


# ---------------------------------------------------------------------------------------------- runner


def test_staged_and_plain_and_diffusers_are_bit_identical(tiny, plain):
    runner, result = plain
    req = request_for(tiny, PROMPT, steps=3, seed=7)
    staged = Runner(tiny, models.resolve_weights(tiny, "random"), Recipe.parse("offload=staged"), CPU,
                    progress=False).generate(req)
    reference = runner.pipe(PROMPT, num_inference_steps=3, guidance_scale=req.guidance, height=req.height,
                            width=req.width, max_sequence_length=req.max_sequence_length,
                            generator=torch.Generator("cpu").manual_seed(7)).images[0]
    a, b, c = (np.asarray(x) for x in (result.image, staged.image, reference))
    assert a.shape == (128, 128, 3) and a.std() > 1  # an actual image, not a constant
    assert np.array_equal(a, b)
    assert np.array_equal(a, c)
    assert torch.equal(result.latents, staged.latents)
    # a different seed changes the image (the comparison above can fail)
    other = runner.generate(request_for(tiny, PROMPT, steps=3, seed=8))
    assert not np.array_equal(a, np.asarray(other.image))


def test_staged_holds_one_stage_at_a_time(tiny):
    runner = Runner(tiny, models.resolve_weights(tiny, "random"), Recipe.parse("offload=staged"), CPU, progress=False)
    seen = []

    orig = runner._free_stage

    def spy(stage):
        seen.append((stage, {c: getattr(runner.pipe, c) is not None for c in models.COMPONENTS}))
        orig(stage)

    runner._free_stage = spy
    runner.generate(request_for(tiny, PROMPT, steps=2))
    assert [s for s, _ in seen] == ["encode", "denoise", "decode"]
    assert seen[0][1] == {"text_encoder": True, "text_encoder_2": True, "transformer": False, "vae": False}
    assert seen[1][1] == {"text_encoder": False, "text_encoder_2": False, "transformer": True, "vae": False}
    assert seen[2][1] == {"text_encoder": False, "text_encoder_2": False, "transformer": False, "vae": True}
    assert all(getattr(runner.pipe, c) is None for c in models.COMPONENTS)


def test_record_has_measurements_and_manifest(plain):
    _, result = plain
    r = result.record
    assert r["model"] == "flux-tiny" and r["weights"] == {"kind": "random", "seed": 0}
    assert r["recipe"] == str(Recipe())
    t = r["timings"]
    for key in ("load_s", "encode_s", "denoise_s", "decode_s", "total_s", "s_per_step"):
        assert t[key] > 0, key
    assert len(t["step_s"]) == 3
    assert r["memory"]["host_peak_rss_gb"] > 0 and "rss_gb" in r["memory"]["after_load"]
    assert set(r["stages"]) == {"encode", "denoise", "decode"}
    assert r["device"]["type"] == "cpu"
    assert {"torch", "diffusers", "transformers", "vramfit"} <= set(r["versions"])
    loads = {s["component"]: s for s in r["manifest"] if s["step"] == "load"}
    assert {c: s["class"] for c, s in loads.items()} == {
        "text_encoder": "CLIPTextModel", "text_encoder_2": "T5EncoderModel",
        "transformer": "FluxTransformer2DModel", "vae": "AutoencoderKL"}
    assert all(s["source"] == "random seed=0" for s in loads.values())
    assert r["weight_bytes"]["transformer"] == 2 * loads["transformer"]["params"]  # bf16
    assert r["latents"]["finite"]


def test_manifest_records_runtime_options(tiny):
    runner = Runner(tiny, models.resolve_weights(tiny, "random"), Recipe.parse("vae=tiling,attention=_native_math"),
                    CPU, progress=False)
    r = runner.generate(request_for(tiny, PROMPT, steps=1)).record
    steps = {s["step"]: s for s in r["manifest"]}
    assert steps["vae"]["mode"] == "tiling" and steps["vae"]["verified"] is True
    assert steps["attention"]["backend"] == "_native_math"
    assert runner.pipe.vae.use_tiling


@pytest.mark.slow
def test_regional_compile_is_applied_and_recorded(tiny):
    runner = Runner(tiny, models.resolve_weights(tiny, "random"), Recipe.parse("compile=regional"), CPU, progress=False)
    r = runner.generate(request_for(tiny, PROMPT, steps=2)).record
    comp = [s for s in r["manifest"] if s["step"] == "compile"][0]
    assert comp["verified"] and comp["compiled_modules"] == 4  # 2 double + 2 single blocks
    assert "compile_s" in r["timings"]


def test_gpu_only_recipes_refused_on_cpu_naming_the_step(tiny):
    w = models.resolve_weights(tiny, "random")
    for text, step in [("offload=model", "offload=model"), ("offload=sequential", "offload=sequential"),
                       ("offload=group-block", "offload=group-block"), ("attention=flash", "attention=flash")]:
        with pytest.raises(RecipeError) as e:
            Runner(tiny, w, Recipe.parse(text), CPU)
        assert step in str(e.value) and "GPU" in str(e.value) and "Alternative" in str(e.value)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(height=100), "--height 100: must be a positive multiple of 16"),
    (dict(width=0), "--width 0: must be a positive multiple of 16"),
    (dict(steps=0), "--steps 0: must be in 1..1000"),
])
def test_bad_requests(tiny, kwargs, fragment):
    req = request_for(tiny, PROMPT, **kwargs)
    with pytest.raises(InputError, match=fragment):
        req.validate()


# ---------------------------------------------------------------------------------------------- CLI


def run_cli(args, capsys):
    code = cli.main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("args, fragment", [
    (["generate", "x", "--model", "flux-tiny", "--height", "100"], "positive multiple of 16"),
    (["generate", "   ", "--model", "flux-tiny"], "the prompt is empty"),
    (["generate", "x", "--model", "flux-pro"], "known models: flux-dev, flux-schnell, flux-tiny"),
    (["generate", "x", "--model", "flux-tiny", "--recipe", "offload=warp"], "choose one of: none, model"),
    (["generate", "x", "--model", "flux-tiny", "--recipe", "offload=model", "--device", "cpu"],
     "offload=model needs a CUDA GPU"),
    (["generate", "x", "--model", "flux-tiny", "--weights", "hub"], "has no hub checkpoint"),
    (["generate", "x", "--model", "flux-tiny", "--weights", "/nonexistent/dir"], "not 'hub', 'random' or an existing"),
    (["generate", "x", "--model", "flux-tiny", "--out", "image.jpg"], "must end in .png"),
])
def test_cli_errors_before_heavy_work(args, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # any heavy work would build components: make that impossible
    monkeypatch.setattr(models, "build_random_component", lambda *a, **k: pytest.fail("heavy work started"))
    code, _, err = run_cli(args + ["--device", "cpu"] if "--device" not in args else args, capsys)
    assert code == 2
    assert fragment in err


def test_cli_error_keeps_existing_output(capsys, tmp_path):
    out = tmp_path / "img.png"
    out.write_bytes(b"precious")
    code, _, err = run_cli(["generate", "x", "--model", "flux-tiny", "--height", "30", "--out", str(out)], capsys)
    assert code == 2 and out.read_bytes() == b"precious"


def test_generate_export_reload_identical(capsys, tmp_path):
    a = tmp_path / "a.png"
    code, out, _ = run_cli(["generate", PROMPT, "--model", "flux-tiny", "--steps", "2", "--out", str(a),
                            "--no-progress", "--device", "cpu"], capsys)
    assert code == 0 and a.exists() and "s/step" in out
    rec_a = json.loads(a.with_suffix(".json").read_text())
    assert rec_a["output"]["image"] == str(a)

    ckpt = tmp_path / "ckpt"
    code, out, _ = run_cli(["export", "flux-tiny", "--out", str(ckpt)], capsys)
    assert code == 0
    assert (ckpt / "model_index.json").exists() and (ckpt / "transformer" / "config.json").exists()
    assert json.loads((ckpt / "vramfit.json").read_text())["weights"] == "random"
    # exporting onto a non-empty directory is refused, nothing overwritten
    code, _, err = run_cli(["export", "flux-tiny", "--out", str(ckpt)], capsys)
    assert code == 2 and "not an empty directory" in err

    b = tmp_path / "b.png"
    code, _, _ = run_cli(["generate", PROMPT, "--model", "flux-tiny", "--weights", str(ckpt), "--steps", "2",
                          "--out", str(b), "--no-progress", "--device", "cpu"], capsys)
    assert code == 0
    rec_b = json.loads(b.with_suffix(".json").read_text())
    assert rec_b["weights"]["kind"] == "dir" and rec_b["weights"]["checkpoint"]["weights"] == "random"
    assert all("from_pretrained" in s["api"] for s in rec_b["manifest"] if s["step"] == "load")
    assert np.array_equal(np.asarray(__import__("PIL.Image").Image.open(a)),
                          np.asarray(__import__("PIL.Image").Image.open(b)))
    assert rec_a["latents"]["sha256"] == rec_b["latents"]["sha256"]


def test_models_command(capsys):
    code, out, _ = run_cli(["models"], capsys)
    assert code == 0
    assert "11.90 B" in out and "4.76 B" in out and "33.74 GB" in out and "black-forest-labs/FLUX.1-dev" in out


def test_runner_reports_phases_and_bench_reads_the_last(tiny, capsys):
    """The bench prints the runner's phases, so a scenario killed by its time limit says where it was."""
    from vramfit import bench

    seen = []
    runner = Runner(tiny, models.resolve_weights(tiny, "random"), Recipe.parse("offload=staged"), CPU, progress=False,
                    on_event=lambda name, **info: seen.append((name, info)))
    runner.generate(request_for(tiny, PROMPT, steps=3))
    names = [n for n, _ in seen]
    assert names == ["load", "loaded", "encode", "load-stage", "load-stage", "denoise", "step", "step", "step",
                     "decode", "load-stage", "done"]
    assert [i["stage"] for n, i in seen if n == "load-stage"] == ["encode", "denoise", "decode"]
    assert [i["i"] for n, i in seen if n == "step"] == [1, 2, 3]
    show = bench.phase_printer(0.0)
    show("loaded", s=1.5)
    show("step", i=2, of=28)
    log = "some library warning\n" + capsys.readouterr().out + "Traceback ...\n"
    assert bench.last_phase(log).startswith("+") and bench.last_phase(log).endswith("s step i=2 of=28")
    assert bench.last_phase("no phases here\n") is None
