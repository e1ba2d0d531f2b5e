"""The streaming executor (offload=stream) on CPU with flux-tiny: which blocks are resident, the slot ring, bytes
moved, the packed host copy held once, and outputs bit-identical to the resident module for every backend that
runs on CPU. On CPU the slots are CPU buffers and copies are synchronous; the code path is the GPU's."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from vramfit import models, quant, stream
from vramfit.errors import RecipeError
from vramfit.recipe import Recipe
from vramfit.run import Runner, request_for

warnings.filterwarnings("ignore")
SPEC = models.get_model("flux-tiny")
CPU = torch.device("cpu")
# every CPU-capable family: bf16, bnb 4-bit and 8-bit, torchao int8 weight-only, quanto int8 and int4 (nested
# packed subclass), diffusers fp8 layerwise casting (hooks), GGUF
BACKENDS = ["bf16", "bnb-nf4", "bnb-int8", "torchao-int8wo", "quanto-int8", "quanto-int4", "fp8-layerwise",
            "gguf-q4_1"]


def tiny(value="bf16"):
    m = models.build_random_component(SPEC, "transformer", 0, "cpu", torch.bfloat16)
    if value != "bf16":
        quant.quantize_component(m, "transformer", value, "cpu")
    return m


def inputs(seed=0, seq=64, txt=16):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, seq, 64, generator=g).bfloat16(),
        encoder_hidden_states=torch.randn(1, txt, 64, generator=g).bfloat16(),
        pooled_projections=torch.randn(1, 32, generator=g).bfloat16(),
        timestep=torch.full((1,), 0.5).bfloat16(), img_ids=torch.zeros(seq, 3), txt_ids=torch.zeros(txt, 3),
        guidance=torch.full((1,), 3.5).bfloat16(), return_dict=False,
    )


def forward(m, seed=0):
    with torch.no_grad():
        return m(**inputs(seed))[0].float()


def assert_same_outputs(component, a, b):
    """The transformer (one forward) or T5 (12 token ids) gives bit-identical outputs in ``a`` and ``b``."""
    if component == "transformer":
        assert torch.equal(forward(a), forward(b))
    else:
        ids = torch.arange(12).unsqueeze(0)
        with torch.no_grad():
            assert torch.equal(a(ids).last_hidden_state, b(ids).last_hidden_state)


@pytest.mark.parametrize("value", BACKENDS)
def test_streamed_output_is_bit_identical_and_uses_the_slots(value):
    ref_model = tiny(value)
    ref = [forward(ref_model, s) for s in (0, 1)]
    m = tiny(value)
    ex = stream.attach(m, "transformer", CPU, k=1)
    assert ex.info["streamed"] == 3 and ex.info["layouts"] == 2  # double and single blocks: one template each
    for _ in range(2):  # a second pass runs through the ring again
        out = [forward(m, s) for s in (0, 1)]
        assert all(torch.equal(a, b) for a, b in zip(out, ref))
    # the streamed blocks really compute from the copied bytes: wipe the host regions and the output changes
    ex.host.zero_()
    for b in ex.slot_bufs:
        b.zero_()
    ex.slot_holds = [None] * ex.slots
    assert not torch.equal(forward(m, 0), ref[0])


def test_resident_blocks_are_the_largest_and_the_ring_reuses_slots_in_order():
    m = tiny()
    ex = stream.attach(m, "transformer", CPU, k=1, trace=True, hoist=False)  # the ring alone (modulation: below)
    sizes = {b.name: b.layout.nbytes for b in ex.blocks}
    assert sizes["transformer_blocks.0"] > sizes["single_transformer_blocks.0"]  # double blocks are larger
    assert ex.info["resident"] == ["transformer_blocks.0"]
    assert [b.name for b in ex.streamed] == ["transformer_blocks.1", "single_transformer_blocks.0",
                                             "single_transformer_blocks.1"]
    assert isinstance(m.transformer_blocks[1], stream.StreamedBlock)
    assert not isinstance(m.transformer_blocks[0], stream.StreamedBlock)
    forward(m)
    forward(m)
    # copies run ahead by one slot and wrap into the next step: block, slot
    assert ex.log == [(0, 0), (1, 1), (2, 0), (0, 1), (1, 0), (2, 1), (0, 0), (1, 1)]
    per_block = [b.layout.nbytes for b in ex.streamed]
    assert ex.bytes_copied == sum(per_block[p] for p, _ in ex.log)
    assert ex.info["bytes_streamed_per_pass"] == sum(per_block)
    assert ex.info["slot_bytes"] == 2 * max(per_block)


def test_host_blocks_are_held_once_in_the_packed_buffer_and_outside_the_module_tree():
    m = tiny("bnb-nf4")
    ex = stream.attach(m, "transformer", CPU, k=2)
    lo, hi = ex.host.data_ptr(), ex.host.data_ptr() + ex.host.numel()
    for b in ex.streamed:
        parts = [p for t in [*b.module.parameters(), *b.module.buffers()] for p in quant._tensor_parts(t)]
        assert parts and all(lo <= p.data_ptr() < hi for p in parts)  # data, absmax, code: all views of one buffer
    in_tree = {p.data_ptr() for p in m.parameters()}
    assert not any(lo <= p < hi for p in in_tree)  # the component's tree holds templates (slots), not host blocks
    assert ex.info["pinned_host_bytes"] == ex.host.numel() >= ex.info["bytes_streamed_per_pass"]
    assert ex.info["pinned"] is False  # pinning needs CUDA; on CPU the buffer is plain host memory


def test_k_bounds_and_detach():
    n = 4  # flux-tiny: 2 double + 2 single blocks
    with pytest.raises(RecipeError, match=r"has 4 blocks.*Alternative: offload=stream:4"):
        stream.attach(tiny(), "transformer", CPU, k=n + 1)
    ref = forward(tiny())
    m = tiny()
    ex = stream.attach(m, "transformer", CPU, k=n)  # all resident: nothing streams
    assert ex.info["streamed"] == 0 and ex.info["bytes_streamed_per_pass"] == 0
    assert torch.equal(forward(m), ref)
    m = tiny()
    ex = stream.attach(m, "transformer", CPU, k=0)
    assert ex.info["streamed"] == n
    ex.detach()
    assert not any(isinstance(b, stream.StreamedBlock) for b in m.modules())
    assert not hasattr(m, "stream_templates")
    assert torch.equal(forward(m), ref)  # the original blocks (now views of the host buffer) run as before


def test_load_placement_and_k_resolution(monkeypatch):
    gpu = torch.device("cuda")
    # bf16, fp8 casting and GGUF bytes load in host memory; device quantizers run on the GPU one block at a time
    for value in ("bf16", "fp8-layerwise", "gguf-q4_1"):
        assert stream.load_device(value, gpu, "transformer") == CPU
    for value in ("bnb-nf4", "torchao-int8wo", "quanto-int8", "torchao-int4wo"):
        assert stream.load_device(value, gpu, "transformer") == gpu
    assert stream.load_device("bf16", gpu, "text_encoder_2") == CPU
    assert stream.load_device("bnb-nf4", CPU, "transformer") == CPU
    assert stream.load_device("bf16", gpu, "vae") == gpu and stream.load_device("bf16", gpu, "text_encoder") == gpu
    assert stream.resolve_k(Recipe.parse("offload=stream:3")) == (3, "recipe")
    assert stream.resolve_k(Recipe.parse("offload=stream"))[0] == 0
    from vramfit import plan

    monkeypatch.setattr(plan, "stream_k", lambda model, recipe, shape, budget, gpu: 5, raising=False)
    assert stream.resolve_k(Recipe.parse("offload=stream"), spec=SPEC, vram_budget_bytes=8e9) == (5, "plan.stream_k")
    assert str(stream.resolve(Recipe.parse("nf4,offload=stream"), spec=SPEC, vram_budget_bytes=8e9)).count(
        "offload=stream:5") == 1


@pytest.mark.parametrize("value", ["bf16", "bnb-nf4"])
def test_pipeline_stream_matches_offload_none(value):
    """Whole pipeline: transformer streamed with K=1, T5 streamed with K=0; latents and image bit-identical."""
    req = request_for(SPEC, "a red bicycle", steps=2, seed=5)
    out = {}
    for off in ("none", "stream:1"):
        r = Runner(SPEC, models.resolve_weights(SPEC, "random"),
                   Recipe.parse(f"transformer={value},text_encoder_2={value},offload={off}"), CPU, progress=False)
        res = r.generate(req)
        out[off] = (res.latents, res.image.tobytes(), res.record, r)
    assert torch.equal(out["none"][0], out["stream:1"][0])
    assert out["none"][1] == out["stream:1"][1]
    entry = [s for s in out["stream:1"][2]["manifest"] if s["step"] == "offload"][0]
    assert entry["strategy"] == "stream" and entry["verified"] and entry["k"] == 1 and entry["slots"] == 2
    assert entry["components"]["transformer"]["streamed"] == 3
    assert entry["components"]["text_encoder_2"]["k"] == 0
    assert entry["components"]["text_encoder_2"]["streamed"] == SPEC.config("text_encoder_2")["num_layers"]
    assert entry["bytes_streamed_per_step"] == entry["components"]["transformer"]["bytes_streamed_per_pass"] > 0
    counts = stream.measured(out["stream:1"][3].pipe)
    # 2 steps x 3 streamed blocks, plus the copy issued ahead into the ring after the last block
    assert counts["transformer"]["copies"] == 2 * 3 + 2


def test_one_streamed_block_runs_in_a_single_slot():
    """K = blocks - 1 leaves one streamed block, so the ring has one slot: it used to crash after that block
    (IndexError in the ring refill; FLUX.1-dev offload=stream:56). The block is copied once and stays."""
    req = request_for(SPEC, "a red bicycle", steps=2, seed=5)
    ref = Runner(SPEC, models.resolve_weights(SPEC, "random"), Recipe(), CPU, progress=False).generate(req)
    r = Runner(SPEC, models.resolve_weights(SPEC, "random"), Recipe.parse("offload=stream:3"), CPU, progress=False)
    got = r.generate(req)
    assert torch.equal(ref.latents, got.latents)
    ex = r.pipe._vramfit_stream["transformer"]
    assert len(ex.streamed) == 1 and ex.slots == 1
    assert stream.measured(r.pipe)["transformer"]["copies"] == 1  # still in its slot at every later call


@pytest.mark.slow
def test_stream_with_regional_compile_matches_resident_compile():
    req = request_for(SPEC, "a red bicycle", steps=2, seed=5)
    lat = {}
    for off in ("none", "stream:1"):
        r = Runner(SPEC, models.resolve_weights(SPEC, "random"), Recipe.parse(f"compile=regional,offload={off}"), CPU,
                   progress=False)
        res = r.generate(req)
        lat[off] = res.latents
        comp = [s for s in res.record["manifest"] if s["step"] == "compile"][0]
        assert comp["verified"]
        if off != "none":  # a second image: the released slots are re-allocated under the compiled templates
            assert torch.equal(r.generate(req).latents, res.latents)
    assert torch.equal(lat["none"], lat["stream:1"])


def test_stream_recipes_pass_the_checks_and_compile_full_is_refused():
    from vramfit import apply

    for text in ("offload=stream", "transformer=bnb-nf4,text_encoder_2=bnb-nf4,offload=stream:3,compile=regional",
                 "transformer=quanto-int8,offload=stream:0", "transformer=gguf-q4_1,offload=stream"):
        apply.check(Recipe.parse(text), CPU)  # every CPU backend streams, on CPU too
    with pytest.raises(RecipeError, match="compile=full with offload=stream.*Alternative: offload=stream with "
                                          "compile=regional"):
        apply.check(Recipe.parse("offload=stream:2,compile=full"), CPU)


@pytest.mark.parametrize("value", ["bnb-nf4", "torchao-int8wo", "quanto-int8"])
def test_blockwise_quantization_gives_the_resident_bytes(value):
    """Under a budget the streamed components are quantized one block at a time (then moved to host memory): the
    same library call per linear, the component's skip list kept (T5's wo stays unquantized), same outputs."""
    for component in ("transformer", "text_encoder_2"):
        a = models.build_random_component(SPEC, component, 0, "cpu", torch.bfloat16)
        b = models.build_random_component(SPEC, component, 0, "cpu", torch.bfloat16)
        quant.quantize_component(a, component, value, "cpu")
        entry = stream.quantize_streamed(b, component, value, "cpu")
        assert quant.quantized_classes(a) == quant.quantized_classes(b) == entry["classes"]
        assert quant.weight_bytes(a) == entry["weight_bytes"]
        assert_same_outputs(component, a, b)
        if component == "text_encoder_2":
            wo = [m for n, m in b.named_modules() if n.endswith("DenseReluDense.wo")]
            assert wo and all(type(m) is torch.nn.Linear for m in wo)


def _bf16_bytes(module) -> int:
    """Bytes of plain (unquantized) bf16 weights that exist (not meta): quantized tensor subclasses, which report
    their original dtype, and packed bitsandbytes bytes are not counted."""
    return sum(p.numel() * p.element_size() for p in module.parameters()
               if p.device.type != "meta" and p.dtype == torch.bfloat16 and not stream._is_wrapper(p.data))


@pytest.mark.parametrize("value", ["bnb-nf4", "torchao-int8wo", "quanto-int8", "fp8-layerwise"])
def test_stand_in_quantized_while_drawn_holds_one_bf16_block(value):
    """offload=stream on the random stand-in: each block is quantized and parked as soon as its values are drawn
    (apply._build_random_blockwise); fp8 layerwise casting casts each block in host memory. Same bytes and outputs
    as drawing the whole component first, and at no point more than one block of bf16 weights beyond the
    component's non-block layers (29 GB of host RSS for NF4 on the H200 with the whole bf16 transformer drawn first,
    30.8 GB for fp8-layerwise transformer + T5)."""
    from vramfit import apply
    from vramfit.apply import Manifest

    weights = models.resolve_weights(SPEC, "random")
    for component in ("transformer", "text_encoder_2"):
        whole = models.build_random_component(SPEC, component, 0, "cpu", torch.bfloat16)
        block_bytes = max(_bf16_bytes(whole.get_submodule(f"{l}.{i}")) for l in stream.BLOCK_LISTS[component]
                          for i in range(len(whole.get_submodule(l))))
        rest_bytes = _bf16_bytes(whole) - sum(_bf16_bytes(whole.get_submodule(l)) for l in stream.BLOCK_LISTS[component])
        stream.quantize_streamed(whole, component, value, "cpu")
        stays = _bf16_bytes(whole)  # what quantization leaves in bf16 (biases, norms, skipped layers)
        seen = []
        real = stream.StreamedQuantizer.block_done

        def spy(self, name):
            seen.append((name, _bf16_bytes(self.module)))  # before this block is quantized: everything drawn so far
            real(self, name)

        stream.StreamedQuantizer.block_done = spy
        try:
            m = Manifest()
            drawn = apply._build_random_blockwise(SPEC, weights, component, value, torch.bfloat16, CPU, m, False,
                                                   park=True)
        finally:
            stream.StreamedQuantizer.block_done = real
        n_blocks = sum(len(whole.get_submodule(l)) for l in stream.BLOCK_LISTS[component])
        assert [n for n, _ in seen] == [f"{l}.{i}" for l in stream.BLOCK_LISTS[component]
                                        for i in range(len(whole.get_submodule(l)))] and len(seen) == n_blocks
        assert max(b for _, b in seen) <= block_bytes + rest_bytes + stays, (seen, block_bytes, rest_bytes, stays)
        assert max(b for _, b in seen) < _bf16_bytes(models.build_random_component(SPEC, component, 0, "cpu",
                                                                                    torch.bfloat16))
        assert quant.quantized_classes(drawn) == quant.quantized_classes(whole)
        assert quant.weight_bytes(drawn) == quant.weight_bytes(whole)
        [load] = [s for s in m.steps if s["step"] == "load"]
        assert load["built"].startswith("block by block") and load["params"] == sum(
            p.numel() for p in models.empty_component(SPEC, component, torch.bfloat16).parameters())
        assert_same_outputs(component, whole, drawn)


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("park", [False, True])
def test_stand_in_drawn_block_by_block_equals_the_whole_one(fuse, park):
    """The torchao stand-in is drawn block by block on its device, each block fused (fuse_qkv=on) and quantized as
    soon as it is drawn, rather than drawn whole in host memory and quantized onto the GPU layer by layer (31 s of
    the fp8dq + fused-QKV stand-in's load on the H200). The same tensors, bit for bit, as drawing it whole, fusing
    it (runtime.fuse_qkv) and quantizing it, and the same output; with ``park`` the blocks end in host memory."""
    from vramfit import apply, runtime
    from vramfit.apply import Manifest

    weights = models.resolve_weights(SPEC, "random")
    whole = models.build_random_component(SPEC, "transformer", 0, "cpu", torch.bfloat16)
    mw = Manifest()
    if fuse:
        runtime.fuse_qkv(whole, mw)
    quant.quantize_component(whole, "transformer", "torchao-int8wo", "cpu")
    m = Manifest()
    drawn = apply._build_random_blockwise(SPEC, weights, "transformer", "torchao-int8wo", torch.bfloat16, CPU, m,
                                          fuse, park=park)
    a, b = whole.state_dict(), drawn.state_dict()
    assert list(a) == list(b)
    for k in a:
        pa, pb = a[k], b[k]
        inner = getattr(pa, "qdata", None)
        if inner is not None:  # torchao's quantized weight: its packed data and scales
            assert torch.equal(pa.qdata, pb.qdata) and torch.equal(pa.scale, pb.scale), k
        else:
            assert torch.equal(pa, pb), k
    assert_same_outputs("transformer", whole, drawn)
    names = [s["step"] for s in m.steps]
    if fuse:
        [f] = [s for s in m.steps if s["step"] == "fuse_qkv"]
        assert f == {**[s for s in mw.steps if s["step"] == "fuse_qkv"][0], "api": f["api"]}
        assert "block by block" in f["api"] and names.index("fuse_qkv") < names.index("quantize")
        assert not hasattr(drawn.transformer_blocks[0].attn, "to_q") and hasattr(drawn.transformer_blocks[0].attn,
                                                                               "to_qkv")
    else:
        assert "fuse_qkv" not in names
    [load] = [s for s in m.steps if s["step"] == "load"]
    assert load["built"].startswith("block by block") and ("fused" in load["built"]) == fuse
    assert ("parked" in load["built"]) == park


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _cast_modules(module, storage) -> set:
    """Modules holding a parameter or buffer of their own in the fp8 storage dtype."""
    return {n for n, m in module.named_modules()
            if any(t is not None and t.dtype == storage for t in [*m._parameters.values(), *m._buffers.values()])}


def _hooks(module) -> dict:
    """{module name: [(hook name, class, storage, compute, non_blocking)]} of every diffusers hook registry."""
    return {n: [(k, type(h).__name__, getattr(h, "storage_dtype", None), getattr(h, "compute_dtype", None),
                 getattr(h, "non_blocking", None)) for k in m._diffusers_hook._hook_order
                for h in [m._diffusers_hook.hooks[k]]]
            for n, m in module.named_modules() if getattr(m, "_diffusers_hook", None) is not None}


@pytest.mark.parametrize("value", ["fp8-layerwise", "fp8-layerwise-e5m2"])
@pytest.mark.parametrize("component,fuse", [("transformer", False), ("transformer", True), ("text_encoder_2", False)])
def test_layerwise_stand_in_cast_block_by_block_equals_the_whole_cast(component, fuse, value, monkeypatch):
    """offload=stream on the fp8 layerwise-cast stand-in: each block is cast to its fp8 storage dtype in host memory
    as soon as it is drawn, then diffusers' casting runs on the whole component (a no-op on the blocks' cast
    layers, and the hooks are its own) -- rather than the whole bf16 component drawn first (host RSS peaked at
    30.8 GB on the H200 for the transformer + T5, with 20.7 GB pinned). Exactly what drawing it whole and casting
    it gives: the same modules cast (diffusers' skip patterns, T5's quant.layerwise_skip_patterns), the same
    LayerwiseCastingHook on each, the same bytes, the same output, and the quantize entry up to its api suffix."""
    from vramfit import apply, runtime
    from vramfit.apply import Manifest

    storage = torch.float8_e5m2 if value.endswith("e5m2") else torch.float8_e4m3fn
    weights = models.resolve_weights(SPEC, "random")
    whole = models.build_random_component(SPEC, component, 0, "cpu", torch.bfloat16)
    if fuse:
        runtime.fuse_qkv(whole, Manifest())
    ref = {"component": component, **quant.quantize_component(whole, component, value, "cpu")}
    at_draw: set = set()  # the block layers in fp8 right after each block was drawn, before the final casting
    real = stream.StreamedQuantizer.block_done

    def spy(self, name):
        real(self, name)
        at_draw.update(f"{name}.{n}" for n in _cast_modules(self.module.get_submodule(name), storage))

    monkeypatch.setattr(stream.StreamedQuantizer, "block_done", spy)
    m = Manifest()
    drawn = apply._build_random_blockwise(SPEC, weights, component, value, torch.bfloat16, CPU, m, fuse, park=True)
    cast = _cast_modules(whole, storage)
    # each block was cast as it was drawn, exactly its layers that the whole casting casts: a plan that leaves one
    # to the final casting (bf16 held to the end) fails here even though the end result would be the same
    assert at_draw == {n for n in cast if any(n.startswith(l + ".") for l in stream.BLOCK_LISTS[component])}
    # the same modules cast, each hooked by diffusers, and nothing else stored in fp8 (a block layer cast that
    # diffusers skips, or one it casts left in bf16, fails here and in the state dict below)
    assert cast and _cast_modules(drawn, storage) == cast
    assert set(stream.layerwise_hooks(drawn)) == set(stream.layerwise_hooks(whole)) == cast
    assert any(n.startswith(stream.BLOCK_LISTS[component][0] + ".") for n in cast)
    rest = {n for n in cast if not any(n.startswith(l + ".") for l in stream.BLOCK_LISTS[component])}
    # the rest is cast by the final call: FLUX's embedders; T5 casts nothing outside its blocks (shared, the final
    # norm and embed_tokens are skipped)
    assert bool(rest) == (component == "transformer"), rest
    assert _hooks(drawn) == _hooks(whole)
    a, b = whole.state_dict(), drawn.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(_bits(a[k]), _bits(b[k])), k
    assert all(t.device == CPU for t in [*drawn.parameters(), *drawn.buffers()])  # cast in host memory, parked
    assert_same_outputs(component, whole, drawn)
    [load] = [s for s in m.steps if s["step"] == "load"]
    assert load["built"] == ("block by block, each block " + ("fused, " if fuse else "")
                             + f"cast to {str(storage).removeprefix('torch.')} as soon as it is drawn")
    assert load["device"] == "cpu"
    [q] = [s for s in m.steps if s["step"] == "quantize"]
    assert q == {**ref, "api": q["api"]}
    assert q["api"].startswith(ref["api"] + "; block by block: ") and "in host memory" in q["api"]


def test_layerwise_block_cast_is_checked_against_diffusers_casting(monkeypatch):
    """The layers cast block by block come from diffusers' own casting run on a meta copy
    (``stream.layerwise_plan``); ``finish`` checks that the casting of the whole component hooked exactly those, so
    a plan that casts a layer diffusers skips (a norm's modulation linear), or misses one it casts, is an error
    rather than a different model."""
    from vramfit import apply
    from vramfit.apply import Manifest

    weights = models.resolve_weights(SPEC, "random")
    real = stream.layerwise_plan
    for change in ("add", "drop"):
        def plan(module, component, value, fuse=False, change=change):
            out = dict(real(module, component, value, fuse))
            if change == "add":
                out["transformer_blocks.0.norm1.linear"] = out["transformer_blocks.0.attn.to_q"]
            else:
                del out["transformer_blocks.0.attn.to_q"]
            return out

        monkeypatch.setattr(stream, "layerwise_plan", plan)
        with pytest.raises(RuntimeError, match="does not match diffusers' layerwise casting"):
            apply._build_random_blockwise(SPEC, weights, "transformer", "fp8-layerwise", torch.bfloat16, CPU,
                                          Manifest(), False, park=True)


def test_layerwise_stand_in_under_stream_is_cast_block_by_block_on_a_gpu_run(monkeypatch):
    """``load_component`` takes the block-by-block cast for fp8 layerwise transformer and T5 under offload=stream on
    a GPU run only: ``device`` is the host there (stream.load_device), so the run's device decides, which
    build_pipeline passes (``run_device``). On this CPU the path runs as on the GPU: it never touches the device."""
    from vramfit import apply
    from vramfit.apply import Manifest

    weights = models.resolve_weights(SPEC, "random")
    r = Recipe.parse("transformer=fp8-layerwise,text_encoder_2=fp8-layerwise,offload=stream")
    for component in ("transformer", "text_encoder_2"):
        for run_device, blockwise in ((torch.device("cuda"), True), (CPU, False), (None, False)):
            m = Manifest()
            apply.load_component(SPEC, weights, r, component, CPU, m, run_device=run_device)
            [load] = [s for s in m.steps if s["step"] == "load"]
            assert ("built" in load) == blockwise, (component, run_device)
    m = Manifest()
    apply.load_component(SPEC, weights, Recipe.parse("transformer=fp8-layerwise"), "transformer", CPU, m,
                         run_device=torch.device("cuda"))  # resident: drawn whole and cast, as before
    assert "built" not in m.steps[0]
    seen = {}
    real = apply.load_component

    def spy(spec, weights, recipe, component, device, manifest, gguf_file=None, run_device=None):
        seen[component] = (device, run_device)
        return real(spec, weights, recipe, component, device, manifest, gguf_file, run_device=run_device)

    monkeypatch.setattr(apply, "load_component", spy)
    apply.build_pipeline(SPEC, weights, r, CPU, Manifest())
    assert seen == {c: (CPU, CPU) for c in models.COMPONENTS}


def test_resident_torchao_stand_in_is_drawn_block_by_block(tmp_path):
    """The run's path: a resident torchao transformer (with fuse_qkv=on) comes from the block-by-block build."""
    weights = models.resolve_weights(SPEC, "random")
    r = Runner(SPEC, weights, Recipe.parse("transformer=torchao-int8wo,fuse_qkv=on"), CPU, progress=False)
    res = r.generate(request_for(SPEC, "a fox", steps=2, seed=0))
    [load] = [s for s in res.record["manifest"] if s["step"] == "load" and s["component"] == "transformer"]
    assert load["built"] == "block by block, each block fused, quantized on cpu as soon as it is drawn"
    assert [s["step"] for s in res.record["manifest"]].count("fuse_qkv") == 1
    assert torch.isfinite(res.latents).all()


def test_stand_in_drawn_block_weights_are_freed_once_quantized():
    """The bf16 values of a block drawn for offload=stream are freed as soon as the block is quantized, not kept
    alive until the whole component is drawn: the H200 NF4 row (2026-12-02) peaked at 35.7 GB of host RSS while
    14 GB remained after loading, because ``materialize_random`` held every drawn Parameter (for tied weights)."""
    import gc
    import weakref

    from vramfit import apply
    from vramfit.apply import Manifest

    weights = models.resolve_weights(SPEC, "random")
    alive_after: list[int] = []
    pending: list = []
    real = stream.StreamedQuantizer.block_done

    def spy(self, name):
        gc.collect()
        alive_after.append(sum(r() is not None for r in pending))  # earlier blocks' bf16 weights still alive
        pending.clear()
        before = list(self.module.get_submodule(name).parameters())
        real(self, name)
        kept = {id(p) for p in self.module.get_submodule(name).parameters()}  # norms, biases: stay as they are
        pending.extend(weakref.ref(p) for p in before if id(p) not in kept)  # replaced by quantized ones
        del before

    stream.StreamedQuantizer.block_done = spy
    try:
        for component in ("transformer", "text_encoder_2"):
            m = Manifest()
            drawn = apply._build_random_blockwise(SPEC, weights, component, "bnb-nf4", torch.bfloat16, CPU, m, False,
                                                   park=True)
            [load] = [s for s in m.steps if s["step"] == "load"]
            assert load["weight_bytes"] == 2 * load["params"]  # bf16 bytes, not the meta module's float32
            del drawn
    finally:
        stream.StreamedQuantizer.block_done = real
    assert len(alive_after) > 4 and not any(alive_after), alive_after


@pytest.mark.gpu
@pytest.mark.parametrize("value", ["bf16", "bnb-nf4", "torchao-int8wo", "quanto-int8", "fp8-layerwise"])
def test_cuda_stream_matches_offload_none(value):
    """The CUDA path (pinned host buffer, copy stream, events, block-wise quantization on the GPU): bit-identical."""
    gpu = torch.device("cuda")
    req = request_for(SPEC, "a red bicycle", steps=2, seed=5)
    lat = {}
    for off in ("none", "stream:1"):
        r = Runner(SPEC, models.resolve_weights(SPEC, "random"),
                   Recipe.parse(f"transformer={value},text_encoder_2={value},offload={off}"), gpu, progress=False)
        lat[off] = r.generate(req).latents
        if off != "none":
            ex = r.pipe._vramfit_stream["transformer"]
            assert ex.pinned and ex.host.is_pinned()
            m = stream.measured(r.pipe)["transformer"]
            # "copies" counts every copy issued, as on CPU; the timed window is about the last pass (plus prefetch)
            assert m["copies"] == 2 * 3 + 2
            assert 1 <= m["timed_copies"] <= m["copies"] and m["link_gb_s"] > 0
            assert all(b.untyped_storage().nbytes() == 0 for b in ex.slot_bufs)  # released after denoise
            # the modulation of the streamed blocks: copied once (a copy stream + events), served from the cache
            assert m["modulation"]["precomputes"] == 1 and m["modulation"]["hits"] == 1, m["modulation"]
            assert m["modulation"]["bytes_copied"] == sum(x.layout.nbytes for x in ex.mods) > 0
    assert torch.equal(lat["none"], lat["stream:1"])


def test_moving_a_bnb4_block_never_runs_the_subclass_to_and_keeps_each_state_its_own():
    """quantize_streamed moves each nf4 block off the device with _to_device. Params4bit.to moves its quant_state in
    place, freeing the old absmax mid-walk; a freed id reused by a new tensor then hit the id-keyed map and gave a
    state another module's weight (CUDA: "absmax must be float32, got torch.uint8"). Here the move is to meta."""
    from bitsandbytes.nn import Linear4bit

    m = tiny("bnb-nf4")
    block = m.transformer_blocks[0]
    before = {n: (mod.weight.quant_state, mod.weight.quant_state.absmax) for n, mod in block.named_modules()
              if isinstance(mod, Linear4bit)}
    stream._to_device(block, torch.device("meta"), set())
    for n, mod in block.named_modules():
        if not isinstance(mod, Linear4bit):
            continue
        qs_old, absmax_old = before[n]
        assert qs_old.absmax is absmax_old and absmax_old.device.type == "cpu"  # the old state was not mutated
        qs = mod.weight.quant_state
        assert qs is not qs_old and mod.quant_state is qs  # weight and module share the one new state
        assert type(qs.absmax) is torch.Tensor and qs.absmax.dtype == torch.float32
        assert qs.absmax.device.type == "meta" and tuple(qs.absmax.shape) == tuple(absmax_old.shape)
        assert mod.weight.dtype == torch.uint8 and mod.weight.device.type == "meta"


def test_rebuild_map_is_checked_by_identity():
    """An id-keyed entry whose object is gone must not be returned for a new object with the same id."""
    a = torch.zeros(3)
    objmap = {}
    new_a = stream._rebuild(a, lambda t: t.clone(), objmap)
    assert stream._rebuild(a, lambda t: t.clone(), objmap) is new_a
    b = torch.ones(3)
    objmap[id(b)] = (a, new_a)  # as if a had been freed and b had been given its id
    assert torch.equal(stream._rebuild(b, lambda t: t.clone(), objmap), b)


class FakeCudart:
    """Records register/unregister and, like the driver, refuses a range that is already registered (712)."""

    def __init__(self):
        self.registered, self.calls = set(), []

    def cudaHostRegister(self, ptr, nbytes, flags):
        self.calls.append(("register", ptr))
        if ptr in self.registered:
            return 712
        self.registered.add(ptr)
        return 0

    def cudaHostUnregister(self, ptr):
        self.calls.append(("unregister", ptr))
        if ptr not in self.registered:
            return 1  # cudaErrorInvalidValue
        self.registered.discard(ptr)
        return 0


def test_pinned_buffer_is_unregistered_when_it_dies_and_detach_is_idempotent(monkeypatch):
    import gc

    fake = FakeCudart()
    cleared = []
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    monkeypatch.setattr(stream, "_clear_cuda_error", lambda: cleared.append(1) or True)
    # an executor dropped without detach(): its buffer's death unregisters the range
    host = torch.empty(1 << 16, dtype=torch.uint8)
    ptr = host.data_ptr()
    stream.pin_in_place(host)
    assert fake.registered == {ptr}
    del host
    gc.collect()
    assert fake.registered == set() and fake.calls[-1] == ("unregister", ptr)
    # detach() unregisters once; the buffer's later death does not unregister again
    host = torch.empty(1 << 16, dtype=torch.uint8)
    fin = stream.pin_in_place(host)
    fin()
    fin()
    n = len(fake.calls)
    del host
    gc.collect()
    assert len(fake.calls) == n and not fake.registered and not cleared
    # a range still registered: a clear error, and the runtime's last error cleared before raising
    host = torch.empty(1 << 16, dtype=torch.uint8)
    fake.registered.add(host.data_ptr())
    with pytest.raises(RuntimeError, match="error 712"):
        stream.pin_in_place(host)
    assert cleared == [1]


@pytest.mark.parametrize("value", ["bf16", "bnb-nf4", "quanto-int4", "fp8-layerwise"])
def test_release_frees_the_slots_and_the_next_pass_reallocates_them(value):
    """After its stage an executor frees its slot buffers (templates keep their modules, their tensors hold nothing);
    the next first block re-allocates them and the output is still bit-identical."""
    ref_model = tiny(value)
    ref = forward(ref_model, 0)
    m = tiny(value)
    ex = stream.attach(m, "transformer", CPU, k=1)
    assert torch.equal(forward(m, 0), ref)
    tmpl_params = [p for p in m.stream_templates.parameters()]
    slot_bytes = ex.info["slot_bytes"]
    copies = ex.copies
    assert ex.release() == slot_bytes > 0
    assert all(b.untyped_storage().nbytes() == 0 for b in ex.slot_bufs) and ex.released
    assert ex.release() == 0  # idempotent
    now = list(m.stream_templates.parameters())  # the same template tensors (compiled regions keep them)
    assert len(now) == len(tmpl_params) and all(a is b for a, b in zip(now, tmpl_params))
    assert torch.equal(forward(m, 0), ref)  # re-allocated at the first streamed block, every block copied again
    assert not ex.released and sum(b.untyped_storage().nbytes() for b in ex.slot_bufs) == slot_bytes
    assert ex.copies - copies == 3 + 2
    assert torch.equal(forward(m, 1), forward(ref_model, 1))


def test_runner_releases_the_stream_slots_after_each_stage():
    req = request_for(SPEC, "a red bicycle", steps=2, seed=5)
    r = Runner(SPEC, models.resolve_weights(SPEC, "random"), Recipe.parse("offload=stream:1"), CPU, progress=False)
    r.load()
    # no ring holds memory before its stage (the transformer's ring beside T5's set the bf16 stream peak on the H200)
    for c in ("transformer", "text_encoder_2"):
        ex = r.pipe._vramfit_stream[c]
        assert ex.released and all(b.untyped_storage().nbytes() == 0 for b in ex.slot_bufs), c
    seen = {}
    tr = r.pipe._vramfit_stream["transformer"]
    real_run = type(tr).run

    def spy(self, pos, args, kwargs):
        if self is r.pipe._vramfit_stream["text_encoder_2"]:
            seen.setdefault("transformer ring during encode", tr.released)
        return real_run(self, pos, args, kwargs)

    type(tr).run = spy
    try:
        first = r.generate(req)
    finally:
        type(tr).run = real_run
    assert seen == {"transformer ring during encode": True}
    for c in ("transformer", "text_encoder_2"):
        ex = r.pipe._vramfit_stream[c]
        assert ex.released and all(b.untyped_storage().nbytes() == 0 for b in ex.slot_bufs), c
    again = r.generate(req)  # a second image re-allocates them
    assert torch.equal(first.latents, again.latents)
    assert stream.measured(r.pipe)["transformer"]["copies"] == 2 * (2 * 3 + 2)


def test_a_broken_bnb4_state_is_named_before_any_kernel_runs():
    m = tiny("bnb-nf4")
    stream.check_bnb4_states(m, "transformer")  # as bitsandbytes built them
    lin = m.transformer_blocks[0].attn.to_q
    lin.weight.quant_state.absmax = m.transformer_blocks[0].attn.to_k.weight  # what the id mix-up produced
    with pytest.raises(RuntimeError, match=r"attn\.to_q.*absmax is Params4bit torch.uint8"):
        stream.check_bnb4_states(m, "transformer")


def test_planner_counts_the_load_peak_of_a_checkpoint_under_stream():
    # --weights DIR: a torchao T5 is quantized on load, whole on the GPU, before its blocks move out
    # (apply.load_component -> stream.park_blocks); the transformer, an NF4 / quanto T5 (stream.blockwise_from_host)
    # and the random stand-in are quantized block by block from host memory instead
    from vramfit.plan import Shape, predict
    from vramfit.plan.data import gpu_profile

    gpu = gpu_profile("h200")
    shape = Shape(1024, 1024, 28)
    int8 = Recipe.parse("transformer=torchao-int8wo,text_encoder_2=torchao-int8wo,offload=stream:0")
    dir_ = predict("flux-dev", int8, shape, gpu, weights_kind="dir")
    rnd = predict("flux-dev", int8, shape, gpu, weights_kind="random")
    assert "load" not in rnd["stage_peak_gb"]
    # the whole int8 T5 (4.9 GB) sits on the GPU with everything resident while loading: above every run stage
    assert dir_["stage_peak_gb"]["load"] > max(dir_["weights_gb"]["text_encoder_2"], rnd["peak_vram_gb"])
    assert dir_["peak_vram_gb"] == max(dir_["stage_peak_gb"].values())
    for t5 in ("bnb-nf4", "quanto-int8", "bf16"):  # block by block from host memory: no load stage above the run
        r = Recipe.parse(f"transformer=bnb-nf4,text_encoder_2={t5},offload=stream:0")
        assert "load" not in predict("flux-dev", r, shape, gpu, weights_kind="dir")["stage_peak_gb"], t5


@pytest.mark.parametrize("value,t5", [("torchao-int8wo", "bf16"), ("quanto-int8", "bf16"),
                                      ("quanto-int8", "quanto-int8"), ("torchao-int8wo", "torchao-int8wo")])
def test_checkpoint_stream_quantizes_the_transformer_block_by_block_and_matches_offload_none(tmp_path, value, t5):
    # --weights DIR + offload=stream: the transformer loads bf16 into host memory and is quantized one block at a
    # time (quantize-on-load would put the whole quantized transformer on the GPU); the image equals the
    # quantize-on-load run with offload=none
    from vramfit import cli

    d = tmp_path / "tiny"
    assert cli.main(["export", "flux-tiny", "--out", str(d)]) == 0
    w = models.resolve_weights(SPEC, str(d))
    req = request_for(SPEC, "a red bicycle", steps=2, seed=3)
    out = {}
    for off in ("none", "stream:1"):
        r = Runner(SPEC, w, Recipe.parse(f"transformer={value},text_encoder_2={t5},offload={off}"), CPU,
                   progress=False)
        res = r.generate(req)
        out[off] = (res.latents, res.image.tobytes(), res.record["manifest"])
        r.close()
    assert torch.equal(out["none"][0], out["stream:1"][0]) and out["none"][1] == out["stream:1"][1]
    steps = out["stream:1"][2]
    blockwise = ["transformer"] + (["text_encoder_2"] if stream.blockwise_from_host(t5, "text_encoder_2") else [])
    for c in blockwise:
        [load] = [s for s in steps if s["step"] == "load" and s["component"] == c]
        assert "into host memory" in load["api"] and "quantized_classes" not in load
        [q] = [s for s in steps if s["step"] == "quantize" and s["component"] == c]
        assert "quantize_streamed" in q["api"] and q["quantized_modules"] > 0
    if t5 == "torchao-int8wo":  # torchao T5 keeps quantize-on-load (transformers also quantizes its `wo`)
        [load] = [s for s in steps if s["step"] == "load" and s["component"] == "text_encoder_2"]
        assert "quantization_config=" in load["api"] and load.get("quantized_classes")
    none_load = [s for s in out["none"][2] if s["step"] in ("load", "pipeline-quantization")]
    assert any("PipelineQuantizationConfig" in s.get("api", "") for s in none_load)  # the other path, really


def _device_stream():
    """benchmarks/device_stream.py as a module (it is a script, not part of the package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "device_stream.py"
    spec = importlib.util.spec_from_file_location("device_stream", path)
    ds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ds)
    return ds


def test_device_stream_sweep_group_reattaches_each_budget_and_keeps_the_image():
    """benchmarks/device_stream.py's sweep group (one build per value, the executor re-attached with each budget's
    K, smallest first): every budget is a row with its own K and recipe, the image does not change with K, and a
    budget resolving to the previous recipe is a row saying so."""
    ds = _device_stream()
    out = ds.child_sweep({"value": "bf16", "budgets_gb": [12, 3, 4, 8, 16, 24], "steps": 2}, smoke=True)
    rows = out["rows"]
    assert [r["name"] for r in rows] == [f"sweep-bf16-{gb}GB" for gb in (3, 4, 8, 12, 16, 24)]
    ran = [r for r in rows if "recipe" in r]
    ks = [Recipe.parse(r["recipe"]).stream_k for r in ran]
    assert ks == sorted(ks) and len(set(ks)) > 2, ks  # re-attached with growing K
    assert all("error" not in r for r in rows), [r.get("error") for r in rows]
    assert out["same_latents_across_budgets"] is True
    assert [Recipe.parse(r["recipe"]).vae_decode for r in ran] == ["tiling" if r["scenario"]["budget_gb"] <= 8
                                                                   else "none" for r in ran]
    assert all(r["timings"]["load_s"] is None for r in ran[1:])  # the build belongs to the first row only
    assert any("same resolved recipe" in r.get("skipped", "") for r in rows)


def test_device_stream_sweep_group_goes_on_after_an_out_of_memory_in_generate(monkeypatch):
    """An out-of-memory while generating at one budget is that budget's row; the pipeline is already built, so the
    next budget re-attaches and runs (2026-12-02: fp8 at 3 GB stopped its whole group). Another error stops it."""
    from vramfit import run

    ds = _device_stream()
    real = run.Runner.generate
    calls = {"n": 0}

    def failing_first(exc):
        def generate(self, req):
            calls["n"] += 1
            if calls["n"] == 1:
                raise exc
            return real(self, req)
        return generate

    monkeypatch.setattr(run.Runner, "generate", failing_first(torch.OutOfMemoryError("CUDA out of memory (test)")))
    out = ds.child_sweep({"value": "bf16", "budgets_gb": [3, 4, 8], "steps": 2}, smoke=True)
    first, *rest = out["rows"]
    assert first["error"].startswith("OutOfMemoryError") and "continued" in first
    ran = [r for r in rest if "recipe" in r]
    assert len(ran) == 2 and all("error" not in r for r in rest)
    assert all(r["timings"]["load_s"] is None for r in ran)  # built by the failed row, re-attached here
    assert out["same_latents_across_budgets"] is True

    calls["n"] = 0
    monkeypatch.setattr(run.Runner, "generate", failing_first(RuntimeError("not memory")))
    out = ds.child_sweep({"value": "bf16", "budgets_gb": [3, 4, 8], "steps": 2}, smoke=True)
    assert len(out["rows"]) == 1 and out["rows"][0]["error"].startswith("RuntimeError")


HEAP_CHURN = """
import gc, json, torch
from vramfit import measure
first = measure.release_host_heap()
x = torch.empty(24 * 2**20, dtype=torch.uint8); x.fill_(1); del x  # freeing an mmapped chunk lifts the threshold
big, keep = [], []
for _ in range(96):  # 96 x 8 MB on the heap, each followed by a small live tensor: holes, not a free top
    t = torch.empty(8 * 2**20, dtype=torch.uint8); t.fill_(1); big.append(t)
    keep.append(torch.ones(4096, dtype=torch.uint8))
