"""``vramfit serve``: plan or take a recipe, start the stage workers, serve the API with uvicorn, drain on SIGTERM."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import replace

from ..errors import InputError, RecipeError

# offloads that move weights inside one pipeline call: the stages here are separate units, so they do not apply
PIPELINE_OFFLOADS = ("model", "sequential", "group-block", "group-leaf")
CUDA_CONTEXT_GB = 0.5  # each extra worker process holds its own CUDA context (DESIGN "Serving")


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="serve an OpenAI-compatible images API with a queue, stage workers and a page")
    s.add_argument("--model", default="flux-dev")
    s.add_argument("--weights", default=None, help="hub | random | a local diffusers-format directory")
    s.add_argument("--weights-seed", type=int, default=0)
    s.add_argument("--recipe", default=None, help="the recipe (offload=staged -> stage-batch mode)")
    s.add_argument("--vram", default=None, help="a GPU-memory budget: plan the recipe (and the mode) for it")
    s.add_argument("--gpu", default=None, help="with --vram: plan for this GPU profile instead of probing")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set VRAMFIT_API_KEY)")
    s.add_argument("--max-queue", type=int, default=64, help="requests admitted (queued or running) before 429")
    s.add_argument("--max-batch", type=int, default=4, help="largest denoise micro-batch (1 = no batching)")
    s.add_argument("--idle-unload", type=float, default=0.0,
                   help="free a stage's memory after this many idle seconds (0 = never)")
    s.add_argument("--grace", type=float, default=60.0, help="on SIGTERM: seconds to finish admitted work")
    s.add_argument("--size", default=None, help="the size planned for with --vram (WxH; default: the model's)")
    s.add_argument("--steps", type=int, default=None, help="the steps planned for with --vram")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads per stage worker")
    s.add_argument("--cap-memory", choices=("auto", "off"), default="auto",
                   help="auto: with --vram on CUDA each worker caps its allocator at its share of the budget "
                        "(torch.cuda.set_per_process_memory_fraction)")
    s.add_argument("--test-faults", action="store_true", help="enable POST /v1/_faults (tests and the soak only)")
    s.add_argument("--ray", action="store_true", help="run the stages as Ray Serve deployments (vramfit.serve.ray_app)")
    s.add_argument("--log-level", default="info")
    s.set_defaults(func=cmd_serve)


def check_args(args) -> None:
    if bool(args.recipe is not None) == bool(args.vram):
        raise InputError("give exactly one of --recipe R or --vram BUDGET (e.g. --vram 12GB)")
    for name in ("max_queue", "max_batch"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1")
    if args.idle_unload < 0 or args.grace < 0:
        raise InputError("--idle-unload and --grace must be >= 0")
    if not 0 < args.port < 65536:
        raise InputError(f"--port {args.port}: must be 1..65535")


def serve_plan(args, spec, weights, device):
    """(recipes in order, mode, plan record, memory fractions): the recipe in force first, then fallbacks."""
    from .. import plan
    from ..cli import resolve_recipe
    from ..recipe import Recipe

    if args.recipe is not None:
        recipe = resolve_recipe(args.recipe, weights)
        off = recipe.offload_kind
        if off in PIPELINE_OFFLOADS:
            raise RecipeError(f"offload={recipe.offload} moves weights inside one pipeline call; the server runs "
                              f"encode, denoise and decode as separate units. Alternative: offload=staged (stage "
                              f"batches), offload=stream:K (each stage streams its own blocks), offload=none "
                              f"(pipelined), or --vram to let the planner choose")
        if off == "stream":  # K as written (plain `stream`: 0, every block streamed); --vram plans K itself
            from ..stream import resolve

            recipe = resolve(recipe)
        mode = "stage-batch" if off == "staged" else "pipelined"
        recipes = [recipe]
        if recipe.vae_decode == "none":  # the decode stage's smaller-memory fallback
            recipes.append(recipe.with_(vae_decode="tiling"))
        return recipes, mode, {"source": "--recipe", "recipe": str(recipe)}, {}
    budget = plan.parse_size(args.vram)
    if args.gpu in (None, "local"):
        if device.type != "cuda":
            raise InputError(f"--vram plans for a CUDA GPU; this server's device is {device.type}. Alternative: "
                             f"name a profile with --gpu, or give --recipe")
        prof = plan.local_profile()
    else:
        prof = plan.gpu_profile(args.gpu)
    if budget is None:
        budget = prof.get("vram_free_gb") or prof["vram_gb"]
    from .protocol import parse_size

    h, w = parse_size(args.size, spec)
    shape = plan.Shape(h, w, args.steps or spec.default_steps, 1, spec.max_sequence_length, images=1000)
    # stage-batch reloads the transformer every cycle, so a compile's cold start would be paid per cycle;
    # offload=stream runs pipelined, each stage worker streaming its own blocks, with K for three processes
    cands = []
    for r in plan.candidate_recipes(shape):
        if plan.offload_kind(r) == "stream":
            k = server_stream_k(spec.name, r, shape, budget)
            if k is not None:
                cands.append(replace(r, offload=f"stream:{k}"))
        elif r.offload == "none" or (r.offload == "staged" and str(r.compile) == "off"):
            cands.append(r)
    p = plan.make_plan(spec.name, shape, prof, budget, device_type=device.type, recipes=cands,
                       weights_kind=weights.kind)
    fitting = []
    for row in p["candidates"]:
        if row["status"] not in ("chosen", "fits"):
            continue
        r = Recipe.parse(row["recipe"])
        # pipelined = three worker processes = two more CUDA contexts than the planner's one-process peak
        if r.offload == "none" and row["needs_vram_gb"] + 2 * CUDA_CONTEXT_GB > budget:
            continue
        if plan.offload_kind(r) == "stream" and not pipelined_fits(row["predicted"], budget):
            continue
        fitting.append((r, row))
    if not fitting:
        raise InputError(f"no recipe the server can run fits {budget:.2f} GB on {prof['profile']}"
                         + (f"; the smallest budget that works is {p['min_vram_gb']:.2f} GB" if p["min_vram_gb"]
                            else "") + ". Alternative: a larger --vram")
    chosen, row = fitting[0]
    mode = serve_mode(chosen)
    # fallbacks (DESIGN: on OOM, the next candidate with a smaller predicted peak, then by time -- the plan's
    # order), in the same mode (the same worker layout)
    peak = row["predicted"]["peak_vram_gb"]
    rest = [x for x in fitting[1:] if x[1]["predicted"]["peak_vram_gb"] < peak
            and serve_mode(x[0]) == mode]
    recipes = [chosen] + [r for r, _ in rest[:4]]
    # micro-batches only as large as the planner predicts fit (the batch scales the activation peaks)
    cal = plan.calibration()["budget"]
    extra = 2 * CUDA_CONTEXT_GB if mode == "pipelined" else 0.0
    max_batch, pred = args.max_batch, row["predicted"]
    while max_batch > 1:
        pb = plan.predict(spec.name, chosen, plan.Shape(h, w, shape.steps, max_batch, shape.text_tokens),
                          prof, weights.kind)
        fits = pb["peak_vram_gb"] * (1 + cal["margin"]) + cal["reserve_gb"] + extra <= budget
        if "stage_own_gb" in pb:  # offload=stream: what the three workers hold together, by the fit rule
            fits = pipelined_fits(pb, budget)
        elif fits and mode == "pipelined":
            # three processes each hold their own stage's peak: together they must fit what the caps split
            fits = sum(stage_needs(pb).values()) <= budget - 3 * CUDA_CONTEXT_GB
        if fits:
            pred = pb
            break
        max_batch -= 1
    fractions = {}
    if device.type == "cuda" and args.cap_memory == "auto":
        import torch

        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        fractions = ({"all": min(1.0, budget / total)} if mode == "stage-batch"
                     else stage_fractions(pred, budget, total))
    record = {"source": "--vram", "budget_vram_gb": round(budget, 3), "max_batch": max_batch, "gpu": prof["profile"], "chosen": str(chosen),
              "mode": mode, "predicted": row["predicted"],
              "predicted_at_max_batch": pred if max_batch > 1 else None, "fallbacks": [str(r) for r in recipes[1:]],
              "memory_fraction": fractions, "calibration": p["calibration"]}
    return recipes, mode, record, fractions


def serve_mode(recipe) -> str:
    """stage-batch for offload=staged (one process, the components loaded in turn), else pipelined (three worker
    processes: offload=none, or offload=stream with each stage streaming its own blocks)."""
    return "stage-batch" if recipe.offload == "staged" else "pipelined"


def pipelined_fits(pred: dict, budget_gb: float) -> bool:
    """The three workers' needs together by the fit rule (margin + reserve), beside their three CUDA contexts."""
    from .. import plan

    return plan.fits_gb(sum(stage_needs(pred).values())) + 3 * CUDA_CONTEXT_GB <= budget_gb


