"""Data the planner reads: budgets, the calibration (calibration/calibration.json), GPU profiles (gpus.json),
host memory, and the request shape."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import InputError

GB = 1e9
HERE = Path(__file__).resolve().parent.parent
CALIBRATION_FILE = HERE / "calibration" / "calibration.json"
GPUS_FILE = HERE / "gpus.json"
STAGES = {"encode": ("text_encoder", "text_encoder_2"), "denoise": ("transformer",), "decode": ("vae",)}
COMPONENTS = ("text_encoder", "text_encoder_2", "transformer", "vae")
PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# GGUF (values per block, bytes per block), as ggml defines them (same table as quant._gguf_specs)
GGUF_BLOCKS = {"q8_0": (32, 34), "q5_1": (32, 24), "q5_0": (32, 22), "q4_1": (32, 20), "q4_0": (32, 18),
               "q6_k": (256, 210), "q5_k": (256, 176), "q4_k": (256, 144), "q3_k": (256, 110), "q2_k": (256, 84),
               "bf16": (1, 2), "f16": (1, 2)}
PCIE_GBPS_PER_LANE = {3: 0.985, 4: 1.969, 5: 3.938}  # theoretical, after 128b/130b encoding


# ----------------------------------------------------------------------------------------------------------
# budgets


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(gb|gib|mb|mib|tb|tib|g|m)\s*$", re.I)
_UNIT = {"gb": 1e9, "g": 1e9, "gib": 2**30, "mb": 1e6, "m": 1e6, "mib": 2**20, "tb": 1e12, "tib": 2**40}


def parse_size(text: str, what: str = "--vram") -> float | None:
    """'8GB', '8 GiB', '24000MB' -> GB (1e9 bytes); 'auto' -> None."""
    if text is None:
        return None
    if text.strip().lower() == "auto":
        return None
    m = _SIZE.match(str(text))
    if not m:
        raise InputError(f"{what} {text!r}: give a size with a unit, e.g. 8GB, 8 GiB, 24000MB, or auto")
    value = float(m.group(1)) * _UNIT[m.group(2).lower()] / GB
    if value <= 0:
        raise InputError(f"{what} {text!r}: must be more than zero")
    return value


# ----------------------------------------------------------------------------------------------------------
# data: calibration and GPU profiles


_OVERRIDE: list[dict] = []  # calibrations in use instead of the file (derive, leave-one-out)


@lru_cache(maxsize=None)
def _calibration_file() -> dict:
    return json.loads(CALIBRATION_FILE.read_text())


def calibration() -> dict:
    """The constants every prediction reads: the committed file, or the one ``using_calibration`` put in place."""
    return _OVERRIDE[-1] if _OVERRIDE else _calibration_file()


class using_calibration:
    """``with using_calibration(cal): ...`` -- predict with ``cal`` (a dict shaped like calibration.json) instead of
    the committed file; ``benchmarks/derive_calibration.py`` fits constants this way, ``plan --check`` refits."""

    def __init__(self, cal: dict):
        self.cal = cal

    def __enter__(self):
        _OVERRIDE.append(self.cal)
        return self.cal

    def __exit__(self, *exc):
        _OVERRIDE.remove(self.cal)


@lru_cache(maxsize=None)
def gpu_table() -> list[dict]:
    return json.loads(GPUS_FILE.read_text())["gpus"]


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower().replace("nvidia", "").replace("geforce", ""))


def find_gpu(name: str) -> dict | None:
    key = _norm(name)
    for g in gpu_table():
        if key in {_norm(a) for a in [g["name"], *g.get("aliases", [])]}:
            return g
    return None


def gpu_profile(name: str) -> dict:
    """A named profile (gpus.json) with realistic rates filled in: dense matmul = spec x the fraction measured
    on the reference GPU, pinned copy = PCIe theoretical x the measured fraction (unless measured)."""
    g = find_gpu(name)
    if g is None:
        names = ", ".join(g["aliases"][0] if g.get("aliases") else g["name"] for g in gpu_table())
        raise InputError(f"--gpu {name!r}: no such GPU profile; known: {names}, or 'local' to probe this machine")
    return _realize(g)


def _realize(g: dict) -> dict:
    cal = calibration()["reference_gpu"]
    prof = {"profile": g["name"], "vram_gb": g["vram_gb"], "capability": g.get("capability"),
            "source": g.get("source", ""), "assumed": []}
    if g.get("tflops"):  # measured on the machine
        prof["tflops"] = dict(g["tflops"])
    else:
        prof["tflops"] = {k: (None if v is None else round(v * cal["matmul_fraction_of_spec"].get(k, 0.75), 1))
                          for k, v in g["tflops_spec"].items()}
        prof["assumed"].append("dense rates = spec x fraction measured on the reference GPU")
    if g.get("h2d_pinned_gbps"):
        prof["h2d_pinned_gbps"] = g["h2d_pinned_gbps"]
        prof["h2d_pageable_gbps"] = g["h2d_pageable_gbps"]
    else:
        link = g["link"]
        theo = PCIE_GBPS_PER_LANE[link["pcie_gen"]] * link["lanes"]
        prof["h2d_pinned_gbps"] = round(theo * cal["link_fraction_pinned"], 1)
        prof["h2d_pageable_gbps"] = round(prof["h2d_pinned_gbps"] * cal["pageable_over_pinned"], 1)
        prof["assumed"].append("host link = PCIe theoretical x fractions measured on the reference GPU")
    prof["host_ram_gb"] = g.get("host_ram_gb")  # typical host RAM of such a machine: an assumption (gpus.json)
    return prof


def host_ram_gb() -> float | None:
    """This machine's physical memory in GB (psutil, else /proc/meminfo); None where neither answers."""
    try:
        import psutil

        return round(psutil.virtual_memory().total / GB, 1)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) * 1024 / GB, 1)
    except OSError:
        pass
    return None


