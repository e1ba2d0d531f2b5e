"""FastAPI routes: OpenAI's images API, jobs with server-sent events, status, scale to zero, metrics, the page.

Thin by design (vllm's protocol / serving / router split): validation is ``protocol.to_requests``, all work is
the engine's; this module turns jobs into HTTP responses and every failure into OpenAI's error body.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import secrets
import threading
import time
import uuid
from collections import OrderedDict, deque
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, Job, StageFailed
from .protocol import BadParam, ImageRequest, error_body, to_requests

log = logging.getLogger("vramfit.serve")
STATIC_DIR = Path(__file__).parent / "static"
MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
IMAGE_TTL_S, IMAGE_KEEP = 3600, 100
POLL_S = 0.02
# no retry can change the answer to these: tell the official client not to try (it retries 408/409/429/5xx)
NO_RETRY = {400, 401, 404, 422}


def encode_image(image, fmt: str, quality: int | None = None) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG")
    elif fmt == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=quality or 95)
    else:
        image.save(buf, format="WEBP", quality=quality or 95)
    return buf.getvalue()


class ImageStore:
    """``url`` images: kept for an hour and the last 100, then 404."""

    def __init__(self):
        self.items: OrderedDict[str, tuple[bytes, str, float]] = OrderedDict()
        self.lock = threading.Lock()

    def put(self, data: bytes, fmt: str) -> str:
        iid = "im_" + uuid.uuid4().hex[:20]
        with self.lock:
            self.items[iid] = (data, fmt, time.time())
            self._prune()
        return f"{iid}.{fmt}"

    def get(self, name: str):
        iid, _, ext = name.partition(".")
        with self.lock:
            self._prune()
            hit = self.items.get(iid)
        if hit is None or hit[1] != ext:
            return None
        return hit

    def _prune(self):
        cutoff = time.time() - IMAGE_TTL_S
        while self.items and (len(self.items) > IMAGE_KEEP or next(iter(self.items.values()))[2] < cutoff):
            self.items.popitem(last=False)


class Metrics:
    def __init__(self, engine: Engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.stage_seconds = Histogram("vramfit_stage_seconds", "seconds per stage batch", ["stage"], registry=r,
                                       buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160))
        self.stage_items = Counter("vramfit_stage_items_total", "items run through each stage", ["stage"], registry=r)
        self.images = Counter("vramfit_images_total", "images completed", registry=r)
        self.requests = Counter("vramfit_requests_total", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.queue = Gauge("vramfit_queue_depth", "jobs admitted and not finished, by state", ["state"], registry=r)
        self.resident = Gauge("vramfit_stage_resident", "1 when the stage's weights are loaded", ["stage"], registry=r)
        self.gpu = Gauge("vramfit_gpu_memory_bytes", "GPU memory per stage worker (last measured)",
                         ["stage", "kind"], registry=r)
        self.rate = Gauge("vramfit_images_per_second", "images completed per second over the last 60 s", registry=r)
        self.done_at: deque = deque(maxlen=10000)
        engine.on_stage_time = self._stage_time
        engine.on_images = self._images
        self.engine = engine

    def _stage_time(self, stage, seconds, n):
        self.stage_seconds.labels(stage).observe(seconds)
        self.stage_items.labels(stage).inc(n)

    def _images(self, n):
        self.images.inc(n)
        t = time.time()
        self.done_at.extend([t] * n)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        st = self.engine.status()
        for k in ("queued", "encode", "denoise", "decode"):
            self.queue.labels(k).set(st["queue"][k])
        for s, info in st["stages"].items():
            self.resident.labels(s).set(1 if info["resident"] else 0)
            mem = info.get("memory") or {}
            for kind, src, key in (("allocated", "after_load", "allocated_gb"), ("reserved", "after_load",
                                   "reserved_gb"), ("peak_allocated", "run_peak", "peak_allocated_gb")):
                v = (mem.get(src) or {}).get(key)
                if v is not None:
                    self.gpu.labels(s, kind).set(v * 2**30)
        cutoff = time.time() - 60
        self.rate.set(sum(1 for t in self.done_at if t >= cutoff) / 60.0)
        return generate_latest(self.registry)


def err_response(status: int, message: str, type_: str, param=None, code=None, retry_after=None,
                 request_id: str | None = None) -> JSONResponse:
    headers = {}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if status in NO_RETRY or code == "out_of_memory":
        headers["x-should-retry"] = "false"
    if request_id:
        headers["x-request-id"] = request_id
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def stage_failed_response(e: StageFailed, request_id=None) -> JSONResponse:
    type_ = {429: "rate_limit_error", 503: "server_error"}.get(e.status, "server_error")
    ra = e.retry_after if e.retry_after is not None else (1 if e.status == 429 else None)
    return err_response(e.status, str(e), type_, None, e.code, ra, request_id)


def create_app(engine: Engine, api_key: str | None = None, test_faults: bool = False) -> FastAPI:
    app = FastAPI(title="vramfit serve", docs_url=None, redoc_url=None, openapi_url=None)
    store = ImageStore()
    metrics = Metrics(engine)
    spec = engine.spec
    model_ids = {spec.name, spec.hub_id} - {None}
    app.state.engine, app.state.inflight = engine, 0
    inflight_lock = threading.Lock()

    # ---------------------------------------------------------------- middleware: auth, ids, counting
    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        rid = request.headers.get("x-request-id") or "req_" + uuid.uuid4().hex[:16]
        # the page and its assets carry no data; every API route needs the key (the page sends it)
        open_path = path in ("/health", "/") or path.startswith("/static/")
        if api_key and not open_path:
            auth = request.headers.get("authorization", "")
            if not (auth.startswith("Bearer ") and secrets.compare_digest(auth[7:].strip(), api_key)):
                metrics.requests.labels(_route(path), "401").inc()
                return err_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                    "invalid_request_error", None, "invalid_api_key", request_id=rid)
        with inflight_lock:
            app.state.inflight += 1
        try:
            response = await call_next(request)
        finally:
            with inflight_lock:
                app.state.inflight -= 1
        response.headers.setdefault("x-request-id", rid)
        metrics.requests.labels(_route(path), str(response.status_code)).inc()
        return response

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return err_response(400, "the request body is not valid JSON", "invalid_request_error", None,
                                "invalid_json")
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        if first.get("type") == "extra_forbidden":
            msg = f"unknown field {param!r}: this server takes OpenAI's image fields plus seed, steps, guidance, strict"
        elif first.get("type") == "missing":
            msg = f"{param} is required"
        else:
            msg = f"{param}: {msg}" if param else msg
        return err_response(400, msg, "invalid_request_error", param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        return err_response(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500
                            else "server_error", None, "not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def on_any(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)  # the trace goes to the log, never the body
        return err_response(500, f"internal error ({type(exc).__name__}); see the server log", "server_error")

    # ---------------------------------------------------------------- helpers
    def make_job(body: ImageRequest) -> Job:
        if body.model is not None and body.model not in model_ids:
            raise _NotFound(f"model {body.model!r} is not served here; this server serves {spec.name}", "model",
                            "model_not_found")
        reqs, warnings, revised = to_requests(body, spec, engine.weights)
        job = Job(body, reqs, warnings)
        job.revised_prompt = revised
        engine.submit(job)
        return job

    async def admit(body: ImageRequest):
        try:
            return make_job(body), None
        except BadParam as e:
            return None, err_response(400, str(e), "invalid_request_error", e.param, e.code)
        except _NotFound as e:
            return None, err_response(404, str(e), "invalid_request_error", e.param, e.code)
        except StageFailed as e:
            return None, stage_failed_response(e)

    def vramfit_info(job: Job) -> dict:
        return {"job_id": job.id, "recipe": {s: engine.status()["stages"][s]["recipe"] for s in ("encode", "denoise",
                "decode")}, "mode": engine.mode, "timings": job.timings, "memory": job.memory,
                "seeds": [r.seed for r in job.reqs], "steps": job.steps}

    async def encoded(job: Job) -> list[dict]:
        fmt, q = job.body.output_format, job.body.output_compression
        out = []
        for img in job.images:
            data = await asyncio.to_thread(encode_image, img, fmt, q)
            if job.body.response_format == "url":
                d = {"url": f"/v1/images/{store.put(data, fmt)}"}
            else:
                d = {"b64_json": base64.b64encode(data).decode()}
            if job.revised_prompt:
                d["revised_prompt"] = job.revised_prompt  # what T5 read of a prompt longer than its limit
            out.append(d)
        return out

    async def wait(job: Job, request: Request | None = None):
        while not job.finished:
            if request is not None and await request.is_disconnected():
                engine.cancel(job)  # a client that goes away cancels its job
                return
            await asyncio.sleep(POLL_S)

    def job_error(job: Job) -> JSONResponse:
        if job.state == "cancelled":
            return err_response(409, "the job was cancelled", "invalid_request_error", None,
                                "cancelled", request_id=job.id)
        return stage_failed_response(job.error, job.id)

    def size_of(job: Job) -> str:
        r = job.reqs[0]
        return f"{r.width}x{r.height}"

    # ---------------------------------------------------------------- OpenAI images API
    @app.post("/v1/images/generations")
    async def generations(body: ImageRequest, request: Request):
        job, err = await admit(body)
        if err is not None:
            return err
        headers = {"x-request-id": job.id}
        if body.stream:
            return EventSourceResponse(openai_stream(job), headers=headers, ping=15)
        await wait(job, request)
        if job.state != "done":
            return job_error(job)
        data = await encoded(job)
        resp = {"created": int(job.created), "data": data, "output_format": body.output_format,
                "size": size_of(job), "warnings": job.warnings, "vramfit": vramfit_info(job)}
        return JSONResponse(resp, headers=headers)

    async def follow(job: Job, poll_s: float):
        """The job's events as they arrive, ending with its last ("done" or "error"); between polls a
        {"type": "queued", "position": N} event whenever its place in the queue changes. The one event loop
        behind both streams (OpenAI's and /v1/jobs/{id}/events)."""
        seen, last_pos = 0, None
        while True:
            with job.cond:
                evs = job.events[seen:]
            seen += len(evs)
            for ev in evs:
                yield ev
                if ev["type"] in ("done", "error"):
                    return
            pos = engine.position(job)
            if pos is not None and pos != last_pos and seen:
                last_pos = pos
                yield {"type": "queued", "position": pos}
            await asyncio.sleep(poll_s)

    async def openai_stream(job: Job):
        fmt = job.body.output_format
        try:
            async for ev in follow(job, POLL_S):
                if ev["type"] == "partial":
                    data = await asyncio.to_thread(encode_image, ev["image"], fmt, job.body.output_compression)
                    yield {"data": json.dumps({
                        "type": "image_generation.partial_image", "b64_json": base64.b64encode(data).decode(),
                        "partial_image_index": ev["index"], "created_at": int(time.time()), "size": size_of(job),
                        "output_format": fmt, "background": "opaque", "quality": "auto"})}
                elif ev["type"] == "error":
                    yield {"data": json.dumps({"type": "error", "error": ev["error"]})}
                elif ev["type"] == "done":
                    for d in await encoded(job):
                        yield {"data": json.dumps({
                            "type": "image_generation.completed", **d, "created_at": int(time.time()),
                            "size": size_of(job), "output_format": fmt, "background": "opaque",
                            "quality": "auto", "warnings": job.warnings, "vramfit": vramfit_info(job)})}
        except asyncio.CancelledError:
            engine.cancel(job)  # the client dropped the stream
            raise

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": spec.name, "object": "model", "created": int(engine.started),
                                            "owned_by": "vramfit", "hub_id": spec.hub_id}]}

    # ---------------------------------------------------------------- jobs
    @app.post("/v1/jobs", status_code=202)
    async def create_job(body: ImageRequest):
        job, err = await admit(body)
        if err is not None:
            return err
        return JSONResponse({"id": job.id, "events": f"/v1/jobs/{job.id}/events", "status": job.state,
                             "warnings": job.warnings}, status_code=202, headers={"x-request-id": job.id})

    def get_job(job_id: str) -> Job:
        job = engine.jobs.get(job_id)
        if job is None:
            raise StarletteHTTPException(404, f"no job {job_id!r} (jobs are remembered until 1000 newer ones)")
        return job

    def job_images(job: Job) -> list[str]:
        return job.image_ids

    async def ensure_images(job: Job):
        if job.state == "done" and not job.image_ids:
            fmt = job.body.output_format
            for img in job.images:
                data = await asyncio.to_thread(encode_image, img, fmt, job.body.output_compression)
                job.image_ids.append(f"/v1/images/{store.put(data, fmt)}")

    @app.get("/v1/jobs/{job_id}")
    async def job_status(job_id: str):
        job = get_job(job_id)
        await ensure_images(job)
        err = job.error
        return {"id": job.id, "state": job.state, "position": engine.position(job), "step": job.step,
                "steps": job.steps, "n": len(job.items), "created": int(job.created), "images": job_images(job),
                "error": error_body(str(err), "server_error", None, err.code)["error"] if err else None,
                "warnings": job.warnings, "vramfit": vramfit_info(job)}

    @app.delete("/v1/jobs/{job_id}")
    async def cancel_job(job_id: str):
        job = get_job(job_id)
        engine.cancel(job)
        return {"id": job.id, "state": job.state}

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str):
        job = get_job(job_id)

        async def gen():
            async for ev in follow(job, POLL_S * 2):
                if ev["type"] == "partial":
                    data = await asyncio.to_thread(encode_image, ev["image"], "png")
                    yield {"data": json.dumps({"type": "partial", "index": ev["index"], "i": ev["i"],
                                               "b64_json": base64.b64encode(data).decode()})}
                elif ev["type"] == "done":
                    await ensure_images(job)
                    yield {"data": json.dumps({"type": "done", "images": job.image_ids,
                                               "warnings": job.warnings, "vramfit": vramfit_info(job)})}
                else:  # progress, queued, error
                    yield {"data": json.dumps(ev)}

        return EventSourceResponse(gen(), headers={"x-request-id": job.id}, ping=15)

    @app.get("/v1/images/{name}")
    async def get_image(name: str):
        hit = store.get(name)
        if hit is None:
            raise StarletteHTTPException(404, f"no image {name!r} (images are kept for an hour and the last "
                                         f"{IMAGE_KEEP})")
        return Response(hit[0], media_type=MEDIA[hit[1]])

    # ---------------------------------------------------------------- operations
    @app.get("/v1/status")
    async def status():
        return engine.status()

    @app.post("/v1/free")
    async def free():
        freed = await asyncio.to_thread(engine.free)
        return {"freed": freed, "stages": {s: v["resident"] for s, v in engine.status()["stages"].items()}}

    @app.get("/health")
    async def health():
        ok = not engine.draining and all(w.alive() for w in engine.workers.values())
        return JSONResponse({"status": "ok" if ok else ("draining" if engine.draining else "degraded"),
                             "model": spec.name, "mode": engine.mode}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prom():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(await asyncio.to_thread(metrics.render), media_type=CONTENT_TYPE_LATEST)

    if test_faults:
        @app.post("/v1/_faults")
        async def faults(request: Request):
            """Test-only (server started with --test-faults): arm faults for the next runs of a stage."""
            try:
                b = await request.json()
                stage, kind = b["stage"], b["kind"]
                count = int(b.get("count", 1))
            except (ValueError, KeyError, TypeError):
                return err_response(400, 'body: {"stage": "encode|denoise|decode", "kind": '
                                    '"raise|oom|kill|delay|clear", "count": N, "seconds": S}', "invalid_request_error")
            if stage not in ("encode", "denoise", "decode") or kind not in ("raise", "oom", "kill", "delay", "clear"):
                return err_response(400, f"unknown stage {stage!r} or kind {kind!r}", "invalid_request_error")
            engine.add_fault(stage, kind, count, float(b.get("seconds", 1.0)))
            return {"armed": engine.faults[stage]}

    # ---------------------------------------------------------------- the page (files: vramfit/serve/static)
    @app.get("/")
    async def page():
        index = STATIC_DIR / "index.html"
        if not index.is_file():
            raise StarletteHTTPException(404, "the web page is not part of this build (vramfit/serve/static)")
        return FileResponse(index)

    @app.get("/static/{path:path}")
    async def static(path: str):
        p = (STATIC_DIR / path).resolve()
        if not p.is_file() or STATIC_DIR.resolve() not in p.parents:
            raise StarletteHTTPException(404, f"no static file {path!r}")
        return FileResponse(p)

    return app


class _NotFound(Exception):
    def __init__(self, message, param=None, code=None):
        super().__init__(message)
        self.param, self.code = param, code


def _route(path: str) -> str:
    for prefix in ("/v1/jobs", "/v1/images/generations", "/v1/images", "/static"):
        if path.startswith(prefix):
            return prefix
    # a fixed label set: unknown paths must not grow the metric without bound
    return path if path in ("/", "/health", "/metrics", "/v1/models", "/v1/status", "/v1/free", "/v1/_faults") \
        else "other"
