"""The pipeline as three units -- encode (CLIP + T5), denoise (transformer), decode (VAE) -- and the worker
process that hosts them.

Each stage has ``load()``, ``unload()``, ``run(batch)``, ``resident``, its slice of the recipe and its measured
memory. They call FluxPipeline's own seams exactly as ``vramfit.run.Runner.generate`` does (``encode_prompt``;
``__call__`` with ``prompt_embeds`` and ``output_type="latent"`` and a CPU generator per image; Runner's
decode), so a served image is bit-identical to ``vramfit generate`` with the same model, weights, recipe,
prompt, size, steps, guidance and seed. Every stage owns its own pipeline object, tokenizers and a fresh
scheduler per batch: diffusers' pipelines are not thread-safe (diffusers #3672, #5749, #9362), and one worker
runs one batch at a time.

``worker_main`` is the body of a stage worker process (multiprocessing "spawn": a CUDA error poisons only that
process's context; the engine restarts it). Tensors travel between stages through CPU memory.
"""

from __future__ import annotations

import gc
import os
import time
import traceback

import torch

STAGE_COMPONENTS = {"encode": ("text_encoder", "text_encoder_2"), "denoise": ("transformer",), "decode": ("vae",)}
STAGES = tuple(STAGE_COMPONENTS)


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


class Stage:
    name = ""

    def __init__(self, spec, weights, recipe, device: torch.device, gguf_file: str | None = None):
        from .. import apply, measure

        self.spec, self.weights, self.recipe, self.device, self.gguf_file = spec, weights, recipe, device, gguf_file
        self.components = STAGE_COMPONENTS[self.name]
        apply.check(recipe, device, spec)  # refusals before any heavy work
        self.memory = measure.Memory(device)
        self.manifest = apply.Manifest()
        self.pipe = None
        self.weight_bytes: dict[str, int] = {}
        self.loads = 0
        self.last_load_s: float | None = None
        self.measured: dict = {}

    # ---- what the stage is
    @property
    def resident(self) -> bool:
        return self.pipe is not None

    @property
    def recipe_slice(self) -> dict:
        s = {c: getattr(self.recipe, c) for c in self.components}
        if self.name == "decode":
            s["vae_decode"] = self.recipe.vae_decode
        if self.name == "denoise":
            s.update(attention=self.recipe.attention, compile=str(self.recipe.compile))
        if self.recipe.offload_kind == "stream" and self.name in ("encode", "denoise"):
            s["offload"] = self.recipe.offload  # stream:K (T5 always streams all its blocks)
        return s

    def info(self) -> dict:
        return {"resident": self.resident, "recipe": self.recipe_slice, "loads": self.loads,
                "last_load_s": self.last_load_s, "weight_bytes": dict(self.weight_bytes), "memory": self.measured}

    # ---- life cycle
    def load(self) -> float:
        """Build this stage's components on the device (one loader: ``apply.load_component``); seconds taken."""
        from .. import apply, measure

        if self.pipe is not None:
            return 0.0
        t0 = time.perf_counter()
        self.memory.reset_peak()
        comps = {c: apply.load_component(self.spec, self.weights, self.recipe, c, self.device, self.manifest,
                                         self.gguf_file) for c in self.components}
        self.weight_bytes = {c: apply.weight_bytes(m) for c, m in comps.items()}
        pipe = apply.assemble(self.spec, self.weights, comps)
        if self.recipe.offload_kind == "stream":
            # the executor on this stage's own streamed component (T5 in encode, the transformer in denoise), the
            # same call a generate run makes; its ring stays allocated between batches (one stage per worker)
            from .. import stream

            stream.apply_stream(pipe, self.recipe, self.device, self.manifest)
        apply.apply_runtime_options(pipe, self.recipe, self.manifest, components=comps)
        pipe.set_progress_bar_config(disable=True)
        measure.sync(self.device)
        self.pipe = pipe
        self.loads += 1
        self.last_load_s = round(time.perf_counter() - t0, 4)
        self.measured = {"after_load": self.memory.now(), "load_peak": self.memory.peak()}
        return self.last_load_s

    def unload(self) -> None:
        from .. import measure

        self.pipe = None
        measure.free_memory(self.device)
        self.measured = {**self.measured, "after_unload": self.memory.now()}

    def run(self, batch: list[dict], emit=lambda kind, **kw: None) -> list:
        if self.pipe is None:
            self.load()
        from .. import measure

        self.memory.reset_peak()
        try:
            return self._run(batch, emit)
        finally:
            measure.sync(self.device)
            self.measured = {**self.measured, "run_peak": self.memory.peak(), "batch": len(batch)}

    def _run(self, batch, emit):
        raise NotImplementedError


