"""The scale-out host: the same three stage classes (``stages.py``) as Ray Serve deployments.

Graph: ``Ingress`` (FastAPI via ``@serve.ingress``; the routes and wire format of ``app.py``, from ``protocol.py``)
holds a ``DeploymentHandle`` to each stage deployment: ``encode`` -> ``denoise`` -> ``decode``. Each stage
deployment hosts one Stage object per replica, loaded when the replica starts, so a replica is the unit that
scales: ``autoscaling_config`` has ``min_replicas: 0`` -- an idle stage's replica is stopped, which frees its GPU
memory, and the next request starts one again (scale to zero) -- and ``max_queued_requests`` bounds the queue in
front of each stage (the ingress answers 429 + Retry-After when Ray refuses a request for back-pressure).
``denoise`` micro-batches with ``@serve.batch``: requests with the same (size, steps, guidance) run as one
``DenoiseStage.run`` call, each with its own seed and noise; mixed keys in one Ray batch run as separate calls.

Ray does not isolate GPU memory between fractional replicas, so each stage's ``num_gpus`` is sized from the
planner's predicted peak of that stage (``plan.predict``'s ``stage_peak_gb``, plus the planner's margin and
reserve), and each replica caps itself to that fraction with ``torch.cuda.set_per_process_memory_fraction``.
``check_health`` fails a replica after a CUDA error that is not out-of-memory (PyTorch does not promise a usable
context after one), so Ray replaces it. Out of memory in denoise splits the batch and retries the halves; what
still does not fit ends with 503.

Differences from the embedded host, said here once: no ``--test-faults`` route, no per-stage recipe fallback,
no ``/metrics`` (Ray exports its own Prometheus metrics), jobs live in the ingress replica (one replica), and
``--idle-unload 0`` means "Ray's default delay of 300 s" rather than "never", because a stage that never
scales down is not what this host is for. SIGTERM has no drain here: Ray's own signal handler in the driver
catches it first and ends the process (the local Ray processes go with it; checked on CPU: none left behind).
"""

# no `from __future__ import annotations`: FastAPI must see `request: Request` as a type through
# serve.ingress's method wrapping, not as a string it cannot resolve (it then asks for a body field "request")
import asyncio
import base64
import io
import json
import math
import os
import signal
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from sse_starlette.sse import EventSourceResponse

from .protocol import BadParam, ImageRequest, error_body, to_requests
from .stages import STAGE_CLASSES, STAGES, denoise_key, is_oom

STATIC = Path(__file__).resolve().parent / "static"
MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
KEEP_IMAGES, KEEP_S = 100, 3600  # `url` images: the last 100, for an hour (DESIGN "Serve details")
DEFAULT_IDLE_S = 300.0


# ----------------------------------------------------------------------------------------------------------
# stage deployments


def _error(e: BaseException) -> dict:
    msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
    return {"type": type(e).__name__, "message": msg, "oom": is_oom(e)}


class _StageHost:
    """One Stage object per replica. Each replica runs one call at a time (``max_ongoing_requests`` 1 for encode
    and decode, ``max_concurrent_batches`` 1 for denoise): diffusers' pipelines are not thread-safe."""

    stage_name = ""

    def __init__(self, cfg: dict):
        # torch's thread count as in the process that planned it: CPU sums in another order would change images
        if cfg.get("threads"):
            torch.set_num_threads(cfg["threads"])
        device = torch.device(cfg["device"])
        if device.type == "cuda" and cfg.get("num_gpus"):
            from .. import measure

            measure.cap_memory(cfg["num_gpus"], device)
        self.stage = STAGE_CLASSES[self.stage_name](cfg["spec"], cfg["weights"], cfg["recipe"], device,
                                                    cfg.get("gguf_file"))
        self.started = time.time()
        self.stage.load()  # the replica is the unit of residency: it holds its weights from start to stop
        self.poisoned: str | None = None

    def check_health(self) -> None:
        if self.poisoned:
            raise RuntimeError(f"{self.stage_name}: CUDA context unusable after: {self.poisoned}")

    def _run(self, items: list[dict], emit=lambda kind, **kw: None) -> list:
        try:
            return self.stage.run(items, emit)
        except Exception as e:
            if not is_oom(e) and "CUDA" in str(e):
                self.poisoned = _error(e)["message"]
            raise

    def _call(self, items: list[dict]) -> dict:
        t0 = time.perf_counter()
        try:
            out = self._run(items)
        except Exception as e:  # noqa: BLE001 -- a failure goes back to the ingress as data
            return {"error": _error(e)}
        return {"ok": out, "info": self.info(), "run_s": round(time.perf_counter() - t0, 4)}

    def info(self) -> dict:
        return {**self.stage.info(), "replica_started": self.started, "pid": os.getpid()}