del big, t; gc.collect()
before = measure.host_rss_gb()["rss_gb"]
released = measure.release_host_heap()
print(json.dumps({"first": first, "before": before, "released": released,
                  "after": measure.host_rss_gb()["rss_gb"], "kept": len(keep)}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="RSS from /proc (Linux)")
def test_freed_heap_tensors_leave_rss_once_the_heap_is_trimmed():
    """Tensors under glibc's mmap threshold live on the heap; freed between live ones they leave holes that stay in
    RSS (the streamed stand-in's draw -> quantize -> pack churn: ~5 GB on the H200). ``release_host_heap`` gives
    them back, and the RSS it reports released is really gone from /proc. A fresh process: the test runner's heap
    has holes of its own that would take the small tensors."""
    import json
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", HEAP_CHURN], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0, p.stderr[-2000:]
    d = json.loads(p.stdout.strip().splitlines()[-1])
    if d["first"] is None:
        pytest.skip("no glibc malloc_trim here")
    assert d["released"] > 0.6, d  # of the 0.8 GB freed
    assert d["before"] - d["after"] == pytest.approx(d["released"], abs=0.05)


def test_the_load_record_says_what_the_heap_trim_released():
    spec = models.get_model("flux-tiny")
    r = Runner(spec, models.resolve_weights(spec, "random"),
               Recipe.parse("transformer=torchao-int8wo,offload=stream:1"), torch.device("cpu"), progress=False)
    r.load()
    from vramfit import measure

    if measure.release_host_heap() is None:
        pytest.skip("no glibc malloc_trim here")
    assert isinstance(r.load_record["after_load"]["heap_released_gb"], float)


def test_layerwise_cast_templates_hold_only_their_slot_after_each_block():
    """diffusers' layerwise casting casts each weight up before a layer and down after it, into new tensors. A
    template that kept those after its block held one block's weights outside the ring until its next run, one per
    template (fp8 streamed at K=0 ran out of memory under 3 GB on the H200). After every block, each template's
    weights are views of its slot again, and the output is the resident one."""
    ref = forward(tiny("fp8-layerwise"), 0)
    m = tiny("fp8-layerwise")
    ex = stream.attach(m, "transformer", CPU, k=0)
    assert ex.rebind_each_run
    assert torch.equal(forward(m, 0), ref)

    def inside(t, buf):
        lo = buf.untyped_storage().data_ptr()
        return lo <= t.data_ptr() < lo + buf.untyped_storage().nbytes()

    for slot, row in enumerate(ex.templates):
        for tmpl in row:
            params = [p for p in tmpl.parameters() if p.numel()]
            assert params and all(inside(p, ex.slot_bufs[slot]) for p in params), (slot, type(tmpl).__name__)
            assert any(p.dtype == torch.float8_e4m3fn for p in params)  # stored in fp8 again, not bf16


def test_planner_counts_layerwise_recast_copies_of_a_streamed_block(monkeypatch):
    """fp8-layerwise streamed at K=0 ran out of memory under a 3 GB cap on the H200 (2.75 GB allocated) where the
    planner had predicted 2.16 GB: the recast copies of the running block were not counted. The executor now frees
    those copies after each block (the 2.75 GB was reached with up to four templates holding them), and the
    planner counts one block's: its fp8 part only -- the layers the casting skips (norms, adaLN modulation) stay
    bf16 and are not copied. Session 9 ran that recipe under the 3 GB cap with 2.33 GB allocated; counting the whole
    block had predicted 2.61, the fp8 part 2.38."""
    from vramfit.plan import estimate
    from vramfit.plan.data import Shape
    from vramfit.plan.memory import _largest_streamed_recast, stream_split, stream_stage_peaks
    from vramfit.plan.weights import layout

    fp8 = Recipe.parse("transformer=fp8-layerwise,text_encoder_2=fp8-layerwise,offload=stream:0,vae_decode=tiling")
    nf4 = Recipe.parse("transformer=bnb-nf4,text_encoder_2=bnb-nf4,offload=stream,vae_decode=tiling")
    lay = layout("flux-dev", "transformer", "fp8-layerwise")
    term = _largest_streamed_recast("flux-dev", "transformer", "fp8-layerwise", 57)
    assert 0 < term < max(lay.stream_blocks)  # the fp8 part of a block, not the whole block
    assert all(0 < r < b for r, b in zip(lay.stream_recast, lay.stream_blocks))
    assert layout("flux-dev", "transformer", "bnb-nf4").stream_recast == ()
    from vramfit.plan import memory

    peak = stream_stage_peaks("flux-dev", fp8, Shape(), 0)
    monkeypatch.setattr(memory, "_largest_streamed_recast", lambda *a: 0)
    no_term = stream_stage_peaks("flux-dev", fp8, Shape(), 0)
    monkeypatch.undo()
    assert peak["denoise"] - no_term["denoise"] == pytest.approx(term / 1e9)  # counted on the stage that runs it
    assert estimate.stream_k("flux-dev", nf4, Shape(), 3e9) == 4  # the measured NF4 3 GB choice stands
    # the term is the largest streamed block, on the stage that runs it: T5's in encode, the transformer's in denoise
    t5_only = Recipe.parse("transformer=bnb-nf4,text_encoder_2=fp8-layerwise,offload=stream:0,vae_decode=tiling")
    nf4_k0 = Recipe.parse("transformer=bnb-nf4,text_encoder_2=bnb-nf4,offload=stream:0,vae_decode=tiling")
    a, b = stream_stage_peaks("flux-dev", t5_only, Shape(), 0), stream_stage_peaks("flux-dev", nf4_k0, Shape(), 0)
    assert a["denoise"] == pytest.approx(b["denoise"])  # no layerwise transformer: no transformer term
    t5_block = max(stream_split("flux-dev", t5_only, 0)["text_encoder_2"][1]) / 1e9
    assert a["encode"] > b["encode"] and t5_block > 0


def test_streamed_blocks_modulation_is_computed_once_per_generation_from_its_own_bytes():
    """The adaLN modulation layers of the streamed blocks leave the per-step copy: copied once per generation and
    run for every step's temb (predicted from the scheduler's timesteps, each step checked exactly); the image stays
    bit-identical to offload=none."""
    req = request_for(SPEC, "a red bicycle", steps=3, seed=5)
    ref = Runner(SPEC, models.resolve_weights(SPEC, "random"), Recipe(), CPU, progress=False).generate(req)
    r = Runner(SPEC, models.resolve_weights(SPEC, "random"), Recipe.parse("offload=stream:1"), CPU, progress=False)
    got = r.generate(req)
    assert torch.equal(ref.latents, got.latents)
    ex = r.pipe._vramfit_stream["transformer"]
    # streamed: transformer_blocks.1 (norm1 and norm1_context) and the two single blocks (norm)
    assert [(m.pos, m.path) for m in ex.mods] == [(0, "norm1.linear"), (0, "norm1_context.linear"),
                                                  (1, "norm.linear"), (2, "norm.linear")]
    assert isinstance(ex.streamed[0].module.norm1.linear, stream.HoistedLinear)
    assert not isinstance(r.pipe.transformer.transformer_blocks[0].norm1.linear, stream.HoistedLinear)  # resident
    fresh = models.build_random_component(SPEC, "transformer", 0, "cpu", torch.bfloat16)
    full = [stream.block_layout(fresh.get_submodule(b.name)).nbytes for b in ex.streamed]
    mod_bytes = sum(m.layout.nbytes for m in ex.mods)
    assert ex.info["bytes_streamed_per_pass"] < sum(full)
    assert ex.info["modulation"]["bytes_per_generation"] == mod_bytes
    assert abs(ex.info["bytes_streamed_per_pass"] + mod_bytes - sum(full)) <= stream.ALIGN * 4 * len(full)
    st = stream.measured(r.pipe)["transformer"]
    assert st["modulation"] == {"precomputes": 1, "steps_computed": 3, "hits": 2, "unpredicted": 0,
                                "bytes_copied": mod_bytes}
    assert st["copies"] == 3 * 3 + 2  # the ring's copies, as without hoisting: the modulation is counted apart
    entry = [s for s in got.record["manifest"] if s["step"] == "offload"][0]
    assert entry["modulation"]["hoisted_layers"] == 4
    # a second image: computed again (the stage's cache is dropped with its ring), from the host bytes: wiped, the
    # image changes
    assert torch.equal(r.generate(req).latents, ref.latents)
    assert stream.measured(r.pipe)["transformer"]["modulation"]["precomputes"] == 2
    # a fresh scheduler on the pipe (the server's denoise stage sets one per batch): its timesteps are the ones read
    r.pipe.scheduler = type(r.pipe.scheduler).from_config(r.pipe.scheduler.config)
    assert torch.equal(r.generate(req).latents, ref.latents)
    st = stream.measured(r.pipe)["transformer"]["modulation"]
    assert st["precomputes"] == 3 and st["unpredicted"] == 0 and st["hits"] == 3 * 2
    for v in ex.mod_views:
        v.zero_()
    assert not torch.equal(r.generate(req).latents, ref.latents)


def test_unpredicted_temb_computes_the_modulation_for_that_step_alone_and_detach_restores_the_layers():
    ref_model = tiny()
    ref = [forward(ref_model, s) for s in (0, 1)]
    m = tiny()
    ex = stream.attach(m, "transformer", CPU, k=1)  # no scheduler: every temb is unpredicted
    assert all(torch.equal(forward(m, s), want) for s, want in zip((0, 1), ref))
    st = ex.stats()["modulation"]
    assert st["unpredicted"] == st["precomputes"] >= 2 and st["hits"] == 0
    ex.detach()
    assert not any(isinstance(x, stream.HoistedLinear) for x in m.modules())
    assert torch.equal(forward(m), ref[0])
    assert stream.hoists(Recipe.parse("offload=stream")) and not stream.hoists(Recipe.parse("offload=stream,compile=regional"))


def test_generate_says_what_streams_a_step_and_that_the_modulation_runs_once(tmp_path, capsys):
    from vramfit import cli

    for recipe, hoisted in (("offload=stream:1", True), ("offload=stream:1,compile=regional", False)):
        out = tmp_path / f"fox-{hoisted}.png"
        assert cli.main(["generate", "a fox", "--model", "flux-tiny", "--steps", "2", "--recipe", recipe,
                         "--out", str(out), "--no-progress"]) == 0
        applied = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("applied")][0]
        assert "offload stream:1, " in applied and " streamed a step" in applied
        assert ("modulation of 4 layers once per image" in applied) is hoisted, applied
        import json

        entry = [s for s in json.loads(out.with_suffix(".json").read_text())["manifest"] if s["step"] == "offload"][0]
        assert entry["modulation"]["hoisted_layers"] == (4 if hoisted else 0)
        if not hoisted:
            assert "compile" in entry["modulation"]["why"]