class EncodeStage(Stage):
    """item: {prompt, max_sequence_length} -> {prompt_embeds, pooled_prompt_embeds} (CPU tensors)."""

    name = "encode"

    def _run(self, batch, emit):
        out = []
        for item in batch:
            pe, pooled, _ = self.pipe.encode_prompt(
                prompt=item["prompt"], prompt_2=None, device=self.device, num_images_per_prompt=1,
                max_sequence_length=item["max_sequence_length"])
            out.append({"prompt_embeds": pe.cpu(), "pooled_prompt_embeds": pooled.cpu()})
        return out


class DenoiseStage(Stage):
    """items with the same (height, width, steps, guidance, max_sequence_length) -> packed latents, one per item.

    A batch is one ``pipe(...)`` call with the items' embeddings stacked and one CPU generator per item
    (diffusers' ``randn_tensor`` draws each row from its own generator), so each item keeps its own noise.
    ``item["previews"]``: the steps after which its current latents are emitted for a partial image."""

    name = "denoise"

    def _run(self, batch, emit):
        first = batch[0]
        key = denoise_key(first)
        if any(denoise_key(it) != key for it in batch):
            raise ValueError("a denoise batch must share height, width, steps, guidance and sequence length")
        pipe = self.pipe
        # a fresh scheduler per batch: a shared one corrupts its step index across calls (diffusers #3672)
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        dev = self.device
        pe = torch.cat([it["prompt_embeds"] for it in batch]).to(dev)
        pooled = torch.cat([it["pooled_prompt_embeds"] for it in batch]).to(dev)
        gens = [torch.Generator("cpu").manual_seed(it["seed"]) for it in batch]
        n = first["steps"]

        def on_step(_pipe, i, t, kwargs):
            emit("step", i=i + 1, n=n)
            lat = kwargs.get("latents")
            for j, it in enumerate(batch):
                if i + 1 in it.get("previews", ()):
                    emit("latents", item=j, i=i + 1, latents=lat[j:j + 1].detach().cpu())
            return {}

        latents = pipe(
            prompt_embeds=pe, pooled_prompt_embeds=pooled, num_inference_steps=n,
            guidance_scale=first["guidance"], height=first["height"], width=first["width"],
            max_sequence_length=first["max_sequence_length"],
            generator=gens[0] if len(gens) == 1 else gens,
            output_type="latent", return_dict=False, callback_on_step_end=on_step,
        )[0]
        return [{"latents": latents[j:j + 1].detach().cpu()} for j in range(len(batch))]


def denoise_key(item: dict) -> tuple:
    return (item["height"], item["width"], item["steps"], float(item["guidance"]), item["max_sequence_length"])


