"""Soak test of `vramfit serve`: many mixed requests with faults injected; every request must end, with images or
a clear error -- 0 lost, 0 hung.

Loopback only and bounded: the script starts its own flux-tiny server on 127.0.0.1 (a free port, `--test-faults`
so that POST /v1/_faults can arm stage exceptions, out-of-memory errors and worker kills), sends `--requests`
requests (default 1000) with `--concurrency` in flight, stops sending at `--time-limit` seconds, and stops the
server by its pid at the end. Runs on a CPU machine in a few minutes (flux-tiny, 32-64 px, 1-2 steps).

The mix (seeded): OpenAI calls (b64_json, url, stream with partial images), jobs followed through their events,
cancels (DELETE /v1/jobs/{id}), dropped streams (the client goes away; the job must still end), bad inputs (each
must get its 4xx and an OpenAI-shaped error body), and faults armed every few requests.

Outcome of each request:
  ok        images came back, decodable, of the asked size and count
  error     a clear error: an HTTP status >= 400 with {"error": {"message", "type", "param", "code"}} (429/503 with
            Retry-After), or an SSE error event with a message
  cancelled the job ended as cancelled (after our DELETE or our dropped stream)
  lost      anything else: a 200 without images, a stream that ended without completed/error, a broken
            connection, a malformed body
  hung      no end within --request-timeout seconds

    python benchmarks/soak_serve.py --out outputs/soak.json            # ~1000 requests, <= 10 min
    python benchmarks/soak_serve.py --requests 100 --out /tmp/s.json   # a quick one

Prints a table and, as the last line, the JSON written to --out. Exit status 0 only with 0 lost and 0 hung.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
SIZES = ("32x32", "64x32", "32x32", "64x64")  # few distinct shapes, so micro-batches form
TERMINAL = ("done", "error", "cancelled")

# request kinds and their shares of the mix
MIX = {"b64": 18, "url": 10, "stream": 16, "job": 12, "cancel": 10, "drop": 8, "bad": 20, "fault": 6}
BAD = (  # body (or raw bytes), the status it must get
    ({"prompt": "", "size": "32x32"}, 400),
    ({"prompt": "x", "size": "33x32"}, 400),
    ({"prompt": "x", "size": "32x32", "n": 11}, 400),
    ({"prompt": "x", "size": "32x32", "n": 0}, 400),
    ({"prompt": "x", "size": "huge"}, 400),
    ({"prompt": "x", "size": "32x32", "partial_images": 4}, 400),
    ({"prompt": "x", "size": "32x32", "steps": 0}, 400),
    ({"prompt": "x", "size": "32x32", "colour": "blue"}, 400),
    ({"prompt": "x", "size": "32x32", "model": "no-such-model"}, 404),
    (b"{not json", 400),
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------------------
# checks


def error_is_clear(r: httpx.Response) -> str | None:
    """None when the response is a clear error (OpenAI shape, Retry-After where it matters); else why not."""
    try:
        e = r.json()["error"]
    except Exception:  # noqa: BLE001
        return f"HTTP {r.status_code} without an OpenAI error body: {r.text[:120]!r}"
    if not {"message", "type", "param", "code"} <= set(e) or not e["message"]:
        return f"HTTP {r.status_code} error body lacks fields: {e}"
    if "Traceback" in e["message"]:
        return "a stack trace in the error body"
    if r.status_code in (429, 503) and "retry-after" not in r.headers:
        return f"HTTP {r.status_code} without Retry-After"
    return None


def refused(r: httpx.Response) -> "Outcome":
    """A non-2xx answer: a clear error (status, code and the start of the message) or, if it is not clear, lost."""
    why = error_is_clear(r)
    if why:
        return Outcome("lost", why)
    e = r.json()["error"]
    return Outcome("error", f"{r.status_code} {e.get('code')}: {e['message'][:70]}")


def images_ok(datas: list[bytes], size: str, n: int) -> str | None:
    from PIL import Image

    if len(datas) != n:
        return f"{len(datas)} images for n={n}"
    w, h = (int(x) for x in size.split("x"))
    for d in datas:
        try:
            im = Image.open(io.BytesIO(d))
            im.load()
        except Exception as e:  # noqa: BLE001
            return f"an image does not decode: {e}"
        if im.size != (w, h):
            return f"image {im.size} for size {size}"
    return None


class Outcome(Exception):
    def __init__(self, kind: str, detail: str = ""):
        super().__init__(detail)
        self.kind, self.detail = kind, detail


# ----------------------------------------------------------------------------------------------------------
# the requests


class Soak:
    def __init__(self, base: str, args):
        self.base, self.args = base, args
        self.rng = random.Random(args.seed)
        self.results: list[dict] = []
        self.faults: Counter = Counter()
        self.job_ids: set[str] = set()

    def body(self, **kw) -> dict:
        b = {"prompt": self.rng.choice(["a fox", "a red cube on a table", "lighthouse at dusk", "an owl"]),
             "size": self.rng.choice(SIZES), "n": self.rng.choice((1, 1, 1, 2, 3)),
             "steps": self.rng.choice((1, 1, 2)), "seed": self.rng.randrange(1000)}
        b.update(kw)
        return b

    async def sse(self, resp: httpx.Response, drop_after: int | None = None):
        """Yield the JSON of each `data:` line; with drop_after, stop reading after that many (the caller drops)."""
        k = 0
        async for line in resp.aiter_lines():
            if line.startswith("data:"):
                yield json.loads(line[5:])
                k += 1
                if drop_after is not None and k >= drop_after:
                    return

    async def fetch_urls(self, c: httpx.AsyncClient, urls: list[str]) -> list[bytes]:
        out = []
        for u in urls:
            r = await c.get(u)
            if r.status_code != 200:
                raise Outcome("lost", f"GET {u}: HTTP {r.status_code}")
            out.append(r.content)
        return out

    async def wait_job(self, c: httpx.AsyncClient, jid: str) -> dict:
        deadline = time.monotonic() + self.args.request_timeout
        while time.monotonic() < deadline:
            r = await c.get(f"/v1/jobs/{jid}")
            if r.status_code != 200:
                raise Outcome("lost", f"GET /v1/jobs/{jid}: HTTP {r.status_code}")
            s = r.json()
            if s["state"] in TERMINAL:
                return s
            await asyncio.sleep(0.2)
        raise Outcome("hung", f"job {jid} still {s['state']} after {self.args.request_timeout} s")

    def from_job_state(self, s: dict, body: dict) -> Outcome:
        if s["state"] == "cancelled":
            return Outcome("cancelled")
        if s["state"] == "error":
            e = s.get("error") or {}
            return Outcome("error" if e.get("message") else "lost", e.get("message") or "error without a message")
        return Outcome("ok")  # images checked by the caller where it has them

    async def post(self, c, body, **kw) -> httpx.Response:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await c.post("/v1/images/generations", content=raw, headers={"content-type": "application/json"},
                            **kw)

    # ---- one request of each kind; each raises Outcome
    async def r_b64(self, c):
        body = self.body()
        r = await self.post(c, body)
        if r.status_code != 200:
            raise refused(r)
        datas = [base64.b64decode(d["b64_json"]) for d in r.json().get("data", []) if d.get("b64_json")]
        why = images_ok(datas, body["size"], body["n"])
        raise Outcome("lost", why) if why else Outcome("ok")

    async def r_url(self, c):
        body = self.body(response_format="url", output_format=self.rng.choice(("png", "jpeg", "webp")))
        r = await self.post(c, body)
        if r.status_code != 200:
            raise refused(r)
        urls = [d["url"] for d in r.json().get("data", []) if d.get("url")]
        why = images_ok(await self.fetch_urls(c, urls), body["size"], body["n"])
        raise Outcome("lost", why) if why else Outcome("ok")

    async def r_stream(self, c):
        body = self.body(stream=True, partial_images=self.rng.choice((0, 1, 2)), n=1, steps=2)
        async with c.stream("POST", "/v1/images/generations", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                raise refused(r)
            if r.headers.get("x-request-id"):
                self.job_ids.add(r.headers["x-request-id"])
            datas = []
            async for ev in self.sse(r):
                t = ev.get("type")
                if t == "image_generation.completed":
                    datas.append(base64.b64decode(ev["b64_json"]))
                    if len(datas) == body["n"]:
                        break
                elif t == "error":
                    msg = (ev.get("error") or {}).get("message")
                    raise Outcome("error", msg) if msg else Outcome("lost", "error event without a message")
        if not datas:
            raise Outcome("lost", "the stream ended without image_generation.completed or an error")
        why = images_ok(datas, body["size"], body["n"])
        raise Outcome("lost", why) if why else Outcome("ok")

    async def submit_job(self, c, body) -> str:
        r = await c.post("/v1/jobs", json=body)
        if r.status_code != 202:
            raise refused(r)
        jid = r.json()["id"]
        self.job_ids.add(jid)
        return jid

    async def r_job(self, c):
        body = self.body(partial_images=self.rng.choice((0, 1)), response_format="url")
        jid = await self.submit_job(c, body)
        last = None
        async with c.stream("GET", f"/v1/jobs/{jid}/events") as r:
            async for ev in self.sse(r):
                last = ev
                if ev.get("type") in ("done", "error"):
                    break
        if last is None or last.get("type") not in ("done", "error"):
            raise Outcome("lost", f"job events ended without done/error (last: {last and last.get('type')})")
        if last["type"] == "error":
            msg = (last.get("error") or {}).get("message")
            raise Outcome("error", msg) if msg else Outcome("lost", "error event without a message")
        why = images_ok(await self.fetch_urls(c, last.get("images", [])), body["size"], body["n"])
        raise Outcome("lost", why) if why else Outcome("ok")

    async def r_cancel(self, c):
        body = self.body(steps=2)
        jid = await self.submit_job(c, body)
        await asyncio.sleep(self.rng.uniform(0.0, 0.6))
        r = await c.delete(f"/v1/jobs/{jid}")
        if r.status_code != 200:
            raise Outcome("lost", f"DELETE: HTTP {r.status_code}")
        s = await self.wait_job(c, jid)
        out = self.from_job_state(s, body)
        if out.kind == "ok":  # it finished before the cancel reached it: then its images must be there
            why = images_ok(await self.fetch_urls(c, s.get("images", [])), body["size"], body["n"])
            raise Outcome("lost", why) if why else Outcome("ok", "finished before the cancel")
        raise out

    async def r_drop(self, c):
        body = self.body(stream=True, partial_images=1, n=1, steps=2)
        async with c.stream("POST", "/v1/images/generations", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                raise refused(r)
            jid = r.headers.get("x-request-id")
            if self.rng.random() < 0.5:  # drop at once, or after the first event
                async for _ in self.sse(r, drop_after=1):
                    pass
        # the connection is closed now; the job must still come to an end
        if not jid:
            raise Outcome("lost", "no x-request-id on the stream")
        self.job_ids.add(jid)
        s = await self.wait_job(c, jid)
        out = self.from_job_state(s, body)
        raise Outcome(out.kind, out.detail or "stream dropped by the client")

    async def r_bad(self, c):
        body, want = self.rng.choice(BAD)
        r = await self.post(c, body)
        if r.status_code != want:
            raise Outcome("lost", f"bad input {body!r:.60}: HTTP {r.status_code}, expected {want}")
        why = error_is_clear(r)
        raise Outcome("lost", why) if why else Outcome("error", f"{want} {r.json()['error']['code']}")

    async def r_fault(self, c):
        """Arm one fault, then send a request that will meet it (or a later one will)."""
        stage = self.rng.choice(("encode", "denoise", "decode"))
        kind = self.rng.choices(("raise", "oom", "kill"), weights=(5, 5, 1 if self.faults["kill"] < 4 else 0))[0]
        r = await c.post("/v1/_faults", json={"stage": stage, "kind": kind, "count": 1})
        if r.status_code != 200:
            raise Outcome("lost", f"POST /v1/_faults: HTTP {r.status_code} (server without --test-faults?)")
        self.faults[f"{stage}:{kind}"] += 1
        self.faults[kind] += 1
        await self.r_b64(c)

    # ---- driving
    async def one(self, c, i: int, kind: str, sem: asyncio.Semaphore):
        async with sem:
            t0 = time.perf_counter()
            try:
                await asyncio.wait_for(getattr(self, f"r_{kind}")(c), self.args.request_timeout)
                out = Outcome("lost", "returned without an outcome")
            except Outcome as o:
                out = o
            except asyncio.TimeoutError:
                out = Outcome("hung", f"no end within {self.args.request_timeout} s")
            except (httpx.HTTPError, json.JSONDecodeError, KeyError, ValueError) as e:
                out = Outcome("lost", f"{type(e).__name__}: {e}"[:200])
            self.results.append({"i": i, "kind": kind, "outcome": out.kind, "detail": out.detail[:200],
                                 "s": round(time.perf_counter() - t0, 3)})

    async def run(self):
        kinds = self.rng.choices(list(MIX), weights=list(MIX.values()), k=self.args.requests)
        sem = asyncio.Semaphore(self.args.concurrency)
        t_end = time.monotonic() + self.args.time_limit
        limits = httpx.Limits(max_connections=self.args.concurrency * 2 + 4)
        t0 = time.monotonic()

        async def progress():  # a line every 30 s, so a long soak shows it is moving
            while True:
                await asyncio.sleep(30)
                print(f"soak: {time.monotonic() - t0:.0f} s, {len(self.results)} ended: "
                      f"{dict(Counter(r['outcome'] for r in self.results))}", file=sys.stderr, flush=True)

        ticker = asyncio.create_task(progress())
        async with httpx.AsyncClient(base_url=self.base, timeout=self.args.request_timeout, limits=limits) as c:
            tasks = []
            for i, kind in enumerate(kinds):
                if time.monotonic() > t_end:
                    break
                await sem.acquire()  # do not queue up more tasks than can run
                sem.release()
                tasks.append(asyncio.create_task(self.one(c, i, kind, sem)))
                await asyncio.sleep(0)
            await asyncio.gather(*tasks)
            ticker.cancel()
            # after the storm: nothing left in flight, the server healthy, and every job we saw ended
            await asyncio.sleep(1.0)
            status = (await c.get("/v1/status")).json()
            health = await c.get("/health")
            unfinished = []
            for jid in sorted(self.job_ids):
                r = await c.get(f"/v1/jobs/{jid}")
                if r.status_code == 200 and r.json()["state"] not in TERMINAL:
                    unfinished.append(jid)
        return status, health.status_code, unfinished


# ----------------------------------------------------------------------------------------------------------
# the server


def start_server(port: int, log_path: Path, args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "vramfit.cli", "serve", "--model", "flux-tiny", "--weights", "random",
           "--recipe", "", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), "--test-faults",
           "--max-queue", str(args.max_queue), "--max-batch", str(args.max_batch), "--grace", "20",
           # one torch thread per stage worker: three workers on a few cores otherwise oversubscribe them
           "--threads", str(args.threads),
           "--log-level", "warning"]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + args.start_timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"soak: the server exited with {proc.returncode} at start; see {log_path}")
        if time.monotonic() > deadline:
            stop_server(proc)
            raise SystemExit(f"soak: the server did not answer /health in {args.start_timeout} s; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> int | None:
    """SIGTERM to the pid we started (the server drains, then exits 0); SIGKILL only if it outstays 60 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def pct(xs, q):
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="where the JSON result goes")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=12)
    ap.add_argument("--time-limit", type=float, default=540.0, help="stop sending new requests after this (s)")
    ap.add_argument("--request-timeout", type=float, default=180.0, help="a request with no end by then is hung")
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--max-queue", type=int, default=16, help="the server's --max-queue (small: 429s happen)")
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="the server's --threads (torch threads per worker)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    port = free_port()
    log_path = out.with_suffix(".server.log")
    t0 = time.perf_counter()
    proc = start_server(port, log_path, args)
    start_s = round(time.perf_counter() - t0, 1)
    print(f"soak: server pid {proc.pid} on 127.0.0.1:{port} up in {start_s} s; log {log_path}", file=sys.stderr)
    soak = Soak(f"http://127.0.0.1:{port}", args)
    t1 = time.perf_counter()
    try:
        status, health, unfinished = asyncio.run(soak.run())
    finally:
        wall = round(time.perf_counter() - t1, 1)
        rc = stop_server(proc)

    res = soak.results
    outcomes = Counter(r["outcome"] for r in res)
    by_kind = defaultdict(Counter)
    lat = defaultdict(list)
    for r in res:
        by_kind[r["kind"]][r["outcome"]] += 1
        lat[r["kind"]].append(r["s"])
    errors = Counter(r["detail"] for r in res if r["outcome"] == "error")
    bad = [r for r in res if r["outcome"] in ("lost", "hung")]
    record = {
        "schema": "vramfit.soak/1", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "server": {"model": "flux-tiny", "device": "cpu", "pid": proc.pid, "start_s": start_s, "exit_code": rc,
                   "health_after": health, "admitted_after": status.get("queue", {}).get("admitted"),
                   "worker_restarts": {s: v.get("worker_restarts") for s, v in status.get("stages", {}).items()}},
        "config": {k: getattr(args, k) for k in ("requests", "concurrency", "time_limit", "request_timeout",
                                                  "max_queue", "max_batch", "seed", "threads")},
        "requests": len(res), "wall_s": wall, "outcomes": dict(outcomes),
        "lost": outcomes.get("lost", 0), "hung": outcomes.get("hung", 0), "unfinished_jobs": len(unfinished),
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "latency_s": {k: {"p50": pct(v, 0.5), "p95": pct(v, 0.95), "max": max(v)} for k, v in sorted(lat.items())},
        "faults_armed": dict(soak.faults),
        "errors": dict(errors.most_common(20)),
        "lost_or_hung": bad[:20],
    }
    passed = (record["lost"] == 0 and record["hung"] == 0 and not unfinished and health == 200
              and record["server"]["admitted_after"] == 0 and rc == 0)
    record["passed"] = passed
    out.write_text(json.dumps(record, indent=2) + "\n")

    print(f"\n{'kind':<8} {'n':>5} {'ok':>5} {'error':>6} {'cancel':>7} {'lost':>5} {'hung':>5} {'p50 s':>7} {'p95 s':>7}")
    for k, v in sorted(by_kind.items()):
        print(f"{k:<8} {sum(v.values()):>5} {v['ok']:>5} {v['error']:>6} {v['cancelled']:>7} {v['lost']:>5} "
              f"{v['hung']:>5} {record['latency_s'][k]['p50']:>7} {record['latency_s'][k]['p95']:>7}")
    print(f"\n{len(res)} requests in {wall} s: {dict(outcomes)}; faults armed {dict(soak.faults)}; server exit {rc}; "
          f"{'PASS' if passed else 'FAIL'}: {record['lost']} lost, {record['hung']} hung, "
          f"{len(unfinished)} jobs unfinished")
    for r in bad[:10]:
        print(f"  {r['outcome']}: #{r['i']} {r['kind']}: {r['detail']}")
    print(json.dumps(record))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
