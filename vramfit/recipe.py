"""The Recipe: one typed description of how a pipeline runs, parsed from and printed to one string.

Grammar: comma-separated ``key=value`` items, plus preset names (items without ``=``) that expand to their
items in place. Items apply left to right and a later item overrides an earlier one, presets included
(``fp16,bf16`` is bf16 everywhere); a single item that contradicts itself (``compile=full+regional``) is an
error. Keys:

* a component (``transformer``, ``text_encoder``, ``text_encoder_2``, ``vae``) = a precision or a
  quantization value (``bf16`` ``fp16`` ``fp32`` ``bnb-nf4`` ``torchao-int8wo`` ``gguf-q4_1`` ...);
* ``vae_decode`` = none | tiling | slicing (the VAE's decode mode; the older ``vae=tiling`` still parses and
  prints in the new form);
* ``offload`` = none | model | sequential | group-block | group-leaf | staged | stream | stream:K
  (``stream``: K resident blocks chosen from the budget, K=0 without one; ``stream:K``: exactly K);
* ``compile`` = off | regional | full, optionally followed by ``+graphs`` (CUDA graphs), ``+autotune``
  (inductor max-autotune), ``+cdtune`` / ``+nocdtune`` (inductor's coordinate-descent tuning of its Triton
  kernels on / off: torchao's recommended flags, which its configs set process-wide by default; vramfit applies
  them itself, recorded, only with ``+cdtune``: on the H200 they cost fp8dq + regional 185 s of compile for a 1 %
  faster step; ``+nocdtune`` says the default), ``+atengemm`` (with ``+autotune``: its GEMM search limited to
  ATen's kernels, ``max_autotune_gemm_backends="ATEN"``; the pointwise autotuning, CUDA graphs and flags stay. On the
  H200 the full fp8 GEMM search took 12-91 s per shape, 106 choices each; ATen's ``_scaled_mm`` won 4 of the
  7 shapes it reached, the one per-block shape among them by 10 %), e.g. ``compile=full+autotune+graphs``;
* ``attention`` = a diffusers attention backend name (``native`` is diffusers' default);
* ``compile_vae`` = off | on; ``fuse_qkv`` = off | on; ``host_sync`` = keep | avoid (avoid: the scheduler's
  begin index is set before the loop, which removes a host sync per step);
* ``cache`` = none | fbc:THRESHOLD | taylorseer:INTERVAL | magcache:THRESHOLD (diffusers' step caches).

``str(recipe)`` is the expanded canonical string that every run records: the eight classic keys always, the
speed-path keys (``compile_vae``, ``fuse_qkv``, ``cache``, ``host_sync``) only when they differ from the default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from .errors import RecipeError

COMPONENT_KEYS = ("transformer", "text_encoder_2", "text_encoder", "vae")
PRECISIONS = ("bf16", "fp16", "fp32")
QUANT_VALUES = (
    "bnb-nf4", "bnb-fp4", "bnb-int8",
    "torchao-int8wo", "torchao-int4wo", "torchao-fp8wo", "torchao-fp8dq", "torchao-fp8dq-tensor", "torchao-int8dq",
    "quanto-int8", "quanto-int4", "quanto-fp8",
    "fp8-layerwise", "fp8-layerwise-e5m2",
    "gguf-q8_0", "gguf-q6_k", "gguf-q5_k", "gguf-q5_1", "gguf-q5_0", "gguf-q4_k", "gguf-q4_1", "gguf-q4_0",
    "gguf-q3_k", "gguf-q2_k", "gguf-bf16", "gguf-f16",
)
# offload kinds; ``stream`` also takes ``stream:K``
OFFLOADS = ("none", "model", "sequential", "group-block", "group-leaf", "staged", "stream")
COMPILES = ("off", "regional", "full")  # compile scopes; ``+graphs`` / ``+autotune`` are flags on a scope
COMPILE_FLAGS = ("graphs", "autotune", "cdtune", "nocdtune", "atengemm")
VAE_MODES = ("none", "tiling", "slicing")
SWITCHES = ("off", "on")
HOST_SYNC = ("keep", "avoid")
CACHES = ("fbc", "taylorseer", "magcache")

PRESETS: dict[str, str] = {
    "bf16": "transformer=bf16,text_encoder_2=bf16,text_encoder=bf16,vae=bf16",
    "fp16": "transformer=fp16,text_encoder_2=fp16,text_encoder=fp16,vae=fp16",
    "model-offload": "offload=model",
    "sequential-offload": "offload=sequential",
    "group-offload": "offload=group-block",
    "staged": "offload=staged",
    "stream": "offload=stream",
    "compiled": "compile=regional",
    "nf4": "transformer=bnb-nf4,text_encoder_2=bnb-nf4",
    "nf4+model-offload": "transformer=bnb-nf4,text_encoder_2=bnb-nf4,offload=model",
    "nf4+stream": "transformer=bnb-nf4,text_encoder_2=bnb-nf4,offload=stream",
    "int8": "transformer=bnb-int8,text_encoder_2=bnb-int8",
    "fp8-layerwise": "transformer=fp8-layerwise,text_encoder_2=fp8-layerwise",
    "fp8-layerwise+group-offload": "transformer=fp8-layerwise,text_encoder_2=fp8-layerwise,offload=group-block",
    "torchao-fp8": "transformer=torchao-fp8dq,text_encoder_2=torchao-fp8wo,compile=full",
}


@dataclass(frozen=True)
class Recipe:
    transformer: str = "bf16"
    text_encoder_2: str = "bf16"
    text_encoder: str = "bf16"
    vae: str = "bf16"
    vae_decode: str = "none"
    offload: str = "none"
    compile: str = "off"
    attention: str = "native"
    compile_vae: str = "off"
    fuse_qkv: str = "off"
    cache: str = "none"
    host_sync: str = "keep"

    # ------------------------------------------------------------------ parse / print
    @classmethod
    def parse(cls, text: str | None) -> "Recipe":
        if text is None or not text.strip():
            return cls()
        values: dict[str, str] = {}
        for field_name, value in _items(text):
            values[field_name] = value  # later items override earlier ones
        recipe = cls(**{**cls().as_dict(), **values})
        recipe.validate()
        return recipe

    def __str__(self) -> str:
        parts = [f"{k}={getattr(self, k)}" for k in COMPONENT_KEYS]
        parts += [f"vae_decode={self.vae_decode}", f"offload={self.offload}", f"compile={self.compile}",
                  f"attention={self.attention}"]
        default = Recipe()
        parts += [f"{k}={getattr(self, k)}" for k in EXTRA_KEYS if getattr(self, k) != getattr(default, k)]
        return ",".join(parts)

    def as_dict(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def changed(self) -> dict[str, str]:
        default = Recipe()
        return {k: v for k, v in self.as_dict().items() if getattr(default, k) != v}

    def with_(self, **kw) -> "Recipe":
        r = replace(self, **kw)
        r.validate()
        return r

    # ------------------------------------------------------------------ queries
    @property
    def components(self) -> dict[str, str]:
        return {k: getattr(self, k) for k in COMPONENT_KEYS}

    def quantized(self) -> dict[str, str]:
        return {k: v for k, v in self.components.items() if v not in PRECISIONS}

    @property
    def offload_kind(self) -> str:
        """``stream`` for ``stream`` and ``stream:K``; otherwise the offload value itself."""
        return self.offload.partition(":")[0]

    @property
    def stream_k(self) -> int | None:
        """K of ``offload=stream:K``; None for plain ``stream`` (K from the budget) and every other offload."""
        kind, _, k = self.offload.partition(":")
        return int(k) if kind == "stream" and k else None

    @property
    def compile_scope(self) -> str:
        return self.compile.split("+")[0]

    @property
    def compile_graphs(self) -> bool:
        return "graphs" in self.compile.split("+")[1:]

    @property
    def compile_autotune(self) -> bool:
        return "autotune" in self.compile.split("+")[1:]

    @property
    def compile_atengemm(self) -> bool:
        return "atengemm" in self.compile.split("+")[1:]

    @property
    def compile_cdtune(self) -> bool | None:
        """True for +cdtune, False for +nocdtune, None when the recipe does not say (vramfit's default: off)."""
        flags = self.compile.split("+")[1:]
        return True if "cdtune" in flags else False if "nocdtune" in flags else None

    @property
    def cache_kind(self) -> str:
        return self.cache.partition(":")[0]

    @property
    def cache_param(self) -> float | int | None:
        kind, _, p = self.cache.partition(":")
        if not p:
            return None
        return int(p) if kind == "taylorseer" else float(p)

    def validate(self) -> None:
        """Combinations that contradict themselves whatever the machine. Machine-dependent refusals (needs a GPU,
        library missing) are made by ``apply.check``."""
        for comp, value in self.components.items():
            if value.startswith("gguf-") and comp != "transformer":
                raise RecipeError(
                    f"{comp}={value}: GGUF files hold a FLUX transformer only. Alternative: "
                    f"{comp}=bnb-nf4 or {comp}=quanto-int8 for the {comp}"
                )
        if self.vae not in PRECISIONS and self.vae not in ("fp8-layerwise", "fp8-layerwise-e5m2"):
            raise RecipeError(
                f"vae={self.vae}: the VAE is 84 M parameters (0.17 GB in bf16) and its convolutions are not "
                f"covered by the quantization backends. Alternative: vae=bf16 with vae_decode=tiling to cut decode memory"
            )
        if self.compile_scope == "off" and self.compile != "off":
            raise RecipeError(f"compile={self.compile}: +graphs/+autotune need a compile scope. Alternative: "
                              f"compile=regional+{self.compile.partition('+')[2]} or compile=full+"
                              f"{self.compile.partition('+')[2]}")


EXTRA_KEYS = ("compile_vae", "fuse_qkv", "cache", "host_sync")
KEYS = (*COMPONENT_KEYS, "vae_decode", "offload", "compile", "attention", *EXTRA_KEYS)


def _items(text: str):
    """Yield (field, value) for every item of ``text`` in order, presets expanded in place."""
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise RecipeError(f"empty item in recipe {text!r} (two commas in a row?)")
        if "=" not in item:
            if item not in PRESETS:
                raise RecipeError(
                    f"unknown preset {item!r}; presets: {', '.join(PRESETS)}; or use key=value items "
                    f"with keys {', '.join(KEYS)}"
                )
            yield from _items(PRESETS[item]) if PRESETS[item] else ()
            continue
        key, _, value = (s.strip() for s in item.partition("="))
        if "=" in value:
            raise RecipeError(f"recipe item {item!r} has two '='; write one key=value per item, separated by commas")
        yield _field_for(key, value), value


def _field_for(key: str, value: str) -> str:
    """Map one ``key=value`` item to the dataclass field it sets, validating the value."""
    if key in COMPONENT_KEYS:
        if key == "vae" and value in VAE_MODES:
            return "vae_decode"  # the older form of vae_decode=...
        if value in PRECISIONS or value in QUANT_VALUES:
            return key
        extra = f" (or a decode mode with vae_decode=: {', '.join(VAE_MODES)})" if key == "vae" else ""
        raise RecipeError(
            f"{key}={value!r} is not a valid value; choose a precision ({', '.join(PRECISIONS)}) or a "
            f"quantization ({', '.join(QUANT_VALUES)}){extra}"
        )
    if key == "vae_decode":
        _choice(key, value, VAE_MODES)
    elif key == "offload":
        kind, colon, k = value.partition(":")
        if kind == "stream" and colon:
            if not k.isdigit():
                raise RecipeError(f"offload={value!r}: K in stream:K is the number of resident blocks, an integer "
                                  f">= 0 (e.g. stream:8); or plain offload=stream to choose K from the budget")
        else:
            _choice(key, value, OFFLOADS, extra=" (stream also takes stream:K)")
    elif key == "compile":
        scope, *flags = value.split("+")
        _choice(key, scope, COMPILES, extra=", optionally +graphs, +autotune, +cdtune or +nocdtune, +atengemm (e.g. full+autotune+graphs)")
        for f in flags:
            if f in COMPILES:
                raise RecipeError(f"compile={value!r} names two compile scopes ({scope} and {f}); choose one")
            if f not in COMPILE_FLAGS:
                raise RecipeError(f"compile={value!r}: unknown flag {f!r}; flags: {', '.join(COMPILE_FLAGS)}")
        if len(set(flags)) != len(flags):
            raise RecipeError(f"compile={value!r} repeats a flag")
        if "cdtune" in flags and "nocdtune" in flags:
            raise RecipeError(f"compile={value!r} asks for coordinate-descent tuning on and off; keep one of "
                              "+cdtune / +nocdtune")
        if "atengemm" in flags and "autotune" not in flags:
            raise RecipeError(f"compile={value!r}: +atengemm limits max-autotune's GEMM search, so it needs +autotune. "
                              f"Alternative: compile={value.replace('+atengemm', '')}+autotune+atengemm, or drop "
                              "+atengemm (without +autotune GEMMs are ATen's already)")
    elif key in ("compile_vae", "fuse_qkv"):
        _choice(key, value, SWITCHES)
    elif key == "host_sync":
        _choice(key, value, HOST_SYNC)
    elif key == "cache":
        _check_cache(value)
    elif key == "attention":
        valid = attention_backends()
        if value not in valid:
            raise RecipeError(f"attention={value!r} is not a diffusers attention backend; choose one of: "
                              f"{', '.join(valid)}")
    else:
        raise RecipeError(f"unknown recipe key {key!r}; valid keys: {', '.join(KEYS)}")
    return key


def _choice(key: str, value: str, choices, extra: str = "") -> None:
    if value not in choices:
        raise RecipeError(f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}{extra}")


def _check_cache(value: str) -> None:
    if value == "none":
        return
    kind, colon, p = value.partition(":")
    usage = "cache=fbc:THRESHOLD (e.g. fbc:0.08), cache=taylorseer:INTERVAL (e.g. taylorseer:4), cache=magcache:THRESHOLD"
    if kind not in CACHES or not colon:
        raise RecipeError(f"cache={value!r} is not valid; choose none or one of: {usage}")
    if kind == "taylorseer":
        if not p.isdigit() or int(p) < 1:
            raise RecipeError(f"cache={value!r}: the TaylorSeer interval is an integer >= 1 (e.g. taylorseer:4)")
        return
    try:
        t = float(p)
    except ValueError:
        t = float("nan")
    if not math.isfinite(t) or not 0 < t <= 1:
        raise RecipeError(f"cache={value!r}: the {kind} threshold is a number in (0, 1] (e.g. {kind}:0.08)")


def attention_backends() -> list[str]:
    from diffusers.models.attention_dispatch import AttentionBackendName

    return [b.value for b in AttentionBackendName]


def parse(text: str | None) -> Recipe:
    return Recipe.parse(text)