@serve.deployment(name="encode", max_ongoing_requests=1)
class EncodeDeployment(_StageHost):
    stage_name = "encode"

    async def __call__(self, item: dict) -> dict:
        return await asyncio.to_thread(self._call, [item])


@serve.deployment(name="decode", max_ongoing_requests=1)
class DecodeDeployment(_StageHost):
    stage_name = "decode"

    async def __call__(self, item: dict) -> dict:
        return await asyncio.to_thread(self._call, [item])


@serve.deployment(name="denoise")
class DenoiseDeployment(_StageHost):
    stage_name = "denoise"

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.max_batch = max(1, int(cfg.get("max_batch", 1)))
        self.sized = False

    async def run(self, item: dict):
        """One request's events (steps, preview latents, then its result), from inside a micro-batch."""
        if not self.sized:  # the batch queue is made on first use, inside the replica's request context
            self.denoise.set_max_batch_size(self.max_batch)
            self.sized = True
        async for ev in self.denoise(item):
            yield ev

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05, max_concurrent_batches=1)
    async def denoise(self, items: list[dict]):
        """A streaming batch handler: every ``yield`` is one entry per request of the Ray batch -- an event dict,
        None (nothing for that request now) or StopIteration (that request is finished)."""
        groups: "OrderedDict[tuple, list[int]]" = OrderedDict()
        for j, it in enumerate(items):
            groups.setdefault(denoise_key(it), []).append(j)
        finished: set[int] = set()
        for idx in groups.values():
            async for per in self._run_group([items[j] for j in idx]):
                yield [StopIteration if j in finished else per.get(idx.index(j)) if j in idx else None
                       for j in range(len(items))]
            finished.update(idx)
        yield [StopIteration] * len(items)

    async def _run_group(self, batch: list[dict]):
        """Run one key group in a thread; its emits arrive here as {position in group: event}."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def put(x):
            loop.call_soon_threadsafe(q.put_nowait, x)

        def emit(kind, **data):
            if kind == "step":
                put({k: {"type": "step", "i": data["i"], "n": data["n"]} for k in range(len(batch))})
            elif kind == "latents":
                put({data["item"]: {"type": "latents", "i": data["i"], "latents": data["latents"]}})

        def work():
            t0 = time.perf_counter()
            try:
                out = self._split_on_oom(batch, emit)
                info = self.info()
                put({k: {"type": "result", "latents": o["latents"], "info": info,
                         "run_s": round(time.perf_counter() - t0, 4), "batch": len(batch)} for k, o in enumerate(out)})
            except Exception as e:  # noqa: BLE001
                put({k: {"type": "error", "error": _error(e)} for k in range(len(batch))})
            put(None)

        thread = threading.Thread(target=work, name="denoise-batch", daemon=True)
        thread.start()
        while (per := await q.get()) is not None:
            yield per

    def _split_on_oom(self, batch: list[dict], emit) -> list:
        """Out of memory with more than one item: free, then run the halves (each keeps its own seed)."""
        try:
            return self._run(batch, emit)
        except Exception as e:
            if not is_oom(e) or len(batch) == 1:
                raise
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        h = len(batch) // 2

        def shifted(off):
            return lambda kind, **d: emit(kind, **({**d, "item": d["item"] + off} if "item" in d else d))

        return self._split_on_oom(batch[:h], shifted(0)) + self._split_on_oom(batch[h:], shifted(h))


# ----------------------------------------------------------------------------------------------------------
# jobs (kept in the ingress replica)


class Job:
    def __init__(self, body: ImageRequest, reqs: list, warnings: list[str]):
        self.id = "img_" + uuid.uuid4().hex[:20]
        self.body, self.reqs, self.warnings = body, reqs, warnings
        self.created = time.time()
        self.state = "queued"
        self.steps = reqs[0].steps
        self.step = 0
        k = body.partial_images or 0
        n = self.steps
        # the same preview steps as the embedded engine
        self.preview_steps = sorted({math.ceil(n * j / (k + 1)) for j in range(1, k + 1)} - {0, n}) if k else []
        self.events: list[dict] = []
        self.changed = asyncio.Event()
        self.image_ids: list[str] = []
        self.images: list[bytes] = []
        self.error: dict | None = None
        self.status = 200
        self.timings: dict = {}
        self.stage_info: dict = {}
        self.task: asyncio.Task | None = None
        self.revised_prompt: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("done", "error", "cancelled")

    def emit(self, ev: dict) -> None:
        self.events.append(ev)
        self.changed.set()
        self.changed = asyncio.Event()  # waiters hold the old one, which stays set

    def set_state(self, state: str) -> None:
        if self.finished or state == self.state:
            return
        self.state = state
        if state in STAGES:
            self.emit({"type": "stage", "stage": state})

    def fail(self, message: str, status: int = 500, code: str = "stage_failed") -> None:
        if self.finished:
            return
        self.status = status
        self.error = {"message": message, "type": "server_error" if status >= 500 else "invalid_request_error",
                      "param": None, "code": code}
        self.state = "error"
        self.emit({"type": "error", "error": self.error})

    def vramfit(self) -> dict:
        return {"job_id": self.id, "recipe": self.stage_info.get("recipe"), "timings": self.timings,
                "memory": {s: i.get("memory") for s, i in self.stage_info.get("stages", {}).items()},
                "host": "ray"}


class StageError(Exception):
    def __init__(self, stage: str, err: dict):
        self.status = 503 if err.get("oom") else 500
        self.code = "out_of_memory" if err.get("oom") else "stage_failed"
        super().__init__(f"{stage} failed: {err.get('type')}: {err.get('message')}")


def _name(x) -> str:
    return getattr(x, "value", None) or str(x)  # Ray's state enums: "RUNNING", not "ReplicaState.RUNNING"


def _encode_image(image, fmt: str, quality: int | None) -> bytes:
    buf = io.BytesIO()
    kw = {} if fmt == "png" or quality is None else {"quality": quality}
    image.save(buf, format={"jpeg": "JPEG", "webp": "WEBP"}.get(fmt, "PNG"), **kw)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------
# the ingress: same routes and wire format as app.py

api = FastAPI(title="vramfit serve (Ray)")
_AUTH = {"key": None}  # set by the ingress replica's constructor; the app object lives in that process


def _err(status: int, message: str, param=None, code=None, type_=None, headers=None) -> JSONResponse:
    type_ = type_ or ("invalid_request_error" if status < 500 else "server_error")
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers or {})


@api.exception_handler(RequestValidationError)
async def _bad_body(_req, exc: RequestValidationError):
    e = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(x) for x in e.get("loc", ())[1:]) or None
    return _err(400, f"{param or 'body'}: {e.get('msg', 'invalid request')}", param, "invalid_value",
                headers={"x-should-retry": "false"})


@api.exception_handler(Exception)
async def _any(_req, exc: Exception):
    # the trace goes to the replica's log (Ray keeps it), never into the body
    return _err(500, f"internal error ({type(exc).__name__}); see the Ray Serve replica log", code="internal_error")


@api.middleware("http")
async def _auth(request: Request, call_next):
    key = _AUTH["key"]
    path = request.url.path
    open_path = path in ("/health", "/") or path.startswith("/static/")  # the page carries no data (as app.py)
    if key and not open_path and request.headers.get("authorization") != f"Bearer {key}":
        return _err(401, "missing or wrong API key: send Authorization: Bearer <key>", code="invalid_api_key",
                    type_="authentication_error", headers={"x-should-retry": "false"})
    response = await call_next(request)
    response.headers.setdefault("x-request-id", request.headers.get("x-request-id") or "req_" + uuid.uuid4().hex[:16])
    return response


async def _body(request: Request) -> ImageRequest:
    try:
        raw = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadParam("the body is not valid JSON", None, "invalid_json") from None
    try:
        return ImageRequest.model_validate(raw)
    except ValidationError as exc:
        e = exc.errors()[0]
        param = ".".join(str(x) for x in e.get("loc", ())) or None
        raise BadParam(f"{param or 'body'}: {e.get('msg')}", param) from None


@serve.deployment(name="ingress", max_ongoing_requests=256)
@serve.ingress(api)
class Ingress:
    def __init__(self, encode: DeploymentHandle, denoise: DeploymentHandle, decode: DeploymentHandle, cfg: dict):
        self.encode, self.denoise, self.decode = encode, denoise, decode
        self.cfg = cfg
        self.spec, self.weights = cfg["spec"], cfg["weights"]
        _AUTH["key"] = cfg.get("api_key")
        self.jobs: "OrderedDict[str, Job]" = OrderedDict()
        self.images: "OrderedDict[str, tuple[float, str, bytes]]" = OrderedDict()
        self.stage_info: dict = {}
        self.images_total = 0

    # ---------------------------------------------------------------- running a job
    def _active(self) -> int:
        return sum(not j.finished for j in self.jobs.values())

    def _position(self, job: Job) -> int:
        return sum(1 for j in self.jobs.values() if j.state == "queued" and j.created < job.created)

    async def _call(self, stage: str, handle: DeploymentHandle, item: dict) -> dict:
        r = await handle.remote(item)
        if "error" in r:
            raise StageError(stage, r["error"])
        self.stage_info[stage] = r["info"]
        return r

    async def _run(self, job: Job) -> None:
        t0 = time.perf_counter()
        try:
            r0 = job.reqs[0]
            job.set_state("encode")
            enc = await self._call("encode", self.encode, {"prompt": r0.prompt,
                                                           "max_sequence_length": r0.max_sequence_length})
            job.timings["encode_s"] = enc["run_s"]
            emb = enc["ok"][0]  # one prompt per job: its images share the embeddings
            job.set_state("denoise")
            t1 = time.perf_counter()
            latents = await asyncio.gather(*(self._denoise(job, i, r, emb) for i, r in enumerate(job.reqs)))
            job.timings["denoise_s"] = round(time.perf_counter() - t1, 4)
            job.set_state("decode")
            t2 = time.perf_counter()
            outs = [await self._call("decode", self.decode, {"latents": lat, "height": r.height, "width": r.width})
                    for lat, r in zip(latents, job.reqs)]
            job.timings["decode_s"] = round(time.perf_counter() - t2, 4)
            fmt = job.body.output_format
            for o in outs:
                data = _encode_image(o["ok"][0]["image"], fmt, job.body.output_compression)
                iid = "i" + uuid.uuid4().hex[:16]
                self._keep_image(iid, fmt, data)
                job.images.append(data)
                job.image_ids.append(f"{iid}.{fmt}")
            job.timings["total_s"] = round(time.perf_counter() - t0, 4)
            job.stage_info = {"recipe": self.cfg["recipe_str"], "stages": dict(self.stage_info)}
            self.images_total += len(outs)
            job.state = "done"
            job.emit({"type": "done", "images": [f"/v1/images/{i}" for i in job.image_ids],
                      "vramfit": job.vramfit()})
        except asyncio.CancelledError:
            if not job.finished:  # as the embedded engine says it: state cancelled, an error event with that code
                job.state = "cancelled"
                job.error = {"message": "cancelled", "type": "cancelled", "param": None, "code": "cancelled"}
                job.status = 409
                job.emit({"type": "error", "error": job.error})
            raise
        except BackPressureError:
            job.fail("the stage queues are full; retry later", 429, "queue_full")
        except StageError as e:
            job.fail(str(e), e.status, e.code)
        except Exception as e:  # noqa: BLE001 -- a job ends with a clear error, never a stack trace
            job.fail(f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}", 500)

    async def _denoise(self, job: Job, i: int, r, emb: dict):
        item = {**emb, "seed": r.seed, "steps": r.steps, "guidance": r.guidance, "height": r.height,
                "width": r.width, "max_sequence_length": r.max_sequence_length,
                "previews": job.preview_steps if i == 0 else []}
        result = None
        async for ev in self.denoise.options(stream=True, method_name="run").remote(item):
            if ev is None:
                continue
            kind = ev["type"]
            if kind == "step" and i == 0:
                job.step = ev["i"]
                job.emit({"type": "step", "i": ev["i"], "n": ev["n"]})
            elif kind == "latents":
                await self._preview(job, r, ev)
            elif kind == "result":
                self.stage_info["denoise"] = {**ev["info"], "batch": ev["batch"]}
                result = ev["latents"]
            elif kind == "error":
                raise StageError("denoise", ev["error"])
        if result is None:
            raise StageError("denoise", {"type": "Lost", "message": "the stream ended without a result"})
        return result

    async def _preview(self, job: Job, r, ev: dict) -> None:
        """A partial image: intermediate latents through the decode stage; a failure only drops the preview."""
        try:
            out = await self._call("decode", self.decode, {"latents": ev["latents"], "height": r.height,
                                                           "width": r.width})
        except (StageError, BackPressureError):
            return
        data = _encode_image(out["ok"][0]["image"], job.body.output_format, job.body.output_compression)
        idx = job.preview_steps.index(ev["i"]) if ev["i"] in job.preview_steps else 0
        job.emit({"type": "partial", "b64_json": base64.b64encode(data).decode(), "index": idx, "partial_image_index": idx,
                  "output_format": job.body.output_format, "i": ev["i"]})

    def _keep_image(self, iid: str, fmt: str, data: bytes) -> None:
        now = time.time()
        self.images[iid] = (now, fmt, data)
        while len(self.images) > KEEP_IMAGES or (self.images and next(iter(self.images.values()))[0] < now - KEEP_S):
            self.images.popitem(last=False)
        while len(self.jobs) > 10 * KEEP_IMAGES:  # finished job records are small, but not kept forever
            jid, j = next(iter(self.jobs.items()))
            if not j.finished:
                break
            self.jobs.pop(jid)

    async def _submit(self, request: Request) -> Job | JSONResponse:
        try:
            body = await _body(request)
            if body.model and body.model != self.spec.name:
                return _err(404, f"model {body.model!r} is not served here; this server serves {self.spec.name!r}",
                            "model", "model_not_found", headers={"x-should-retry": "false"})
            reqs, warnings, revised = to_requests(body, self.spec, self.weights)
        except BadParam as e:
            return _err(400, str(e), e.param, e.code, headers={"x-should-retry": "false"})
        if self._active() >= self.cfg["max_queue"]:
            return _err(429, f"the queue is full ({self.cfg['max_queue']} jobs); retry later", code="queue_full",
                        headers={"Retry-After": "2"})
        job = Job(body, reqs, warnings)
        job.revised_prompt = revised
        self.jobs[job.id] = job
        job.emit({"type": "queued", "position": self._position(job)})
        job.task = asyncio.get_running_loop().create_task(self._run(job))
        return job

    def _error_of(self, job: Job) -> JSONResponse:
        headers = {"x-request-id": job.id}
        if job.status in (429, 503):
            headers["Retry-After"] = "5"
        return JSONResponse({"error": job.error}, status_code=job.status, headers=headers)

    # ---------------------------------------------------------------- routes
    @api.get("/health")
    async def health(self):
        return {"status": "ok"}

    @api.get("/")
    async def index(self):
        return FileResponse(STATIC / "index.html")

    @api.get("/static/{name}")
    async def static(self, name: str):
        path = (STATIC / name).resolve()
        if path.parent != STATIC or not path.is_file():
            return _err(404, f"no static file {name!r}", code="not_found")
        return FileResponse(path)

    @api.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [{"id": self.spec.name, "object": "model", "created": 0,
                                            "owned_by": "vramfit"}]}

    @api.get("/v1/status")
    async def status(self):
        replicas = {}
        try:
            app = serve.status().applications.get(self.cfg["app_name"])
            for name, d in (app.deployments if app else {}).items():
                replicas[name] = {"status": _name(d.status),
                                  "replicas": {_name(k): v for k, v in d.replica_states.items()}}
        except Exception as e:  # noqa: BLE001 -- status must answer even when the controller is busy
            replicas = {"error": str(e)}
        return {"host": "ray", "mode": "ray", "model": self.spec.name, "recipe": self.cfg["recipe_str"],
                "plan": self.cfg.get("plan"),
                "num_gpus": self.cfg["num_gpus"], "predicted_stage_peak_gb": self.cfg.get("stage_peak_gb"),
                "deployments": replicas, "stages": self.stage_info,
                "queue": {"jobs_active": self._active(), "max_queue": self.cfg["max_queue"]},
                "images_total": self.images_total}

    @api.post("/v1/jobs", status_code=202)
    async def create_job(self, request: Request):
        job = await self._submit(request)
        if isinstance(job, JSONResponse):
            return job
        return JSONResponse({"id": job.id, "events": f"/v1/jobs/{job.id}/events", "status": "queued"},
                            status_code=202, headers={"x-request-id": job.id})

    @api.get("/v1/jobs/{jid}")
    async def job_status(self, jid: str):
        job = self.jobs.get(jid)
        if job is None:
            return _err(404, f"no job {jid!r}", "id", "job_not_found")
        return {"id": job.id, "state": job.state, "position": self._position(job) if job.state == "queued" else None,
                "step": job.step, "steps": job.steps, "created": int(job.created),
                "images": [f"/v1/images/{i}" for i in job.image_ids], "error": job.error, "warnings": job.warnings,
                "vramfit": job.vramfit() if job.state == "done" else {}}

    @api.delete("/v1/jobs/{jid}")
    async def cancel_job(self, jid: str):
        job = self.jobs.get(jid)
        if job is None:
            return _err(404, f"no job {jid!r}", "id", "job_not_found")
        if not job.finished and job.task:
            job.task.cancel()
        return {"id": jid, "state": "cancelled" if not job.finished or job.state == "cancelled" else job.state}

    @api.get("/v1/jobs/{jid}/events")
    async def job_events(self, jid: str, request: Request):
        job = self.jobs.get(jid)
        if job is None:
            return _err(404, f"no job {jid!r}", "id", "job_not_found")

        async def gen():
            k = 0
            try:
                while True:
                    while k < len(job.events):
                        yield {"data": json.dumps(job.events[k])}
                        k += 1
                    if job.finished:
                        return
                    await job.changed.wait()
            finally:
                if not job.finished and job.task:  # a client that drops the stream cancels its job
                    job.task.cancel()

        return EventSourceResponse(gen(), headers={"x-request-id": job.id})

    @api.get("/v1/images/{name}")
    async def image(self, name: str):
        iid, _, ext = name.partition(".")
        kept = self.images.get(iid)
        if kept is None or ext != kept[1]:
            return _err(404, f"no image {name!r} (images are kept for an hour, the last {KEEP_IMAGES})",
                        code="image_not_found")
        return Response(kept[2], media_type=MEDIA[kept[1]])

    @api.post("/v1/images/generations")
    async def generations(self, request: Request):
        job = await self._submit(request)
        if isinstance(job, JSONResponse):
            return job
        if job.body.stream:
            return EventSourceResponse(self._openai_stream(job), headers={"x-request-id": job.id})
        try:
            await asyncio.shield(job.task)
        except asyncio.CancelledError:
            job.task.cancel()  # the client went away
            raise
        if job.state != "done":
            return self._error_of(job)
        return JSONResponse(self._response(job), headers={"x-request-id": job.id})

    def _response(self, job: Job) -> dict:
        b = job.body
        if b.response_format == "url":
            data = [{"url": f"/v1/images/{i}"} for i in job.image_ids]
        else:
            data = [{"b64_json": base64.b64encode(x).decode()} for x in job.images]
        if job.revised_prompt:  # the prompt as T5 reads it, where that differs (OpenAI's revised_prompt)
            for d in data:
                d["revised_prompt"] = job.revised_prompt
        return {"created": int(job.created), "data": data, "output_format": b.output_format,
                "size": f"{job.reqs[0].width}x{job.reqs[0].height}", "warnings": job.warnings,
                "usage": {"images": len(job.images)}, "vramfit": job.vramfit()}

    async def _openai_stream(self, job: Job):
        """OpenAI's image streaming events: image_generation.partial_image ..., image_generation.completed."""
        b, size = job.body, f"{job.reqs[0].width}x{job.reqs[0].height}"
        k = 0
        try:
            while True:
                while k < len(job.events):
                    ev = job.events[k]
                    k += 1
                    if ev["type"] == "partial":
                        yield {"data": json.dumps({"type": "image_generation.partial_image",
                                                   "b64_json": ev["b64_json"], "created_at": int(time.time()),
                                                   "partial_image_index": ev["index"], "size": size,
                                                   "output_format": b.output_format, "quality": "auto",
                                                   "background": "opaque"})}
                    elif ev["type"] == "done":
                        for x in job.images:
                            yield {"data": json.dumps({"type": "image_generation.completed",
                                                       "b64_json": base64.b64encode(x).decode(),
                                                       "created_at": int(time.time()), "size": size,
                                                       "output_format": b.output_format, "quality": "auto",
                                                       "background": "opaque",
                                                       "usage": {"images": len(job.images)}})}
                        return
                    elif ev["type"] == "error":
                        yield {"data": json.dumps({"type": "error", "error": job.error or
                                                   {"message": "cancelled", "type": "server_error"}})}
                        return
                await job.changed.wait()
        finally:
            if not job.finished and job.task:
                job.task.cancel()