def server_stream_k(model: str, recipe, shape, budget_gb: float) -> int | None:
    """The largest K for which offload=stream:K fits ``budget_gb`` as the pipelined server runs it (each stage a
    worker with only its own components: ``plan.memory.stream_server_needs``); None when not even K=0 fits. Not the
    one-process K of ``generate --vram``: the three workers hold their peaks at the same time."""
    from .. import plan

    for k in range(plan.stream_blocks(model), -1, -1):
        needs = plan.memory.stream_server_needs(model, recipe, shape, k)
        if plan.fits_gb(sum(needs.values())) + 3 * CUDA_CONTEXT_GB <= budget_gb:
            return k
    return None


def stage_needs(pred: dict) -> dict:
    """What each pipelined stage worker needs on the GPU (GB): its weights plus its activations above all weights,
    from ``plan.predict`` at the batch the server will take; under offload=stream, the worker's own resident part,
    slots and activations (``stage_own_gb``)."""
    if "stage_own_gb" in pred:
        return dict(pred["stage_own_gb"])
    wsum = sum(pred["weights_gb"].values())
    comps = {"encode": ("text_encoder", "text_encoder_2"), "denoise": ("transformer",), "decode": ("vae",)}
    return {s: sum(pred["weights_gb"][c] for c in cs) + max(0.0, pred["stage_peak_gb"][s] - wsum)
            for s, cs in comps.items()}


