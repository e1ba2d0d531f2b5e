"""Input checks shared by every entry point (CLI commands, bench scenario files, the HTTP layer).

Each check is cheap (no model is loaded; tokenizing a prompt is the most it does) and runs before any heavy
work. A bad value raises InputError naming the fix; a value that is allowed but changed or risky comes back
as a warning line for the caller to print (CLI) or return (API).
"""

from __future__ import annotations

import math
import os
import tempfile
from functools import lru_cache
from pathlib import Path

from .errors import InputError

# torch.Generator.manual_seed takes any 64-bit value; image i of a request uses seed s+i, and the record keeps
# seeds as JSON integers, so seeds stay in the signed 64-bit range everywhere.
SEED_MAX = 2**63 - 1
# FLUX's scheduler is trained on 1000 timesteps: more inference steps than that only repeat timesteps.
STEPS_MAX = 1000
GUIDANCE_MAX = 100.0
IMAGES_MAX = 1000  # --n: images per prompt in one process
BUDGET_MAX_GB = 100_000.0


def check_number(name: str, value, lo=None, hi=None, integer: bool = False):
    """``value`` if it is a finite number (an int when ``integer``) within [lo, hi]; else InputError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{name} {value!r}: must be a number")
    if integer and not isinstance(value, int):
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        else:
            raise InputError(f"{name} {value!r}: must be a whole number")
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{name} {value!r}: must be a finite number"
                         + (f" in {_fmt(lo)}..{_fmt(hi)}" if lo is not None and hi is not None else ""))
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if lo is not None and hi is not None:
            rng = f"in {_fmt(lo)}..{_fmt(hi)}"
        elif lo is not None:
            rng = f">= {_fmt(lo)}"
        else:
            rng = f"<= {_fmt(hi)}"
        raise InputError(f"{name} {value!r}: must be {rng}")
    return value


def _fmt(x) -> str:
    return "2**63-1" if x == SEED_MAX else str(x)


def largest_size(max_pixels: int, height: int, width: int) -> tuple[int, int]:
    """The largest height x width (multiples of 16) with this aspect ratio inside ``max_pixels``."""
    scale = math.sqrt(max_pixels / (height * width))
    h, w = max(16, int(height * scale) // 16 * 16), max(16, int(width * scale) // 16 * 16)
    return h, w


def check_size(spec, height, width, allow_large: bool = False) -> list[str]:
    """Height and width: positive multiples of 16 (FLUX packs 2x2 patches of an 8x smaller latent), and at most
    the model's ``max_pixels`` unless ``allow_large`` (then a warning). Returns the warnings."""
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % 16:
            raise InputError(f"--{name} {v!r}: must be a positive multiple of 16 (FLUX packs 2x2 latent patches of "
                             f"an 8x downsampled image)")
    if spec is None:
        return []
    pixels, limit = height * width, spec.max_pixels
    if pixels <= limit:
        return []
    h, w = largest_size(limit, height, width)
    what = (f"{height}x{width} is {pixels / 1e6:.2f} MP; {spec.name} allows at most {limit / 1e6:.2f} MP "
            f"(largest at this aspect ratio: {h}x{w})")
    if not allow_large:
        raise InputError(f"{what}. Give a smaller --height/--width, or --allow-large to run it anyway")
    return [f"{what}; going ahead (--allow-large): expect much more memory and time, and images outside what "
            f"the model was trained for"]


@lru_cache(maxsize=8)
def _tokenizers(spec_name: str, weights):
    from . import models

    spec = models.get_model(spec_name)
    try:
        return models.load_tokenizers(spec, weights)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the tokenizers of {weights.path or spec.name} to check the prompt "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Alternative: "
                         f"--weights random, or a local diffusers-format directory") from None


def check_prompt(spec, weights, prompt, strict: bool = False) -> tuple[str, list[str]]:
    """Count the prompt's tokens with the model's own tokenizers (the checkpoint's, or the stand-in's for
    ``--weights random``). Returns the prompt as the T5 encoder will read it and warnings for what is cut off:
    T5 reads ``spec.max_sequence_length`` tokens (an error with ``strict``); CLIP reads its 77 (as diffusers does;
    only the pooled embedding comes from CLIP, so this is a note, never an error)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("the prompt is empty; give a text prompt")
    clip, t5 = _tokenizers(spec.name, weights)
    warnings = []
    limit = spec.max_sequence_length
    ids = t5(prompt, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    seen = prompt
    if len(ids) > limit:
        dropped = len(ids) - limit
        if strict:
            raise InputError(f"the prompt is {len(ids)} T5 tokens; {spec.name} reads {limit}: {dropped} would be "
                             f"dropped (--strict). Shorten the prompt, or drop --strict to let it be cut")
        warnings.append(f"prompt is {len(ids)} T5 tokens; the model reads {limit}: {dropped} dropped")
        # the same cut diffusers makes: the first limit-1 tokens, then the end-of-sequence token
        seen = t5.decode(ids[: limit - 1], skip_special_tokens=True)
    clip_limit = clip.model_max_length
    clip_ids = clip(prompt, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    if len(clip_ids) > clip_limit:
        warnings.append(f"prompt is {len(clip_ids)} CLIP tokens; CLIP reads {clip_limit} (as in diffusers, for the "
                        f"pooled embedding only): {len(clip_ids) - clip_limit} dropped there")
    return seen, warnings


def check_out_path(path, suffix: str) -> Path:
    """An output file we will be able to write: the suffix, not a directory, and its directory creatable and
    writable -- checked by creating it and a temporary file there, then removing both, so nothing is left."""
    p = Path(path)
    if p.suffix.lower() != suffix:
        raise InputError(f"--out {str(path)!r}: must end in {suffix}")
    if p.is_dir():
        raise InputError(f"--out {str(path)!r} is a directory; give a file name ending in {suffix}")
    if p.exists() and not os.access(p, os.W_OK):
        raise InputError(f"--out {str(path)!r}: the file exists and is not writable; choose another path")
    try_write(p.parent if str(p.parent) else Path("."), f"--out {str(path)!r}")
    return p


def try_write(directory: Path, what: str) -> None:
    """Create ``directory`` (and any missing parents) and a temporary file in it, then remove what was made:
    InputError naming the path if either fails. Permissions alone do not tell (read-only mounts, /proc, quotas)."""
    made: list[Path] = []
    try:
        missing = []
        d = directory
        while not d.exists():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            d.mkdir()
            made.append(d)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".vramfit-", suffix=".probe")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise InputError(f"{what}: cannot write there ({e.strerror or e}: {e.filename or directory}). "
                         f"Give a path in a writable directory") from None
    finally:
        for d in reversed(made):
            try:
                d.rmdir()
            except OSError:
                pass
