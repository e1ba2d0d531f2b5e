"""The serve pieces that need no live server: micro-batch grouping, previews, the url image store, the plan
that picks the mode, and argument checks."""

from __future__ import annotations

import argparse
import threading

import pytest

pytest.importorskip("fastapi")

from vramfit.errors import InputError, RecipeError  # noqa: E402
from vramfit.serve.engine import BatchQueue, Job  # noqa: E402


def test_batch_queue_groups_same_key_and_keeps_the_rest_in_order():
    q = BatchQueue(100)
    stop = threading.Event()
    for x in ["a1", "b1", "a2", "c1", "a3", "b2", "a4"]:
        q.put(x, stop)
    assert q.take(3, key=lambda s: s[0]) == ["a1", "a2", "a3"]  # the oldest and its like, up to max
    assert q.take(3, key=lambda s: s[0]) == ["b1", "b2"]
    assert q.take(3, key=lambda s: s[0]) == ["c1"]
    assert q.take(3, key=lambda s: s[0]) == ["a4"]
    assert q.take(3, key=lambda s: s[0], timeout=0) == []


def test_batch_queue_is_bounded():
    q = BatchQueue(2)
    stop = threading.Event()
    q.put(1, stop)
    q.put(2, stop)
    t = threading.Thread(target=q.put, args=(3, stop))
    t.start()
    t.join(0.5)
    assert t.is_alive() and len(q) == 2  # the producer waits: back-pressure, not a pile-up
    assert q.take(1) == [1]
    t.join(5)
    assert not t.is_alive() and len(q) == 2


@pytest.mark.parametrize("steps,k,want", [(4, 2, [2, 3]), (28, 3, [7, 14, 21]), (1, 3, []), (2, 3, [1]),
                                          (10, 0, [])])
def test_preview_steps(steps, k, want):
    from types import SimpleNamespace

    req = SimpleNamespace(steps=steps)
    job = Job(SimpleNamespace(partial_images=k), [req], [])
    assert job.preview_steps == want


def test_image_store_keeps_the_last_100():
    from vramfit.serve.app import ImageStore

    s = ImageStore()
    names = [s.put(bytes([i % 256]), "png") for i in range(105)]
    assert s.get(names[0]) is None and s.get(names[4]) is None
    assert s.get(names[5])[0] == bytes([5]) and s.get(names[-1])[0] == bytes([104 % 256])
    assert s.get(names[-1].replace(".png", ".jpeg")) is None  # the extension must match


def _args(**kw):
    base = dict(recipe=None, vram=None, gpu=None, size="1024x1024", steps=4, max_batch=4, cap_memory="off",
                max_queue=8, idle_unload=0.0, grace=1.0, port=8000)
    return argparse.Namespace(**{**base, **kw})


def test_serve_plan_mode_from_the_budget():
    import torch

    from vramfit import models, plan
    from vramfit.serve.cli import pipelined_fits, serve_mode, serve_plan, server_stream_k

    spec = models.get_model("flux-dev")
    w = models.resolve_weights(spec, "random")
    cuda = torch.device("cuda")  # planning only: nothing is placed on it
    # 8 GB cannot hold three worker processes with every stage resident: each worker streams its own blocks
    # (offload=stream:K), K sized for the three workers together, not generate's one process
    recipes, mode, rec, _ = serve_plan(_args(vram="8GB", gpu="h200"), spec, w, cuda)
    r = recipes[0]
    assert mode == "pipelined" and r.offload_kind == "stream", r
    assert pipelined_fits(rec["predicted"], 8.0) and set(rec["predicted"]["stage_own_gb"]) == {"encode", "denoise",
                                                                                               "decode"}
    shape = plan.Shape(1024, 1024, 4, 1, spec.max_sequence_length, images=1000)
    assert r.stream_k == server_stream_k(spec.name, r, shape, 8.0)
    assert not pipelined_fits(plan.predict(spec.name, r.with_(offload=f"stream:{r.stream_k + 1}"), shape,
                                           plan.gpu_profile("h200"), "random"), 8.0)  # one more block would not fit
    assert r.stream_k < plan.stream_k(spec.name, r, shape, 8.0 * plan.GB)  # generate's one-process K is larger
    assert all(serve_mode(x) == "pipelined" for x in recipes)  # fallbacks keep the worker layout
    recipes, mode, rec, _ = serve_plan(_args(vram="80GB", gpu="h200"), spec, w, cuda)
    assert mode == "pipelined" and recipes[0].offload == "none" and rec["max_batch"] >= 1
    with pytest.raises(InputError, match="smallest budget"):
        serve_plan(_args(vram="2GB", gpu="h200"), spec, w, cuda)