def stage_fractions(pred: dict, budget_gb: float, total_gb: float) -> dict:
    """Each pipelined stage worker's ``set_per_process_memory_fraction``: the budget less three CUDA contexts, split
    in proportion to ``stage_needs`` at the batch the server will take. On the H200 (--vram 12GB, 2026-12-02) the
    split followed the batch-1 prediction while the server batched 2, whose needs together exceed the budget:
    every batch of 2 ran out of memory in denoise (now the batch is 1 there: ``serve_plan``)."""
    need = stage_needs(pred)
    usable = budget_gb - 3 * CUDA_CONTEXT_GB
    return {s: min(1.0, usable * need[s] / sum(need.values()) / total_gb) for s in need}


def cmd_serve(args) -> int:
    check_args(args)
    if args.ray:
        try:
            from . import ray_app
        except ImportError as e:
            raise InputError(f"--ray needs vramfit.serve.ray_app and Ray ({e}). Alternative: pip install "
                             f"'vramfit[ray]', or serve without --ray") from None
        return ray_app.run(args)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise InputError(f"vramfit serve needs the serve extra ({e.name}). Alternative: pip install "
                         f"'vramfit[serve]'") from None
    from .. import measure, models
    from .app import create_app
    from .engine import Engine

    api_key = args.api_key or os.environ.get("VRAMFIT_API_KEY") or None
    spec = models.get_model(args.model)
    weights = models.resolve_weights(spec, args.weights, seed=args.weights_seed)
    device = measure.resolve_device(args.device)
    recipes, mode, plan_rec, fractions = serve_plan(args, spec, weights, device)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log = logging.getLogger("vramfit.serve")
    log.info("vramfit serve: %s | weights %s | %s | mode %s | recipe %s%s", spec.name, weights.kind, device, mode,
             recipes[0], f" | fallbacks {len(recipes) - 1}" if len(recipes) > 1 else "")
    max_batch = plan_rec.get("max_batch", args.max_batch)
    if max_batch < args.max_batch:
        log.info("--max-batch %d: the planner predicts batches of at most %d fit", args.max_batch, max_batch)
    engine = Engine(spec, weights, recipes, str(device), mode, max_queue=args.max_queue, max_batch=max_batch,
                    idle_unload=args.idle_unload, test_faults=args.test_faults, plan=plan_rec,
                    memory_fraction=fractions, threads=args.threads)
    t0 = time.perf_counter()
    import signal

    def stop_starting(sig, frame):  # SIGTERM before uvicorn takes over the signals: stop the workers, exit 0
        raise SystemExit(0)

    previous = signal.signal(signal.SIGTERM, stop_starting)
    try:
        engine.start()
    except SystemExit:
        log.info("stopped while starting")
        engine.shutdown()
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    log.info("stage workers up in %.1f s", time.perf_counter() - t0)
    app = create_app(engine, api_key=api_key, test_faults=args.test_faults)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5)
    server = draining_server(config, engine, args.grace, app)
    try:
        server.run()
    finally:
        engine.shutdown()
    log.info("stopped")
    return 0


def draining_server(config, engine, grace: float, app):
    """uvicorn's server with a drain first: on SIGTERM/SIGINT the API answers 503 to new work while admitted jobs
    finish (up to ``grace`` s); then the jobs still open end with 503 and uvicorn shuts down. A second signal
    stops at once. (Defined here so that importing this module does not import uvicorn.)"""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def __init__(self, config, engine, grace: float, app):
            super().__init__(config)
            self.engine, self.grace, self.app = engine, grace, app
            self._draining = False

        def handle_exit(self, sig, frame) -> None:
            if self._draining:
                return super().handle_exit(sig, frame)
            self._draining = True
            logging.getLogger("vramfit.serve").info("signal %s: draining (grace %.0f s)", sig, self.grace)
            threading.Thread(target=self._drain, daemon=True).start()

        def _drain(self) -> None:
            from .engine import StageFailed

            deadline = time.monotonic() + self.grace
            finished = self.engine.drain(self.grace)
            if not finished:
                for job in list(self.engine.jobs.values()):
                    if not job.finished:
                        job.fail(StageFailed("the server stopped before this request ran (shutdown grace period "
                                             "over); retry on the restarted server", 503, "draining", retry_after=5))
                        self.engine._finish(job)
            # let the handlers of the finished jobs write their responses (each polls every 20 ms)
            while self.app.state.inflight > 0 and time.monotonic() < deadline + 5:
                time.sleep(0.05)
            self.should_exit = True

    return DrainingServer(config, engine, grace, app)
