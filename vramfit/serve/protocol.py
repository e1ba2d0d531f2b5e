"""The wire format: OpenAI's images API (plus vramfit's extensions), job records and the error body.

Pydantic models only; no torch. ``to_requests`` turns a validated body into ``vramfit.run.Request``s (image i of
a request with seed s uses seed s+i, as ``generate --seed s+i``), checked by ``Request.validate`` and
``vramfit.validate`` (size bounds, prompt length) -- the same checks as the CLI.
"""

from __future__ import annotations

import re
import time
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from ..errors import InputError

SIZE_RE = re.compile(r"^(\d+)x(\d+)$")


class ImageRequest(BaseModel):
    """``POST /v1/images/generations`` and ``POST /v1/jobs``. OpenAI's fields we cannot honour are refused."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    n: int = Field(1, ge=1, le=10)
    size: Optional[str] = None  # "WxH"; default: the model's default size
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: Optional[int] = Field(None, ge=0, le=100)
    stream: bool = False
    partial_images: int = Field(0, ge=0, le=3)
    model: Optional[str] = None
    user: Optional[str] = None
    # OpenAI fields with one meaning here (FLUX has no quality tiers, styles or transparency)
    quality: Optional[Literal["auto", "standard", "low", "medium", "high"]] = None
    background: Optional[Literal["auto", "opaque"]] = None
    moderation: Optional[Literal["auto", "low"]] = None
    style: Optional[str] = None
    # vramfit's extensions (the openai client sends them with extra_body)
    seed: int = Field(0, ge=0, le=2**63 - 1 - 10)
    steps: Optional[int] = Field(None, ge=1, le=200)
    guidance: Optional[float] = Field(None, ge=0.0, le=100.0)
    strict: bool = False


class ImageData(BaseModel):
    b64_json: Optional[str] = None
    url: Optional[str] = None
    revised_prompt: Optional[str] = None


class ImageResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str = "png"
    size: Optional[str] = None
    warnings: list[str] = []
    usage: Optional[dict] = None
    vramfit: dict = {}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class JobCreated(BaseModel):
    id: str
    events: str
    status: str = "queued"


class JobStatus(BaseModel):
    id: str
    state: Literal["queued", "encode", "denoise", "decode", "done", "error", "cancelled"]
    position: Optional[int] = None
    step: Optional[int] = None
    steps: Optional[int] = None
    created: int
    images: list[str] = []
    error: Optional[ErrorDetail] = None
    warnings: list[str] = []
    vramfit: dict = {}


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class BadParam(InputError):
    """An input error that names the offending body field (OpenAI's ``param``)."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        # the shared checks speak in CLI flags; a body has fields
        for flag, field in (("--strict", '"strict": true'), ("--height", "height"), ("--width", "width"),
                            ("--steps", "steps"), ("--seed", "seed"), ("--guidance", "guidance")):
            message = message.replace(flag, field)
        super().__init__(message)
        self.param, self.code = param, code


def parse_size(size: str | None, spec) -> tuple[int, int]:
    """(height, width) from "WxH" (OpenAI order: width first)."""
    if size is None or size == "auto":
        return spec.default_size, spec.default_size
    m = SIZE_RE.match(size)
    if not m:
        raise BadParam(f"size={size!r}: give it as WIDTHxHEIGHT, e.g. '1024x1024'", "size")
    w, h = int(m.group(1)), int(m.group(2))
    return h, w


def to_requests(body: ImageRequest, spec, weights) -> tuple[list, list[str], str | None]:
    """One ``vramfit.run.Request`` per image, the warnings the CLI would print, and the prompt as T5 reads it when
    that differs (OpenAI's ``revised_prompt``). The same checks as ``vramfit generate``: ``Request.validate`` and
    ``vramfit.validate.check_prompt`` (the prompt itself goes to the encoder uncut, as in the CLI: diffusers
    truncates it). Raises BadParam."""
    from ..run import request_for
    from ..validate import SEED_MAX, check_prompt

    height, width = parse_size(body.size, spec)
    if body.seed + body.n - 1 > SEED_MAX:
        raise BadParam(f"seed {body.seed} with n {body.n}: image i uses seed+i, and seeds end at 2**63-1", "seed")
    try:
        seen, warnings = check_prompt(spec, weights, body.prompt, body.strict)
        warnings = list(warnings)
    except InputError as e:
        raise BadParam(str(e), "prompt", "strict" if body.strict else "invalid_value") from None
    reqs = []
    for i in range(body.n):
        r = request_for(spec, body.prompt, body.steps, height, width, body.guidance, body.seed + i)
        try:
            notes = r.validate(spec)
        except InputError as e:
            raise BadParam(str(e), _param_of(str(e), body)) from None
        if i == 0:
            warnings += list(notes or [])
        reqs.append(r)
    if body.strict and warnings:
        raise BadParam("strict: " + "; ".join(warnings), "prompt", "strict")
    return reqs, warnings, (seen if seen != body.prompt else None)


def _param_of(message: str, body: ImageRequest) -> str | None:
    for key, param in (("height", "size"), ("width", "size"), ("size", "size"), ("prompt", "prompt"),
                       ("steps", "steps"), ("guidance", "guidance"), ("token", "prompt")):
        if key in message:
            return param
    return None


def now() -> int:
    return int(time.time())