def test_pipelined_stage_caps_hold_the_batch_the_server_takes():
    """--vram 12GB on the H200 (2026-12-02): pipelined, the planner allowed batches of 2 while the stage caps were
    split from the batch-1 prediction; denoise ran out of memory at every batch of 2. The batch the server takes
    now has stage needs that fit the budget together, and the caps are split from that batch's prediction."""
    import torch

    from vramfit import models
    from vramfit.serve.cli import CUDA_CONTEXT_GB, serve_plan, stage_fractions, stage_needs

    spec = models.get_model("flux-dev")
    w = models.resolve_weights(spec, "random")
    cuda = torch.device("cuda")
    for vram in ("8GB", "12GB", "24GB", "80GB"):  # 8 and 12 GB: offload=stream, each worker its own blocks
        _, mode, rec, _ = serve_plan(_args(vram=vram, gpu="h200"), spec, w, cuda)
        if mode != "pipelined":
            continue
        pred = rec["predicted_at_max_batch"] or rec["predicted"]
        budget = float(vram.removesuffix("GB"))
        assert sum(stage_needs(pred).values()) <= budget - 3 * CUDA_CONTEXT_GB, (vram, rec["max_batch"])
        caps = stage_fractions(pred, budget, 140.0)
        need = stage_needs(pred)
        assert all(caps[s] * 140.0 >= need[s] - 1e-9 for s in need), (vram, caps, need)  # each stage gets its need
        assert sum(caps.values()) * 140.0 <= budget - 3 * CUDA_CONTEXT_GB + 1e-9


def test_serve_plan_from_a_recipe():
    import torch

    from vramfit import models
    from vramfit.serve.cli import serve_plan

    spec = models.get_model("flux-tiny")
    w = models.resolve_weights(spec, None)
    cpu = torch.device("cpu")
    recipes, mode, _, _ = serve_plan(_args(recipe="offload=staged"), spec, w, cpu)
    assert mode == "stage-batch"
    recipes, mode, _, _ = serve_plan(_args(recipe=""), spec, w, cpu)
    assert mode == "pipelined" and [r.vae_decode for r in recipes] == ["none", "tiling"]
    with pytest.raises(RecipeError, match="Alternative"):
        serve_plan(_args(recipe="offload=model"), spec, w, cpu)
    with pytest.raises(InputError, match="CUDA"):
        serve_plan(_args(vram="12GB"), spec, w, cpu)


@pytest.mark.parametrize("kw,msg", [(dict(recipe=None, vram=None), "exactly one"),
                                    (dict(recipe="", vram="8GB"), "exactly one"),
                                    (dict(recipe="", max_batch=0), "max-batch"),
                                    (dict(recipe="", port=70000), "port")])
def test_check_args(kw, msg):
    from vramfit.serve.cli import check_args

    with pytest.raises(InputError, match=msg):
        check_args(_args(**kw))


@pytest.mark.parametrize("recipe", ["offload=stream:1", "transformer=torchao-int8wo,text_encoder_2=torchao-int8wo,offload=stream:2"])
def test_stages_stream_their_own_blocks_and_give_generates_image(recipe):
    """`serve --recipe ...,offload=stream:K`: the encode stage streams T5's blocks and the denoise stage the
    transformer's (K resident), each in its own worker; the image equals `vramfit generate` with the same recipe, bit
    for bit (flux-tiny, CPU: the same stage classes the embedded server and Ray host run)."""
    import numpy as np
    import torch

    from vramfit import models
    from vramfit.recipe import Recipe
    from vramfit.run import Runner, request_for
    from vramfit.serve.cli import serve_plan
    from vramfit.serve.stages import DecodeStage, DenoiseStage, EncodeStage

    spec = models.get_model("flux-tiny")
    w = models.resolve_weights(spec, "random")
    cpu = torch.device("cpu")
    (r, *_), mode, _, _ = serve_plan(_args(recipe=recipe), spec, w, cpu)
    assert mode == "pipelined" and r.stream_k == Recipe.parse(recipe).stream_k
    req = request_for(spec, "a red fox", 3, 64, 64, None, 7)
    ref = Runner(spec, w, r, cpu, progress=False).generate(req)

    enc, den, dec = (cls(spec, w, r, cpu) for cls in (EncodeStage, DenoiseStage, DecodeStage))
    (e,) = enc.run([{"prompt": req.prompt, "max_sequence_length": req.max_sequence_length}])
    (d,) = den.run([{**e, "seed": req.seed, "steps": req.steps, "height": req.height, "width": req.width,
                     "guidance": req.guidance, "max_sequence_length": req.max_sequence_length}])
    (img,) = dec.run([{**d, "height": req.height, "width": req.width}])
    assert np.array_equal(np.asarray(img["image"]), np.asarray(ref.image))
    streamed = {c: ex.info["streamed"] for st in (enc, den) for c, ex in st.pipe._vramfit_stream.items()}
    assert set(streamed) == {"text_encoder_2", "transformer"} and all(n > 0 for n in streamed.values())
    assert den.manifest.find("offload")[0]["k"] == r.stream_k
    # the denoise stage puts a fresh scheduler on its pipe for each batch: the hoisted modulation reads that one's
    # timesteps (one precompute per batch, every later step a hit), a second batch included
    den.run([{**e, "seed": req.seed, "steps": req.steps, "height": req.height, "width": req.width,
              "guidance": req.guidance, "max_sequence_length": req.max_sequence_length}])
    mod = den.pipe._vramfit_stream["transformer"].stats()["modulation"]
    assert mod["precomputes"] == 2 and mod["hits"] == 2 * (req.steps - 1) and mod["unpredicted"] == 0, mod
