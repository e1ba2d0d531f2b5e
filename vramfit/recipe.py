"""The Recipe: one typed description of how a pipeline runs, parsed from and printed to one string.

Grammar (DESIGN.md): comma-separated ``key=value`` items, plus preset names (items without ``=``) that
expand to a full recipe; later items override earlier ones. Keys:

* a component (``transformer``, ``text_encoder``, ``text_encoder_2``, ``vae``) = a precision or a
  quantization value (``bf16`` ``fp16`` ``fp32`` ``bnb-nf4`` ``torchao-int8wo`` ``gguf-q4_1`` ...);
* ``offload`` = none | model | sequential | group-block | group-leaf | staged;
* ``compile`` = off | regional | full;
* ``vae`` = none | tiling | slicing  (the decode mode; ``vae`` also takes a precision, the two value sets
  are disjoint, so ``vae=fp32,vae=tiling`` sets both);
* ``attention`` = a diffusers attention backend name (``native`` is diffusers' default).

``str(recipe)`` is the expanded canonical string that every run records.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from .errors import RecipeError

COMPONENT_KEYS = ("transformer", "text_encoder_2", "text_encoder", "vae")
PRECISIONS = ("bf16", "fp16", "fp32")
QUANT_VALUES = (
    "bnb-nf4", "bnb-fp4", "bnb-int8",
    "torchao-int8wo", "torchao-int4wo", "torchao-fp8wo", "torchao-fp8dq", "torchao-int8dq",
    "quanto-int8", "quanto-int4", "quanto-fp8",
    "fp8-layerwise", "fp8-layerwise-e5m2",
    "gguf-q8_0", "gguf-q6_k", "gguf-q5_k", "gguf-q5_1", "gguf-q5_0", "gguf-q4_k", "gguf-q4_1", "gguf-q4_0",
    "gguf-q3_k", "gguf-q2_k", "gguf-bf16", "gguf-f16",
)
OFFLOADS = ("none", "model", "sequential", "group-block", "group-leaf", "staged")
COMPILES = ("off", "regional", "full")
VAE_MODES = ("none", "tiling", "slicing")

PRESETS: dict[str, str] = {
    "bf16": "",
    "fp16": "transformer=fp16,text_encoder_2=fp16,text_encoder=fp16,vae=fp16",
    "model-offload": "offload=model",
    "sequential-offload": "offload=sequential",
    "group-offload": "offload=group-block",
    "staged": "offload=staged",
    "compiled": "compile=regional",
    "nf4": "transformer=bnb-nf4,text_encoder_2=bnb-nf4",
    "nf4+model-offload": "transformer=bnb-nf4,text_encoder_2=bnb-nf4,offload=model",
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
    vae_mode: str = "none"
    offload: str = "none"
    compile: str = "off"
    attention: str = "native"

    # ------------------------------------------------------------------ parse / print
    @classmethod
    def parse(cls, text: str | None) -> "Recipe":
        if text is None or not text.strip():
            return cls()
        values: dict[str, str] = {}
        set_by_item: dict[str, str] = {}
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
                values.update(cls.parse(PRESETS[item]).changed())
                continue
            key, _, value = (s.strip() for s in item.partition("="))
            field_name = _field_for(key, value)
            if field_name in set_by_item and set_by_item[field_name] != item:
                raise RecipeError(f"contradictory recipe: {set_by_item[field_name]!r} and {item!r} both set {key}")
            set_by_item[field_name] = item
            values[field_name] = value
        recipe = cls(**{**cls().as_dict(), **values})
        recipe.validate()
        return recipe

    def __str__(self) -> str:
        parts = [f"{k}={getattr(self, k)}" for k in COMPONENT_KEYS]
        parts += [f"vae={self.vae_mode}", f"offload={self.offload}", f"compile={self.compile}",
                  f"attention={self.attention}"]
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
                f"covered by the quantization backends. Alternative: vae=bf16 with vae=tiling to cut decode memory"
            )


KEYS = (*COMPONENT_KEYS, "offload", "compile", "attention")


def _field_for(key: str, value: str) -> str:
    """Map one ``key=value`` item to the dataclass field it sets, validating the value."""
    if key in COMPONENT_KEYS:
        if key == "vae" and value in VAE_MODES:
            return "vae_mode"
        if value in PRECISIONS or value in QUANT_VALUES:
            return key
        extra = f" (or a decode mode: {', '.join(VAE_MODES)})" if key == "vae" else ""
        raise RecipeError(
            f"{key}={value!r} is not a valid value; choose a precision ({', '.join(PRECISIONS)}) or a "
            f"quantization ({', '.join(QUANT_VALUES)}){extra}"
        )
    choices = {"offload": OFFLOADS, "compile": COMPILES}
    if key in choices:
        if value not in choices[key]:
            raise RecipeError(f"{key}={value!r} is not valid; choose one of: {', '.join(choices[key])}")
        return key
    if key == "attention":
        valid = attention_backends()
        if value not in valid:
            raise RecipeError(f"attention={value!r} is not a diffusers attention backend; choose one of: "
                              f"{', '.join(valid)}")
        return key
    raise RecipeError(f"unknown recipe key {key!r}; valid keys: {', '.join(KEYS)}")


def attention_backends() -> list[str]:
    from diffusers.models.attention_dispatch import AttentionBackendName

    return [b.value for b in AttentionBackendName]


def parse(text: str | None) -> Recipe:
    return Recipe.parse(text)
