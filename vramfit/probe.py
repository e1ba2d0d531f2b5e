"""Machine profile: what this GPU and host can do, measured (memory, host->GPU bandwidth, matrix throughput).

The result is cached in the user cache directory, keyed by GPU name and driver, so planning does not
re-measure. ``--gpu NAME`` profiles for GPUs you don't have ship as data in ``gpus.json``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from . import measure

GB = 1e9


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vramfit"


def _time_cuda(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def host_to_device_gbps(device, nbytes: int = 1 << 30, pinned: bool = True) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    s = _time_cuda(lambda: dst.copy_(src, non_blocking=pinned), 5)
    return nbytes / s / GB


def matmul_tflops(device, dtype: str, n: int = 8192) -> float | None:
    """Dense matrix product rate on random data for one compute dtype; None where the GPU lacks it."""
    try:
        if dtype in ("bf16", "fp16"):
            dt = torch.bfloat16 if dtype == "bf16" else torch.float16
            a = torch.randn(n, n, device=device, dtype=dt)
            b = torch.randn(n, n, device=device, dtype=dt)
            s = _time_cuda(lambda: a @ b, 10)
        elif dtype == "fp8":
            a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
            b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()
            one = torch.ones((), device=device)
            s = _time_cuda(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), 10)
        elif dtype == "int8":
            a = torch.randint(-128, 127, (n, n), device=device, dtype=torch.int8)
            b = torch.randint(-128, 127, (n, n), device=device, dtype=torch.int8)
            s = _time_cuda(lambda: torch._int_mm(a, b), 10)
        else:
            raise ValueError(dtype)
    except (RuntimeError, NotImplementedError):
        return None
    return 2 * n**3 / s / 1e12


def host_ram_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 / GB
    except OSError:
        return None
    return None


def measure_profile(device: torch.device) -> dict:
    if device.type != "cuda":
        raise RuntimeError("probing needs a CUDA GPU; use --gpu NAME to plan for a GPU profile shipped as data")
    p = torch.cuda.get_device_properties(device)
    free, total = torch.cuda.mem_get_info(device)
    prof = {
        "name": p.name,
        "source": "measured",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "driver": measure.device_info(device).get("driver"),
        "vram_total_gb": round(total / GB, 2),
        "vram_free_gb": round(free / GB, 2),
        "host_ram_gb": round(host_ram_gb() or 0.0, 1),
        "h2d_pinned_gbps": round(host_to_device_gbps(device, pinned=True), 1),
        "h2d_pageable_gbps": round(host_to_device_gbps(device, pinned=False), 1),
        "tflops": {d: (round(v, 1) if v else None) for d in ("bf16", "fp16", "fp8", "int8")
                   for v in [matmul_tflops(device, d)]},
        "versions": measure.versions(),
    }
    torch.cuda.empty_cache()
    return prof


def probe(device: torch.device, refresh: bool = False) -> dict:
    p = torch.cuda.get_device_properties(device)
    key = f"{p.name}-{measure.device_info(device).get('driver', 'nodriver')}".replace(" ", "_").replace("/", "_")
    path = cache_dir() / f"probe-{key}.json"
    if path.exists() and not refresh:
        prof = json.loads(path.read_text())
        free, _ = torch.cuda.mem_get_info(device)
        prof["vram_free_gb"] = round(free / GB, 2)  # free memory changes; re-read it
        prof["cached"] = str(path)
        return prof
    prof = measure_profile(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(prof, indent=2) + "\n")
    prof["cached"] = str(path)
    return prof
