"""A stand-in for vramfit.serve.app that speaks the serve contract (POST /v1/jobs, job events, images), used only
while the real app is not on this branch. It makes real PNGs (a gradient) so the page has something to show."""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sse_starlette.sse import EventSourceResponse

STATIC = Path(__file__).resolve().parents[1] / "vramfit" / "serve" / "static"


def _png(w: int, h: int, seed: int) -> bytes:
    from PIL import Image

    img = Image.new("RGB", (w, h))
    img.putdata([((x * 4 + seed * 40) % 256, (y * 4) % 256, 128) for y in range(h) for x in range(w)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_app(step_s: float = 0.15) -> FastAPI:
    app = FastAPI()
    jobs: dict[str, dict] = {}
    images: dict[str, bytes] = {}
    ids = itertools.count(1)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/")
    def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/v1/status")
    def status():
        return {"model": "fake", "mode": "pipelined", "recipe": "bf16"}

    @app.post("/v1/jobs", status_code=202)
    async def submit(req: Request):
        body = await req.json()
        if not str(body.get("prompt", "")).strip():
            return JSONResponse({"error": {"message": "the prompt is empty", "type": "invalid_request_error",
                                           "param": "prompt", "code": None}}, status_code=400)
        jid = f"job-{next(ids)}"
        jobs[jid] = {"id": jid, "state": "queued", "body": body}
        return {"id": jid, "events": f"/v1/jobs/{jid}/events"}

    @app.get("/v1/jobs/{jid}")
    def job(jid: str):
        return jobs[jid]

    @app.get("/v1/images/{name}")
    def image(name: str):
        return Response(images[name.rsplit(".", 1)[0]], media_type="image/png")

    @app.get("/v1/jobs/{jid}/events")
    async def events(jid: str):
        j = jobs[jid]
        body = j["body"]
        w, h = (int(v) for v in body.get("size", "64x64").split("x"))
        n_steps = int(body.get("steps") or 4)

        async def gen():
            yield {"data": json.dumps({"type": "queued", "position": 0})}
            for stage in ("encode", "denoise"):
                j["state"] = stage
                yield {"data": json.dumps({"type": "stage", "stage": stage})}
                await asyncio.sleep(step_s)
            for i in range(1, n_steps + 1):
                await asyncio.sleep(step_s)
                yield {"data": json.dumps({"type": "step", "i": i, "n": n_steps})}
                if i == n_steps // 2:
                    b64 = base64.b64encode(_png(w, h, 9)).decode()
                    yield {"data": json.dumps({"type": "partial", "b64_json": b64, "partial_image_index": 0})}
            yield {"data": json.dumps({"type": "stage", "stage": "decode"})}
            await asyncio.sleep(step_s)
            urls = []
            for k in range(int(body.get("n", 1))):
                iid = f"{jid}-{k}"
                images[iid] = _png(w, h, int(body.get("seed", 0)) + k)
                urls.append(f"/v1/images/{iid}.png")
            j.update(state="done", images=urls,
                     vramfit={"job_id": jid, "recipe": "bf16", "timings": {"encode_s": 0.1, "denoise_s": 0.5},
                              "memory": {"peak_allocated_gb": 0.01}})
            yield {"data": json.dumps({"type": "done", "images": urls})}

        return EventSourceResponse(gen())

    return app
