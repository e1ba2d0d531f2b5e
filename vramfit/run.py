"""The staged runner: encode prompt -> denoise -> decode, at diffusers' own seams, measured per stage.

The three stages use FluxPipeline's own pieces (``encode_prompt``; ``__call__`` with ``prompt_embeds`` and
``output_type="latent"``; the same unpack/scale/``vae.decode``/postprocess as ``__call__``), so for the same
seed the image is bit-identical to ``FluxPipeline.__call__`` and across offload strategies. The initial noise
comes from a CPU generator, as in diffusers' examples, so it does not depend on where the model runs.

``offload=staged`` builds each stage's components only for that stage, and drops them (gc + cache release)
before the next: text encoders, transformer and VAE are never in memory together.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass

import torch

from . import apply, compile_cache, measure, models, runtime
from .errors import InputError
from .models import ModelSpec, Weights
from .recipe import Recipe

STAGE_COMPONENTS = {
    "encode": ("text_encoder", "text_encoder_2"),
    "denoise": ("transformer",),
    "decode": ("vae",),
}


@dataclass
class Request:
    prompt: str
    steps: int
    height: int
    width: int
    guidance: float
    seed: int = 0
    max_sequence_length: int = 512
    allow_large: bool = False  # --allow-large: a size above the model's maximum runs, with a warning

    def validate(self, spec: ModelSpec | None = None) -> list[str]:
        """Refuse a request that cannot run (before any heavy work); returns warnings (e.g. --allow-large).
        With ``spec`` the model's own limits apply too (largest size, T5 tokens)."""
        from .validate import GUIDANCE_MAX, SEED_MAX, STEPS_MAX, check_number, check_size

        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InputError("the prompt is empty; give a text prompt")
        warnings = check_size(spec, self.height, self.width, self.allow_large)
        check_number("--steps", self.steps, 1, STEPS_MAX, integer=True)
        check_number("--guidance", self.guidance, 0.0, GUIDANCE_MAX)
        check_number("--seed", self.seed, 0, SEED_MAX, integer=True)
        check_number("max_sequence_length", self.max_sequence_length, 1,
                     spec.max_sequence_length if spec is not None else 512, integer=True)
        return warnings


@dataclass
class Result:
    image: "object"  # PIL.Image
    latents: torch.Tensor  # final denoised latents (packed), float32 on CPU
    record: dict


def request_for(spec: ModelSpec, prompt: str, steps=None, height=None, width=None, guidance=None, seed=0,
                allow_large: bool = False) -> Request:
    return Request(
        prompt=prompt,
        steps=spec.default_steps if steps is None else steps,
        height=spec.default_size if height is None else height,
        width=spec.default_size if width is None else width,
        guidance=spec.default_guidance if guidance is None else guidance,
        seed=seed,
        max_sequence_length=spec.max_sequence_length,
        allow_large=allow_large,
    )