class DecodeStage(Stage):
    """item: {latents, height, width} -> {image: PIL.Image}; exactly Runner._decode, one item at a time (a batched
    VAE decode is not needed for throughput here and would change the sums)."""

    name = "decode"

    def _run(self, batch, emit):
        from diffusers.utils.torch_utils import get_module_execution_device

        pipe = self.pipe
        out = []
        for item in batch:
            # Runner unpacks on the transformer's device; the VAE's device is the same here (one device)
            lat = item["latents"].to(get_module_execution_device(pipe.vae))
            lat = pipe._unpack_latents(lat, item["height"], item["width"], pipe.vae_scale_factor)
            lat = (lat / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
            image = pipe.vae.decode(lat, return_dict=False)[0]
            out.append({"image": pipe.image_processor.postprocess(image, output_type="pil")[0]})
        return out


STAGE_CLASSES = {"encode": EncodeStage, "denoise": DenoiseStage, "decode": DecodeStage}


# ----------------------------------------------------------------------------------------------------------
# the worker process


def inject(fault: dict | None, stage: str) -> None:
    """Test-only faults, armed by the engine only when the server runs with --test-faults."""
    if not fault:
        return
    kind = fault["kind"]
    if kind == "delay":
        time.sleep(float(fault.get("seconds", 1.0)))
    elif kind == "raise":
        raise RuntimeError(f"injected fault in stage {stage}")
    elif kind == "oom":
        raise torch.OutOfMemoryError(f"CUDA out of memory (injected fault in stage {stage})")
    elif kind == "kill":
        os._exit(17)  # the process dies mid-batch, as a segfault or the OOM killer would end it


def worker_main(conn, cfg: dict) -> None:
    """Serve ``(op, id, payload)`` messages from the engine until "stop". Replies: ("ok", id, result, info),
    ("error", id, {type, message, oom}), and ("event", id, kind, data) while a batch runs."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    if device.type == "cuda" and cfg.get("memory_fraction"):
        from .. import measure

        measure.cap_memory(cfg["memory_fraction"], device)
    stages: dict[str, Stage] = {}
    try:
        # import the model classes before "ready" so that a (re)load is loading, not Python imports
        from diffusers import FluxPipeline  # noqa: F401

        from .. import models

        for name in cfg["stages"]:
            for c in STAGE_COMPONENTS[name]:
                models.component_class(c)
        for name in cfg["stages"]:
            stages[name] = STAGE_CLASSES[name](cfg["spec"], cfg["weights"], cfg["recipes"][name], device,
                                               cfg.get("gguf_file"))
        conn.send(("ready", os.getpid(), {n: s.info() for n, s in stages.items()}))
    except Exception as e:  # noqa: BLE001 -- reported to the engine, which refuses to start
        conn.send(("fatal", os.getpid(), f"{type(e).__name__}: {e}"))
        return
    while True:
        try:
            op, mid, payload = conn.recv()
        except (EOFError, OSError):
            return
        if op == "stop":
            conn.send(("ok", mid, None, {}))
            return
        stage = stages.get(payload.get("stage")) if isinstance(payload, dict) else None
        try:
            info: dict = {}
            result = None
            if op == "load":
                info["load_s"] = stage.load()
            elif op == "unload":
                was = stage.resident
                stage.unload()
                info["unloaded"] = was
            elif op == "recipe":  # fall back to another recipe for this stage's components
                stage.unload()
                stages[stage.name] = stage = STAGE_CLASSES[stage.name](
                    cfg["spec"], cfg["weights"], payload["recipe"], device, cfg.get("gguf_file"))
            elif op == "run":
                reload = not stage.resident
                t0 = time.perf_counter()
                if reload:
                    stage.load()
                    info["load_s"] = stage.last_load_s
                inject(payload.get("fault"), stage.name)

                def emit(kind, **data):
                    conn.send(("event", mid, kind, data))

                t1 = time.perf_counter()
                result = stage.run(payload["items"], emit)
                info["run_s"] = round(time.perf_counter() - t1, 4)
                info["total_s"] = round(time.perf_counter() - t0, 4)
            info["stage"] = stage.info() if stage is not None else None
            conn.send(("ok", mid, result, info))
        except Exception as e:  # noqa: BLE001 -- every failure goes back to the engine as data
            oom = is_oom(e)
            if oom and stage is not None:
                # free what the failed batch held before anything else runs here (DESIGN: after CUDA OOM)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            conn.send(("error", mid, {"type": type(e).__name__, "message": str(e).splitlines()[0][:300] if str(e)
                                      else type(e).__name__, "oom": oom,
                                      "where": traceback.format_exc(limit=3).splitlines()[-3:]}))