def ram_budget(prof: dict, ram_gb: float | None) -> tuple[float | None, str]:
    """(host RAM budget GB, where it came from): ``--ram`` if given; for this machine (a probed profile, or a
    profile named for the machine it runs on) its memory; for a named profile the typical host RAM it carries
    (assumed)."""
    if ram_gb is not None:
        return ram_gb, "--ram"
    if prof.get("local"):
        have = prof.get("host_ram_gb") or host_ram_gb()
        return have, "this machine's RAM"
    if prof.get("host_ram_gb"):
        return prof["host_ram_gb"], "assumed typical host RAM of a " + prof["profile"] + " machine (--ram overrides)"
    have = host_ram_gb()
    return have, "this machine's RAM (the profile names none)"


def local_profile(refresh: bool = False) -> dict:
    import torch

    from .. import probe

    if not torch.cuda.is_available():
        raise InputError("--gpu local needs a CUDA GPU on this machine; name a profile instead (--gpu 4090, ...)")
    p = probe.probe(torch.device("cuda"), refresh=refresh)
    return profile_from_probe(p)


def profile_from_probe(p: dict) -> dict:
    known = find_gpu(p["name"])
    return {"profile": p["name"] + " (probed)", "vram_gb": p["vram_total_gb"], "vram_free_gb": p.get("vram_free_gb"),
            "capability": known.get("capability") if known else None, "tflops": dict(p["tflops"]),
            "h2d_pinned_gbps": p["h2d_pinned_gbps"], "h2d_pageable_gbps": p["h2d_pageable_gbps"],
            "host_ram_gb": p.get("host_ram_gb"), "source": f"measured {p.get('measured_at', '')}", "assumed": [],
            "local": True}


@dataclass(frozen=True)
class Shape:
    height: int = 1024
    width: int = 1024
    steps: int = 28
    batch: int = 1
    text_tokens: int = 512
    images: int = 1  # the planning horizon: images one process makes (the cold start is paid once)

    @property
    def img_tokens(self) -> int:
        return (self.height // 16) * (self.width // 16)

    @property
    def mpix(self) -> float:
        return self.height * self.width / 1e6


def _config(model: str, component: str) -> dict:
    from .. import models

    return models.get_model(model).config(component)



# ----------------------------------------------------------------------------------------------------------
# how the planner reads a recipe (one place, so grammar changes land here)


def vae_decode(recipe) -> str:
    """none | tiling | slicing (``recipe.vae_decode``; older Recipes called the field ``vae_mode``)."""
    return getattr(recipe, "vae_decode", None) or getattr(recipe, "vae_mode", "none")


def offload_kind(recipe) -> str:
    """The offload strategy without its parameter: 'stream' for offload=stream and offload=stream:K."""
    return str(recipe.offload).split(":")[0]


def stream_k(recipe) -> int | None:
    """K of offload=stream:K; None for offload=stream (K from the budget) and other strategies."""
    o = str(recipe.offload)
    return int(o.split(":", 1)[1]) if o.startswith("stream:") else None


def compile_scope(recipe) -> str:
    """off | regional | full: compile=full+autotune+graphs costs what compile=full costs here."""
    return getattr(recipe, "compile_scope", None) or str(recipe.compile).split("+")[0]


# offload=stream constants until GPU rows measure them (derive_calibration fits them from stream rows)
STREAM_ASSUMED = {
    "slots": 2, "link_fraction_of_pinned": 1.0, "per_block_s": 5e-5,
    "source": "assumed: copies from pinned memory on a side stream run at the probe's pinned rate while compute "
              "runs (no offload=stream row measured yet); 50 us per streamed block for events and rebinding",
}


def stream_constants() -> dict:
    return calibration().get("stream") or STREAM_ASSUMED


def _stamp(row: dict) -> str | None:
    """The UTC time a row was measured: its ``at`` field, or the ``@ TIME`` device_stream.py puts in ``command``."""
    at = row.get("at")
    if isinstance(at, str) and at[:2] == "20":
        return at
    cmd = row.get("command")
    if isinstance(cmd, str) and " @ " in cmd:
        return cmd.rsplit(" @ ", 1)[1].strip()
    return None
