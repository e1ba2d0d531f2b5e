"""The Ray Serve host (vramfit/serve/ray_app.py) on a local Ray with no GPU: flux-tiny through HTTP gives the
image `vramfit generate` makes, bit for bit; the job events and bad inputs behave as on the embedded host."""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")
pytestmark = pytest.mark.slow  # a local Ray with four Serve replicas takes over a minute to start on 2 cores

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a lighthouse at dusk"
SEED, STEPS, SIZE = 7, 2, 64
IDLE_S = 5.0  # stage replicas scale to zero after this long idle


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_server():
    from ray import serve

    from vramfit.serve import ray_app

    port = free_port()
    args = argparse.Namespace(model="flux-tiny", weights="random", weights_seed=0, recipe="", vram=None, gpu=None,
                              size=None, steps=None, cap_memory="auto", device="cpu", host="127.0.0.1", port=port,
                              max_queue=8, max_batch=2, idle_unload=IDLE_S, api_key=None)
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(ray_app.build(args), name="vramfit", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_ray_image_is_bit_identical_to_generate(ray_server, tmp_path):
    import httpx

    out = tmp_path / "ref.png"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "vramfit.cli", "generate", PROMPT, "--model", "flux-tiny", "--weights",
                    "random", "--steps", str(STEPS), "--height", str(SIZE), "--width", str(SIZE), "--seed",
                    str(SEED), "--device", "cpu", "--no-progress", "--out", str(out)], check=True, env=env,
                   timeout=300)
    ref = pixels(out.read_bytes())

    r = httpx.post(ray_server + "/v1/images/generations", timeout=300,
                   json={"prompt": PROMPT, "size": f"{SIZE}x{SIZE}", "steps": STEPS, "seed": SEED, "n": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["data"]) == 2 and body["vramfit"]["recipe"]
    got = pixels(base64.b64decode(body["data"][0]["b64_json"]))
    assert got.shape == ref.shape
    assert np.array_equal(got, ref), f"max abs diff {np.abs(got.astype(int) - ref.astype(int)).max()}"
    # image 1 of a request with seed s is `generate --seed s+1`: a different image
    assert not np.array_equal(pixels(base64.b64decode(body["data"][1]["b64_json"])), ref)


def test_ray_jobs_events_and_errors(ray_server):
    import httpx

    with httpx.Client(base_url=ray_server, timeout=120) as c:
        r = c.post("/v1/jobs", json={"prompt": PROMPT, "size": "64x64", "steps": 3, "partial_images": 1,
                                     "response_format": "url"})
        assert r.status_code == 202, r.text
        job = r.json()
        events = []
        with c.stream("GET", job["events"]) as s:
            for line in s.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
                    if events[-1]["type"] in ("done", "error"):
                        break
        kinds = [e["type"] for e in events]
        assert kinds[0] == "queued" and kinds[-1] == "done", kinds
        assert [e["stage"] for e in events if e["type"] == "stage"] == ["encode", "denoise", "decode"]
        assert [(e["i"], e["n"]) for e in events if e["type"] == "step"] == [(1, 3), (2, 3), (3, 3)]
        assert any(e["type"] == "partial" for e in events)
        img = c.get(events[-1]["images"][0])
        assert img.status_code == 200 and pixels(img.content).shape == (64, 64, 3)
        assert c.get(f"/v1/jobs/{job['id']}").json()["state"] == "done"

        for bad, param in (({"prompt": "", "size": "64x64"}, "prompt"), ({"prompt": "x", "size": "65x64"}, "size"),
                           ({"prompt": "x", "n": 11}, "n")):
            r = c.post("/v1/images/generations", json=bad)
            assert r.status_code == 400, (bad, r.text)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert c.post("/v1/images/generations", json={"prompt": "x", "model": "nope"}).status_code == 404
        st = c.get("/v1/status").json()
        assert st["host"] == "ray" and st["num_gpus"] == {"encode": 0, "denoise": 0, "decode": 0}
        assert c.get("/").status_code == 200 and "app.js" in c.get("/").text


def running(status: dict, name: str) -> int:
    return status["deployments"][name]["replicas"].get("RUNNING", 0)


def test_ray_stages_scale_to_zero_and_back(ray_server):
    import time

    import httpx

    with httpx.Client(base_url=ray_server, timeout=300) as c:
        c.post("/v1/images/generations", json={"prompt": PROMPT, "size": "64x64", "steps": 1})
        before = {s: i["pid"] for s, i in c.get("/v1/status").json()["stages"].items()}
        assert set(before) == {"encode", "denoise", "decode"}
        deadline = time.monotonic() + 180
        while True:  # min_replicas 0: idle stages give their replicas (and memory) back
            st = c.get("/v1/status").json()
            if all(running(st, s) == 0 for s in ("encode", "denoise", "decode")):
                break
            assert time.monotonic() < deadline, st["deployments"]
            time.sleep(2)
        assert running(st, "ingress") == 1
        r = c.post("/v1/images/generations", json={"prompt": PROMPT, "size": "64x64", "steps": 1, "seed": 1})
        assert r.status_code == 200, r.text  # the request itself brings the stages back
        after = {s: i["pid"] for s, i in c.get("/v1/status").json()["stages"].items()}
        # new replica processes served it (they may be gone again by now: IDLE_S is short)
        assert all(after[s] != before[s] for s in before), (before, after)