class Runner:
    """Holds a loaded pipeline (or, for ``offload=staged``, the recipe to load one stage at a time)."""

    def __init__(self, spec: ModelSpec, weights: Weights, recipe: Recipe, device: torch.device,
                 gguf_file: str | None = None, progress: bool = True, on_event=None):
        """``on_event(name, **info)``, if given, hears each phase as it starts or ends (load, stages, every denoising
        step): the bench prints them, so a scenario killed by its time limit shows where it was."""
        self.spec, self.weights, self.recipe, self.device = spec, weights, recipe, device
        self.on_event = on_event or (lambda name, **info: None)
        self.gguf_file = gguf_file
        self.progress = progress
        self.dynamo = apply.check(recipe, device, spec)  # refusals happen here, before any heavy work
        self.compile_cache = compile_cache.for_runner(self)  # None without compile
        # import the model classes now so that load time is loading, not Python imports (~8 s of a cold start)
        t0 = time.perf_counter()
        for c in models.COMPONENTS:
            models.component_class(c)
        from diffusers import FluxPipeline  # noqa: F401

        self.import_s = round(time.perf_counter() - t0, 3)
        self.manifest = apply.Manifest()
        self.memory = measure.Memory(device)
        self.pipe = None
        self.load_record: dict = {}
        self.weight_bytes: dict[str, int] = {}
        self.runs = 0

    @property
    def staged(self) -> bool:
        return self.recipe.offload == "staged"

    # ------------------------------------------------------------------ loading
    def load(self) -> dict:
        apply.apply_dynamo_settings(self.dynamo, self.manifest)
        self.on_event("load")
        self.memory.reset_peak()
        t0 = time.perf_counter()
        if self.staged:
            # tokenizers and scheduler only; components are built inside each stage
            self.pipe = apply.assemble(self.spec, self.weights, {})
            self.manifest.add("offload", strategy="staged", verified=True,
                              api="per stage: build components -> run -> del + gc.collect() + empty_cache()")
        else:
            self.pipe = apply.build_pipeline(self.spec, self.weights, self.recipe, self.device, self.manifest,
                                             self.gguf_file)
            self.weight_bytes = {c: apply.weight_bytes(getattr(self.pipe, c)) for c in models.COMPONENTS}
        measure.sync(self.device)
        self.pipe.set_progress_bar_config(disable=not self.progress, desc="denoise", leave=False)
        released = measure.release_host_heap()  # what loading freed (unquantized weights, staging copies) leaves RSS
        after = self.memory.now()
        if released is not None:
            after["heap_released_gb"] = released
        self.load_record = {"s": round(time.perf_counter() - t0, 4), "after_load": after, "peak": self.memory.peak()}
        self.on_event("loaded", s=self.load_record["s"])
        return self.load_record

    def _load_stage(self, stage: str, rec: dict) -> dict:
        t0 = time.perf_counter()
        comps = {}
        self.on_event("load-stage", stage=stage)
        for c in STAGE_COMPONENTS[stage]:
            comps[c] = apply.load_component(self.spec, self.weights, self.recipe, c, self.device, self.manifest,
                                            self.gguf_file)
            self.weight_bytes[c] = apply.weight_bytes(comps[c])
        self.pipe.register_modules(**comps)
        apply.apply_runtime_options(self.pipe, self.recipe, self.manifest, components=comps)
        measure.sync(self.device)
        rec["load_s"] = round(time.perf_counter() - t0, 4)
        rec["after_load"] = self.memory.now()
        return comps

    def _free_stage(self, stage: str) -> None:
        self.pipe.register_modules(**{c: None for c in STAGE_COMPONENTS[stage]})
        measure.free_memory(self.device)

    def _release_stream(self, component: str) -> None:
        """offload=stream: the component's slot buffers are freed once its stage is over (re-allocated at its next
        first block), so the later stages have that memory (the VAE decode under a 3 GB cap)."""
        if self.recipe.offload_kind == "stream":
            from . import stream

            stream.release(self.pipe, component)

    # ------------------------------------------------------------------ generation
    def generate(self, req: Request) -> Result:
        req.validate(self.spec)
        if self.pipe is None:
            self.load()
        pipe, dev = self.pipe, self.device
        stages: dict[str, dict] = {}
        step_times: list[float] = []
        exec_device = dev if self.staged else pipe._execution_device

        self.on_event("encode", run=self.runs + 1, seed=req.seed)
        with measure.stage(dev, self.memory, stages, "encode") as rec:
            if self.staged:
                self._load_stage("encode", rec)
            prompt_embeds, pooled, _ = pipe.encode_prompt(
                prompt=req.prompt, prompt_2=None, device=exec_device, num_images_per_prompt=1,
                max_sequence_length=req.max_sequence_length,
            )
        if self.staged:
            self._free_stage("encode")
        self._release_stream("text_encoder_2")

        def on_step(_pipe, i, t, kwargs):
            measure.sync(dev)
            step_times.append(time.perf_counter())
            self.on_event("step", i=i + 1, of=req.steps)
            return {}

        with measure.stage(dev, self.memory, stages, "denoise") as rec:
            if self.staged:
                self._load_stage("denoise", rec)
            t_start = time.perf_counter()
            self.on_event("denoise", steps=req.steps, compile=self.recipe.compile)
            runtime.before_call(pipe, self.recipe, req.steps, self.manifest)
            if self.compile_cache is not None:  # before the first compiled call of this shape
                self.compile_cache.before(req, self.manifest)
            latents = pipe(
                prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled,
                num_inference_steps=req.steps, guidance_scale=req.guidance,
                height=req.height, width=req.width, max_sequence_length=req.max_sequence_length,
                generator=torch.Generator("cpu").manual_seed(req.seed),
                output_type="latent", return_dict=False, callback_on_step_end=on_step,
            )[0]
        del prompt_embeds, pooled
        if not self.runs:  # what only a generation can show: graphs compiled, scheduler began at 0, steps cached
            runtime.verify_after_run(pipe, self.recipe, req.steps, self.manifest)
        if self.staged:
            self._free_stage("denoise")
        self._release_stream("transformer")

        self.on_event("decode")
        with measure.stage(dev, self.memory, stages, "decode") as rec:
            if self.staged:
                self._load_stage("decode", rec)
            image = self._decode(latents, req)
        if self.staged:
            self._free_stage("decode")
        elif self.recipe.offload == "model":
            pipe.maybe_free_model_hooks()

        if self.compile_cache is not None:  # a miss: keep what this run compiled for the next process
            self.compile_cache.after(req, self.manifest)
        self.runs += 1
        self.on_event("done", run=self.runs)
        lat = latents.detach().float().cpu()
        return Result(image=image, latents=lat, record=self._record(req, stages, step_times, t_start, lat))

    def _decode(self, latents, req: Request):
        """Exactly FluxPipeline.__call__'s decode, so the image matches it bit for bit."""
        from diffusers.utils.torch_utils import get_module_execution_device

        pipe = self.pipe
        latents = pipe._unpack_latents(latents, req.height, req.width, pipe.vae_scale_factor)
        latents = (latents / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
        latents = latents.to(get_module_execution_device(pipe.vae))
        image = pipe.vae.decode(latents, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pil")[0]

    # ------------------------------------------------------------------ the record
    def _record(self, req, stages, step_times, t_start, latents) -> dict:
        per_step = [b - a for a, b in zip([t_start] + step_times[:-1], step_times)]
        steady = sorted(per_step[1:]) if len(per_step) > 1 else per_step
        median = steady[len(steady) // 2] if steady else None
        # a staged run builds each stage's components inside the stage: that is load time, not stage time
        compute = {k: round(s["s"] - s.get("load_s", 0.0), 4) for k, s in stages.items()}
        timings = {
            "import_s": self.import_s,
            "load_s": round(self.load_record["s"] + sum(s.get("load_s", 0.0) for s in stages.values()), 4),
            "encode_s": compute["encode"], "denoise_s": compute["denoise"], "decode_s": compute["decode"],
            "s_per_step": round(compute["denoise"] / req.steps, 4),
            "s_per_step_median": round(median, 4) if median is not None else None,
            "first_step_s": round(per_step[0], 4) if per_step else None,
            "step_s": [round(x, 4) for x in per_step],
        }
        timings["total_s"] = round(timings["encode_s"] + timings["denoise_s"] + timings["decode_s"], 4)
        if self.recipe.compile != "off" and self.runs == 1 and median is not None:
            # the first compiled step includes tracing + codegen; later steps are warm
            timings["compile_s"] = round(per_step[0] - median, 4)
        if self.recipe.compile != "off":
            from torch._dynamo.utils import counters

            # inductor's rewrites of int8 weight-only matmuls into _weight_int8pack_mm (see quant.WOQ_INT8_REWRITE_OFF)
            timings["inductor_woq_rewrites"] = counters["inductor"].get("woq_matcher_count", 0)
        peaks = [s for s in stages.values()] + [self.load_record.get("peak", {})]
        memory = {
            "after_load": self.load_record["after_load"],
            "peak_allocated_gb": max((p.get("peak_allocated_gb", 0.0) for p in peaks), default=0.0),
            "peak_reserved_gb": max((p.get("peak_reserved_gb", 0.0) for p in peaks), default=0.0),
            "generate_peak_allocated_gb": max((s.get("peak_allocated_gb", 0.0) for s in stages.values()), default=0.0),
            "generate_peak_reserved_gb": max((s.get("peak_reserved_gb", 0.0) for s in stages.values()), default=0.0),
            "host_peak_rss_gb": measure.host_rss_gb().get("peak_rss_gb"),
        }
        if self.staged:  # "after load" of a staged run: the largest stage's resident set
            memory["after_load"] = max((s["after_load"] for s in stages.values()),
                                       key=lambda m: m.get("allocated_gb", 0.0))
        return {
            "schema": "vramfit.run/1",
            "model": self.spec.name,
            "weights": self.weights.describe(),
            "recipe": str(self.recipe),
            "request": asdict(req),
            "device": measure.device_info(self.device),
            "versions": measure.versions(),
            "manifest": self.manifest.steps,
            "weight_bytes": dict(self.weight_bytes),
            "weight_gb_total": round(sum(self.weight_bytes.values()) / measure.GB, 3),
            "timings": timings,
            "memory": memory,
            "stages": stages,
            "latents": {"shape": list(latents.shape), "finite": bool(torch.isfinite(latents).all()),
                        "sha256": hashlib.sha256(latents.numpy().tobytes()).hexdigest()[:16]},
            "run_index": self.runs,
        }

    def close(self) -> None:
        self.pipe = None
        measure.free_memory(self.device)