# ----------------------------------------------------------------------------------------------------------
# building and running the graph


def gpu_shares(spec, recipe, device, shape) -> tuple[dict, dict | None]:
    """``num_gpus`` per stage from the planner's per-stage peaks (+ margin + reserve) over the GPU's memory;
    0 on CPU. Ray does not isolate memory between fractional replicas: this sizing is what keeps them apart.
    Where the shares add up to more than one GPU, Ray starts a stage's replica only when another has scaled
    down and given its share back -- stage batches, by the scheduler's own accounting."""
    if device.type != "cuda":
        return {s: 0 for s in STAGES}, None
    from .. import plan

    prof = plan.local_profile()
    pred = plan.predict(spec.name, recipe, shape, prof)
    budget = plan.calibration()["budget"]
    peaks = pred["stage_peak_gb"]
    shares = {s: min(1.0, math.ceil(100 * (peaks[s] * (1 + budget["margin"]) + budget["reserve_gb"])
                                    / prof["vram_gb"]) / 100) for s in STAGES}
    return shares, peaks


def build(args, app_name: str = "vramfit"):
    """The bound Ray Serve application for ``args`` (the ``vramfit serve`` arguments)."""
    from .. import measure, models

    spec = models.get_model(args.model)
    weights = models.resolve_weights(spec, getattr(args, "weights", None), seed=getattr(args, "weights_seed", 0))
    device = measure.resolve_device(getattr(args, "device", None) or "auto")
    # the same recipe choice as the embedded host (--recipe as given, or the planner's pick for --vram)
    from .. import plan
    from .cli import serve_plan
    from .protocol import parse_size

    recipes, _mode, plan_record, _fractions = serve_plan(args, spec, weights, device)
    recipe = recipes[0]
    h, w = parse_size(getattr(args, "size", None), spec)
    # the batch the planner predicts fits (as the embedded host takes it), and GPU shares sized for that batch
    max_batch = min(int(getattr(args, "max_batch", 4) or 1), int(plan_record.get("max_batch") or 10**6))
    shape = plan.Shape(h, w, getattr(args, "steps", None) or spec.default_steps, max_batch, spec.max_sequence_length)
    shares, peaks = gpu_shares(spec, recipe, device, shape)
    idle = float(getattr(args, "idle_unload", 0) or 0) or DEFAULT_IDLE_S
    max_queue = int(getattr(args, "max_queue", 64) or 64)
    common = {"spec": spec, "weights": weights, "recipe": recipe, "device": str(device),
              "gguf_file": getattr(args, "gguf", None),
              "threads": getattr(args, "threads", None) or torch.get_num_threads()}

    def stage(cls, name, target):
        auto = {"min_replicas": 0, "initial_replicas": 1, "max_replicas": 1, "target_ongoing_requests": target,
                "downscale_delay_s": idle, "downscale_to_zero_delay_s": idle, "upscale_delay_s": 0.0}
        # num_cpus 0: replicas are placed by GPU share; their torch threads are set from `threads` above
        # denoise takes up to max_batch requests at once so that @serve.batch can form a batch of them
        ongoing = {"max_ongoing_requests": 2 * max_batch} if name == "denoise" else {}
        return cls.options(ray_actor_options={"num_gpus": shares[name], "num_cpus": 0}, autoscaling_config=auto,
                           max_queued_requests=max_queue, health_check_period_s=10.0, **ongoing).bind(
            {**common, "num_gpus": shares[name], "max_batch": max_batch})

    graph = Ingress.options(ray_actor_options={"num_cpus": 0}).bind(
        stage(EncodeDeployment, "encode", 1), stage(DenoiseDeployment, "denoise", max_batch),
        stage(DecodeDeployment, "decode", 1),
        {"spec": spec, "weights": weights, "recipe_str": str(recipe), "num_gpus": shares, "stage_peak_gb": peaks, "plan": plan_record,
         "max_queue": max_queue, "api_key": getattr(args, "api_key", None) or os.environ.get("VRAMFIT_API_KEY"),
         "app_name": app_name})
    return graph


def run(args) -> int:
    """``vramfit serve --ray``: start (or join, with RAY_ADDRESS) a Ray cluster, run the graph behind Serve's
    HTTP proxy on --host/--port, and stay until SIGINT/SIGTERM."""
    import ray

    host, port = getattr(args, "host", "127.0.0.1") or "127.0.0.1", int(getattr(args, "port", 8000) or 8000)
    graph = build(args)  # bad arguments fail here, before Ray starts
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False,
                 num_gpus=None if os.environ.get("RAY_ADDRESS") else torch.cuda.device_count())
    serve.start(http_options={"host": host, "port": port})
    serve.run(graph, name="vramfit", route_prefix="/")
    print(f"vramfit serve --ray: http://{host}:{port}/ (Ray Serve; Ctrl-C stops)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0
