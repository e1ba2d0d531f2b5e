"""Measurements: wall time with device sync, GPU memory (torch.cuda stats), host RSS, versions, device facts."""

from __future__ import annotations

import gc
import platform
import time
from contextlib import contextmanager
from importlib import metadata

import torch

GB = 1e9
LIBRARIES = ("vramfit", "torch", "diffusers", "transformers", "accelerate", "safetensors", "bitsandbytes",
             "torchao", "optimum-quanto", "gguf")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            continue
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "host": platform.node(), "cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=p.name, total_memory_gb=round(p.total_memory / GB, 2),
                    capability=f"{p.major}.{p.minor}")
        try:
            import subprocess

            drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10).stdout.strip().splitlines()
            if drv:
                info["driver"] = drv[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_RSS_KEYS = {"VmRSS:": "rss_gb", "VmHWM:": "peak_rss_gb", "RssAnon:": "rss_anon_gb", "RssFile:": "rss_file_gb"}


def host_rss_gb() -> dict:
    """Current and peak resident set size of this process, from /proc (Linux). ``rss_anon_gb`` is private memory;
    ``rss_file_gb`` is mapped file pages (a safetensors checkpoint read through mmap): clean page cache the OS may
    drop under pressure, counted in RSS all the same."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = _RSS_KEYS.get(line.split(maxsplit=1)[0]) if line.strip() else None
                if key:
                    out[key] = round(int(line.split()[1]) * 1024 / GB, 3)
    except OSError:
        import resource

        out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 3)
    return out


_LIBC = None


def release_host_heap() -> float | None:
    """Give the host heap's free pages back to the OS (glibc ``malloc_trim(0)``; None where there is no glibc) and
    return the GB of RSS that left. Tensors under glibc's mmap threshold (at most 32 MB: FLUX's 3072x3072 bf16
    weights, every NF4 tensor) live on the heap, and freeing them leaves holes that stay in RSS: the streamed
    stand-in's draw -> quantize -> pack churn held ~5 GB beyond its pinned store on the H200 (NF4 3 GB row,
    2026-12-02: 16.1 GB after load for 9.95 GB pinned + 1.15 GB of process); a CPU replay of the churn (FLUX
    block shapes, 2.96 GB packed) held 3.2 GB extra, and ``malloc_trim(0)`` returned all of it."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - AttributeError where the C library has no malloc_trim
        except (OSError, AttributeError):
            _LIBC = False
    if not _LIBC:
        return None
    before = host_rss_gb().get("rss_gb")
    _LIBC.malloc_trim(0)
    after = host_rss_gb().get("rss_gb")
    return round(before - after, 3) if before is not None and after is not None else None


def cap_memory(fraction: float, device: torch.device) -> None:
    """``torch.cuda.set_per_process_memory_fraction`` for ``device`` ("cuda" alone is refused by torch: it wants an
    index; found by the H200 serve run of 2026-12-02, whose stage workers died at start)."""
    device = torch.device(device)
    torch.cuda.set_per_process_memory_fraction(min(1.0, fraction), device.index if device.index is not None
                                               else torch.cuda.current_device())


def free_memory(device: torch.device) -> None:
    """Memory is not freed while references remain: callers drop theirs first; this collects and releases."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


class Memory:
    """GPU memory counters for one device: snapshots and per-stage peaks (allocated and reserved)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def now(self) -> dict:
        d = {}
        if self.cuda:
            d = {"allocated_gb": round(torch.cuda.memory_allocated(self.device) / GB, 3),
                 "reserved_gb": round(torch.cuda.memory_reserved(self.device) / GB, 3)}
        d.update(host_rss_gb())
        return d

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> dict:
        d = {}
        if self.cuda:
            d = {"peak_allocated_gb": round(torch.cuda.max_memory_allocated(self.device) / GB, 3),
                 "peak_reserved_gb": round(torch.cuda.max_memory_reserved(self.device) / GB, 3)}
        d.update(host_rss_gb())
        return d


@contextmanager
def stage(device: torch.device, memory: Memory, record: dict, name: str):
    """Time a stage (synchronised) and record its memory peak under ``record[name]``."""
    sync(device)
    memory.reset_peak()
    t0 = time.perf_counter()
    out = {}
    record[name] = out
    try:
        yield out
    finally:
        sync(device)
        out["s"] = round(time.perf_counter() - t0, 4)
        out.update(memory.peak())


# ----------------------------------------------------------------------------------------------------------
# where a generation's kernel time goes (the speed path's per-step breakdown)

KERNEL_CLASSES = ("by kernel name: linear = gemm/mm/matmul/scaled_mm/cutlass/cublas/triton mm templates; "
                  "attention = flash/fmha/sdpa/attention/cudnn mha; other = the rest (norms, rope, activations, "
                  "quantize/cast, fused pointwise). One whole generation (steps + encode + decode) divided by the "
                  "step count")


def kernel_class(name: str) -> str:
    """linear / attention / other by kernel name. Inductor's generated pointwise and reduction kernels
    (``triton_poi_``, ``triton_red_``, ``triton_per_``) are named after every op fused into them, so a kernel that
    computes fp8dq's activation scales is called ``triton_red_fused__scaled_mm_..._amax...``: they are "other"
    whatever they are named after (session 10 on the H200 counted 24 ms/step of them as linear and attention).
    Only its matmul templates (``triton_tem_``) are linear."""
    n = name.lower()
    if n.startswith("triton_") and not n.startswith("triton_tem"):
        return "other"
    if any(k in n for k in ("flash", "fmha", "sdpa", "attention", "attn", "mha")):
        return "attention"
    if any(k in n for k in ("gemm", "scaled_mm", "matmul", "cutlass", "cublas", "_mm", "addmm", "aten::mm",
                            "aten::bmm", "sm90_xmma", "nvjet", "triton_tem")):
        return "linear"
    return "other"


def profile_generation(generate, device: torch.device, steps: int) -> dict:
    """Run ``generate()`` once under torch.profiler: kernel time (CUDA on a GPU, CPU ops otherwise) per class per
    step, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        generate()
    wall = time.perf_counter() - t0
    classes = {"linear": 0.0, "attention": 0.0, "other": 0.0}
    top: dict[str, float] = {}
    for ev in prof.key_averages():
        t = (ev.self_device_time_total if device.type == "cuda" else ev.self_cpu_time_total) / 1e6
        if t <= 0 or (device.type == "cuda" and ev.device_type != torch.autograd.DeviceType.CUDA):
            continue
        classes[kernel_class(ev.key)] += t
        top[ev.key[:120]] = top.get(ev.key[:120], 0.0) + t
    return {"device": str(device), "steps_profiled": steps, "encode_decode_included": True,
            "s_per_step": {k: round(v / steps, 5) for k, v in classes.items()},
            "total_kernel_s": round(sum(classes.values()), 4), "profiled_wall_s": round(wall, 4),
            "top_kernels_s": dict(sorted(top.items(), key=lambda kv: -kv[1])[:15]), "classes": KERNEL_CLASSES}
