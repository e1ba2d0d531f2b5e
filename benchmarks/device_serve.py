"""H200 figures for `vramfit serve` (issue 10): one script, every scenario a fresh server process.

    PYTHONPATH=$PWD python3 benchmarks/device_serve.py [--budget-s 520] [--steps 28] [--out DIR]
    PYTHONPATH=$PWD python3 benchmarks/device_serve.py --smoke        # the same code on flux-tiny, CPU

Scenarios (flux-dev full-size random stand-in, 1024x1024, 28 steps as issue 10 asks; --steps to change; every row
says its steps):
  batch-on   `serve --recipe "" --max-batch 4` (bf16, every stage resident -> pipelined): images/s and p50/p95
             latency at concurrency 1, 4, 16; pipelined throughput against the bottleneck stage's own throughput
             (seconds per item measured inside each stage worker during the same run); batched-vs-alone pixel
             difference (seeds 0-2 alone at concurrency 1, then inside a batch of seeds 0-3); then POST /v1/free and one more
             request: the scale-to-zero reload time of each stage.
  batch-off  the same server with `--max-batch 1`: concurrency 1, 4, 16.
  vram-8gb   `serve --vram 8GB`: the same, where the planner picks offload=stream (K for the three workers at once)
  vram-12gb  `serve --vram 12GB` (the planner picks recipe and mode; each stage worker capped with
             torch.cuda.set_per_process_memory_fraction at its share of the budget): concurrency 4, the measured
             peak allocated/reserved of every stage worker in the row.

Rows: one JSON object per scenario (and per concurrency level) appended to $OUT/serve.jsonl (default ./outputs);
a scenario that fails or runs out of budget is a row with its error. A table is printed at the end.
Estimated GPU wall time: ~8 min at 28 steps (three server starts of ~30-60 s each with random full-size weights --
the 12 GB one quantizes on load -- plus ~60 images of ~5 s; concurrency 1/4/16 send 3/8/16 requests).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p), "TOKENIZERS_PARALLELISM": "false"}
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "vramfit.cli", "serve", "--port", str(self.port), *args],
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.log = log

    def wait(self, timeout: float) -> float:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.log.read_text()[-1500:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return round(time.perf_counter() - self.t0, 2)
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not up within {timeout:.0f} s")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def post(url: str, body: dict, timeout: float):
    import httpx

    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/images/generations", json=body, timeout=timeout)
    return r, time.perf_counter() - t0


def load(srv: Server, conc: int, count: int, body: dict, timeout: float, seed0: int = 1000) -> dict:
    """``count`` requests, ``conc`` at a time (a closed loop per client thread)."""
    lat, errors, images = [], [], {}
    nxt = iter(range(count))
    lock = threading.Lock()

    def client():
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            try:
                r, dt = post(srv.url, {**body, "seed": seed0 + i}, timeout)
                if r.status_code == 200:
                    lat.append(dt)
                    images[seed0 + i] = r.json()["data"][0]["b64_json"]
                else:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
            except Exception as e:  # noqa: BLE001 -- a failed request is counted, not hidden
                errors.append(f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    ts = [threading.Thread(target=client) for _ in range(conc)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    return {"concurrency": conc, "requests": count, "ok": len(lat), "errors": errors[:5], "wall_s": round(wall, 3),
            "images_per_s": round(len(lat) / wall, 4) if wall else None,
            "p50_s": round(statistics.median(lat), 3) if lat else None,
            "p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3) if lat else None,
            "_images": images}


def status(srv: Server) -> dict:
    import httpx

    return httpx.get(srv.url + "/v1/status", timeout=30).json()


def pixel_diff(a_b64: str, b_b64: str) -> int:
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(base64.b64decode(a_b64))).convert("RGB")).astype(int)
    b = np.asarray(Image.open(io.BytesIO(base64.b64decode(b_b64))).convert("RGB")).astype(int)
    return int(np.abs(a - b).max())


def stage_summary(st: dict) -> dict:
    out = {}
    for s, v in st["stages"].items():
        out[s] = {"s_per_item": round(v["seconds"] / v["items"], 4) if v["items"] else None, "runs": v["runs"],
                  "items": v["items"], "last_batch": v["last_batch"], "recipe": v["recipe"], "memory": v["memory"],
                  "load_s_all": v["load_s_all"], "reload_s_last": v["reload_s_last"], "ooms": v["ooms"],
                  "fallbacks": v["fallbacks"], "worker_restarts": v["worker_restarts"]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="flux-tiny on CPU, small counts (tests this script)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting scenarios after this many seconds (default 520; --smoke 1500: shared CPUs)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", default=os.environ.get("OUT", "outputs"))
    args = ap.parse_args()
    if args.budget_s is None:
        args.budget_s = 1500.0 if args.smoke else 520.0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "serve.jsonl"
    t_start = time.monotonic()
    if args.smoke:
        model, device, size, steps = "flux-tiny", "cpu", 64, args.steps or 2
        levels, counts = (1, 2, 4), {1: 2, 2: 4, 4: 4, 16: 4}
        vram_args = ["--recipe", "offload=staged"]  # CPU has no budget to plan for: the stage-batch path instead
        start_timeout = 600
    else:
        model, device, size, steps = "flux-dev", "cuda", 1024, args.steps or 28
        levels, counts = (1, 4, 16), {1: 3, 4: 8, 16: 16}
        vram_args = ["--vram", "12GB"]
        start_timeout = 400
    common = ["--model", model, "--weights", "random", "--device", device, "--max-queue", "64", "--steps", str(steps),
              "--size", f"{size}x{size}"]
    body = {"prompt": "a photo of a lighthouse on a cliff at dusk, dramatic sky", "size": f"{size}x{size}",
            "steps": steps}
    timeout = 600
    rows = []

    def emit(row):
        row = {"schema": "vramfit.serve-bench/1", "model": model, "device": device, "size": f"{size}x{size}",
               "steps": steps, "smoke": args.smoke, **row}
        rows.append(row)
        with open(rows_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k not in ("stages",)})[:400], flush=True)

    def left():
        return args.budget_s - (time.monotonic() - t_start)

    scenarios = [("batch-on", ["--recipe", "", "--max-batch", "4"]), ("batch-off", ["--recipe", "", "--max-batch", "1"]),
                 ("vram-12gb", vram_args + ["--max-batch", "4"])]
    if not args.smoke:  # the planner's stream recipe for the server (K for three workers), each worker capped
        scenarios.append(("vram-8gb", ["--vram", "8GB", "--max-batch", "4"]))
    only = {x for x in os.environ.get("VRAMFIT_SERVE_ONLY", "").split(",") if x}  # say vram-12gb: one scenario again
    scenarios = [s for s in scenarios if not only or s[0] in only]
    for name, sargs in scenarios:
        if left() < 30:
            emit({"scenario": name, "error": f"not run: --budget-s {args.budget_s:.0f} spent"})
            continue
        srv = Server(common + sargs, out / f"serve-{name}.log")
        try:
            start_s = srv.wait(min(start_timeout, left()))
            st0 = status(srv)
            alone = {}
            if name.startswith("vram-"):
                r = load(srv, 4, counts[4], body, max(60.0, left()))
                st = status(srv)
                emit({"scenario": name, "server_start_s": start_s, "mode": st["mode"], "plan": st["plan"],
                      "recipe": st["recipe"], **{k: v for k, v in r.items() if k != "_images"},
                      "peak_allocated_gb": max(((s["memory"].get("run_peak") or {}).get("peak_allocated_gb", 0)
                                                for s in st["stages"].values()), default=None),
                      "peak_reserved_gb": max(((s["memory"].get("run_peak") or {}).get("peak_reserved_gb", 0)
                                               for s in st["stages"].values()), default=None),
                      "peak_load_reserved_gb": max(((s["memory"].get("load_peak") or {}).get("peak_reserved_gb", 0)
                                                    for s in st["stages"].values()), default=None),
                      # the budget holds the stage processes together: each one's peak (load or run), summed
                      "sum_stage_peak_reserved_gb": round(sum(max((s["memory"].get(k) or {}).get("peak_reserved_gb", 0)
                                                                  for k in ("load_peak", "run_peak"))
                                                              for s in st["stages"].values()), 3),
                      "denoise_mean_batch": round(st["stages"]["denoise"]["items"] / st["stages"]["denoise"]["runs"], 2)
                      if st["stages"]["denoise"]["runs"] else None, "batch_cap": st.get("batch_cap"),
                      "budget_gb": float(name.removeprefix("vram-").removesuffix("gb")) if not args.smoke else None,
                      "memory_fraction": st["plan"].get("memory_fraction"),
                      "stages": stage_summary(st)})
                continue
            for conc in levels:
                if left() < 10:
                    emit({"scenario": name, "concurrency": conc, "error": "not run: budget spent"})
                    continue
                before = status(srv)
                r = load(srv, conc, counts[conc], body, max(60.0, left()), seed0=0 if conc == 1 else 1000 * conc)
                st = status(srv)
                if conc == 1:
                    alone = r["_images"]
                per_item = {}
                for s in st["stages"]:
                    d_items = st["stages"][s]["items"] - before["stages"][s]["items"]
                    d_s = st["stages"][s]["seconds"] - before["stages"][s]["seconds"]
                    per_item[s] = round(d_s / d_items, 4) if d_items else None
                bottleneck = max((v for v in per_item.values() if v), default=None)
                row = {"scenario": name, "server_start_s": start_s, "mode": st["mode"], "recipe": st["recipe"],
                       "max_batch": st["max_batch"], **{k: v for k, v in r.items() if k != "_images"},
                       "stage_s_per_item": per_item,
                       "bottleneck_stage": max(per_item, key=lambda k: per_item[k] or 0) if bottleneck else None,
                       "bottleneck_images_per_s": round(1 / bottleneck, 4) if bottleneck else None}
                if bottleneck and r["images_per_s"]:
                    row["pipelined_vs_bottleneck"] = round(r["images_per_s"] * bottleneck, 3)
                rows_batches = st["stages"]["denoise"]["items"] - before["stages"]["denoise"]["items"]
                runs = st["stages"]["denoise"]["runs"] - before["stages"]["denoise"]["runs"]
                row["denoise_mean_batch"] = round(rows_batches / runs, 2) if runs else None
                emit(row)
            if name == "batch-on" and left() > 20:
                # the same seeds alone (concurrency 1, seeds 0..) and inside batches (concurrency 4, seeds 0..3)
                r = load(srv, 4, 4, body, timeout, seed0=0)
                diffs = {s: pixel_diff(alone[s], r["_images"][s]) for s in alone if s in r["_images"]}
                st = status(srv)
                emit({"scenario": "batched-vs-alone", "compared": len(diffs),
                      "identical": all(d == 0 for d in diffs.values()) if diffs else None,
                      "max_pixel_diff": max(diffs.values()) if diffs else None,
                      "denoise_last_batch": st["stages"]["denoise"]["last_batch"]})
                # scale to zero: free every stage, then one request reloads them
                import httpx

                t0 = time.perf_counter()
                freed = httpx.post(srv.url + "/v1/free", timeout=60).json()
                free_s = time.perf_counter() - t0
                st_free = status(srv)
                r, dt = post(srv.url, {**body, "seed": 7}, timeout)
                st = status(srv)
                emit({"scenario": "scale-to-zero", "freed": freed["freed"], "free_s": round(free_s, 3),
                      "first_request_after_free_s": round(dt, 3), "status": r.status_code,
                      "reload_s": {s: v["reload_s_last"] for s, v in st["stages"].items()},
                      "resident_after_free": {s: v["resident"] for s, v in st_free["stages"].items()},
                      "memory_after_unload": {s: (v["memory"] or {}).get("after_unload") for s, v in
                                              st_free["stages"].items()},
                      "warm_p50_s": next((x["p50_s"] for x in rows if x.get("scenario") == "batch-on"
                                          and x.get("concurrency") == 1), None)})
            del st0
        except Exception as e:  # noqa: BLE001 -- a failed scenario is a row with its error
            emit({"scenario": name, "error": f"{type(e).__name__}: {str(e)[:600]}"})
        finally:
            rc = srv.stop()
            if rc not in (0, None):
                emit({"scenario": name, "error": f"server exit code {rc} after SIGTERM", "log_tail":
                      srv.log.read_text()[-800:]})

    print("\nscenario      conc  images/s   p50 s   p95 s   mean batch  vs bottleneck")
    for r in rows:
        if "concurrency" in r and "images_per_s" in r:
            print(f"{r['scenario']:<13} {r['concurrency']:>4}  {r['images_per_s'] or 0:>8.3f}  {r['p50_s'] or 0:>6.2f}"
                  f"  {r['p95_s'] or 0:>6.2f}   {_num(r.get('denoise_mean_batch')):>10}  "
                  f"{_num(r.get('pipelined_vs_bottleneck')):>6}")
        elif "error" in r:
            print(f"{r['scenario']:<13} error: {r['error'][:100]}")
    print(f"rows: {rows_path}")
    return 0


def _num(v) -> str:
    return "-" if v is None else f"{v:.2f}"


if __name__ == "__main__":
    sys.exit(main())
