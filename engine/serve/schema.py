"""The HTTP request schema: one pydantic model for `POST /v1/completions` (OpenAI's fields, the
`controls` extension and the diffusion settings) that builds `GenerationParams`, and the error
body every refusal shares.

Types are checked strictly (no "12" → 12); ranges are GenerationParams', Control's and
Engine.validate's own checks, whose ValueErrors name the field. `RequestError` carries the HTTP
status and the field to report.
"""

from __future__ import annotations

import re
from typing import Literal

from dglm.engine.api import GenerationParams
from dglm.engine.probes import Control
from pydantic import BaseModel, ConfigDict, Field, ValidationError

# OpenAI's defaults where the engine's (api.DEFAULT_*) differ: max_tokens 16, top_p 1
DEFAULT_MAX_TOKENS = 16
MAX_PROMPTS = 256  # prompts in one request (each runs n samples)


class RequestError(Exception):
    """A refused request: HTTP `status`, a message that says what to do, the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}

    def body(self) -> dict:
        """OpenAI's error body."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": None}}  # fmt: skip


class ControlSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    probe: str  # probe name, e.g. "sentiment"
    target: str | int  # one of the probe's labels (or its index)
    scale: float | None = None  # None: the bundle's control_scale
    method: str = "dglm"  # "dglm" | "re-control" | "both" | "caa"


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    # OpenAI's fields
    model: str | None = None  # must name the served bundle when given
    prompt: str | list[str] = Field(min_length=1)
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    n: int = 1  # samples per prompt
    stop: str | list[str] | None = None
    seed: int | None = None  # sample j of a prompt uses seed + j
    stream: bool = False
    user: str | None = None  # accepted, unused
    stream_options: dict | None = None  # {"include_usage": true}: a last chunk with usage
    # extensions: top-k, EOS, probe controls
    top_k: int = 0
    ignore_eos: bool = False
    controls: list[ControlSpec] = []
    # the diffusion settings (None: the bundle's)
    cfg_scale: float | None = None
    num_inference_steps: int | None = None
    sampler: Literal["ddpm", "ddim", "dpmpp-2m", "consistency"] | None = None
    guidance_mode: Literal["fast", "exact"] | None = None
    renoise_alpha2: float | None = None
    prompt_guidance: float | None = None
    re_control_steps: int | None = None
    re_control_step_size: float | None = None
    re_control_plausibility: float | None = None
    caa_multiplier: float | None = None  # CAA controls' steering-vector multiplier m
    # false: exactly `controls`, without those the bundle implies (config.json implied_controls)
    implied_controls: bool = True

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def params(self) -> GenerationParams:
        """The engine's settings; RequestError (400) naming the field for a bad value."""
        try:
            controls = tuple(Control(c.probe, c.target, c.scale, c.method) for c in self.controls)
        except ValueError as e:
            raise RequestError(400, str(e), "controls") from None
        try:
            return GenerationParams(
                controls=controls,
                num_samples=self.n,
                seed=self.seed,
                max_new_tokens=self.max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                stop=() if self.stop is None else self.stop,
                ignore_eos=self.ignore_eos,
                **{k: getattr(self, k) for k in DIFFUSION_FIELDS},
            )
        except ValueError as e:
            raise RequestError(400, rename(str(e)), field_of(rename(str(e)))) from None


DIFFUSION_FIELDS = (
    "cfg_scale", "num_inference_steps", "sampler", "guidance_mode", "renoise_alpha2",
    "prompt_guidance", "re_control_steps", "re_control_step_size", "re_control_plausibility",
    "implied_controls", "caa_multiplier",
)  # fmt: skip
# GenerationParams' names → the HTTP fields
HTTP_NAMES = {"num_samples": "n", "max_new_tokens": "max_tokens", "prompts": "prompt"}


ENGINE_NAMES = re.compile(r"\b(" + "|".join(HTTP_NAMES) + r")\b")


def rename(message: str) -> str:
    """A GenerationParams / Engine.validate message in the HTTP fields' names."""
    return ENGINE_NAMES.sub(lambda m: HTTP_NAMES[m.group(1)], message)


def field_of(message: str) -> str | None:
    """The request field a (renamed) ValueError message is about: the one it starts with
    (GenerationParams names it first), else the first field it mentions."""
    fields = set(CompletionRequest.model_fields)
    head = re.split(r"[\s\[:=]", message, maxsplit=1)[0]
    if head in fields:
        return head
    named = next((w for w in re.findall(r"[a-z_]+", message) if w in fields), None)
    return named or ("controls" if "probe" in message else None)


def parse_request(body: bytes) -> CompletionRequest:
    """The request in `body`; RequestError (400) for malformed JSON or a field of the wrong type,
    naming it."""
    try:
        req = CompletionRequest.model_validate_json(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise RequestError(400, f"the body is not valid JSON: {err['msg']}") from None
        if err["type"] == "model_type":
            raise RequestError(400, "the body must be a JSON object of completion fields") from None
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("str", "list[", "int")))
        value = err.get("input")
        raise RequestError(400, f"{loc}: {err['msg']} (got {value!r})", loc or None) from None
    if isinstance(req.prompt, list) and len(req.prompt) > MAX_PROMPTS:
        raise RequestError(400, f"prompt has {len(req.prompt)} entries; at most {MAX_PROMPTS}",
                           "prompt")  # fmt: skip
    return req
