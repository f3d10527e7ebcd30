"""The serve application's settings: the `args` of Ray Serve's config file (see config/serve.yaml).

Validated with pydantic at this YAML boundary: an unknown or bad key is an error that names it.
`runner` goes to workers.runner.ModelRunner, `engine` to scheduler.config.EngineConfig.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from integrations.auth import keys_from_env, normalize_host, normalize_origin
from integrations.request_limits import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES
from integrations.serve_deployments import (ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT, EngineDeploymentOptions,
                                            IngressOptions, StrictModel)

# (the deployment names are re-exported: tests import them from here; their home is serve_deployments)
__all__ = ["DEFAULT_MODEL", "ENGINE_DEPLOYMENT", "INGRESS_DEPLOYMENT", "ServeConfig", "max_model_len_problem",
           "model_context", "served_names_problem"]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "refusion-tiny-code"


def served_names_problem(names: list[str]) -> str | None:
    """What is wrong with a list of served model ids (vLLM's --served-model-name), or None."""
    if not names or any(not name.strip() for name in names):
        return "give one or more non-empty names"
    if len(set(names)) != len(names):
        return f"names repeat in {names}; give each once"
    return None


class ServeConfig(StrictModel):
    """Everything `build_app` needs. Paths are resolved against the current directory."""

    model: str = str(DEFAULT_MODEL)
    model_name: str | list[str] | None = Field(
        default=None, description="served model id, or ids as vLLM's --served-model-name: answers carry the "
        "first, requests may name any, /v1/models lists all; default: the directory name")
    api_keys: list[str] = Field(default_factory=list, description="Bearer keys; REFUSION_API_KEYS and REFUSION_API_KEY add more")
    default_max_tokens: int = Field(default=256, ge=1, description="chat max_tokens when the request sets none")
    allowed_origins: list[str] = Field(default_factory=list, description="browser origins that may call; [] = none")
    allowed_hosts: list[str] = Field(default_factory=list, description="host names served on loopback connections "
                                     "besides IP addresses and localhost (DNS rebinding; a reverse proxy on this machine "
                                     "that passes its public name on needs it here); '*' = any")
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=1024, description="HTTP request body limit (413)")
    body_timeout_s: float = Field(default=DEFAULT_BODY_TIMEOUT_S, gt=0, description="seconds a request body may "
                                  "pause (and 6x this in all) before a 408 (a stalled upload holds an ingress call slot)")
    max_prompt_chars: int | None = Field(default=None, ge=1, description="prompt characters; default 8 x context")
    runner: dict = Field(default_factory=dict, description="workers.runner.ModelRunner keyword arguments")
    engine: dict = Field(default_factory=dict, description="scheduler.config.EngineConfig fields")
    engine_deployment: EngineDeploymentOptions = Field(default_factory=EngineDeploymentOptions)
    ingress: IngressOptions = Field(default_factory=IngressOptions)
    drain_timeout_s: float = Field(default=20.0, ge=0, description="shutdown: in-flight requests get this long")
    editor_max_connections: int | None = Field(
        default=None, ge=1, description="editor WebSockets open at once per ingress replica (one more is closed "
        "with 1013); each holds one of its max_ongoing_requests call slots while open; default: half of "
        "those slots as Ray applies them (a deployments: override included), so HTTP keeps the other half; "
        "never more than they less one")
    editor_idle_timeout_s: float = Field(default=600.0, ge=0, description="an editor WebSocket that sent no "
                                         "frame for this long, with no completion in flight, is closed with 1001; "
                                         "0 = never")
    max_model_len: int | None = Field(
        default=None, description="the context served, in tokens (vLLM's --max-model-len): at most the "
        "model's (config.json max_position_embeddings); prompts the server builds (the editor's infill) and "
        "the max_tokens it fills in fit it. Set it below what the engine's KV cache holds when that is less "
        "than the model's context (an engine replica logs a warning at start)")
    pause_endpoints: bool = Field(default=False, description="POST /pause, POST /resume, GET /is_paused: hold "
                                  "every engine replica's forwards (vLLM's dev-mode routes of the same names; "
                                  "integrations/pause_api.py); off, they are 404s")
    health_probe_timeout_s: float = Field(default=20.0, gt=0, description="one-token probe limit")
    caller_check_s: float = Field(default=2.0, gt=0, description="how often an engine replica checks that the "
                                  "ingress replicas it streams to are alive (a dead one's requests are cancelled)")
    rebalance_after_s: float = Field(default=1.0, ge=0, description="queue rebalancing: once a request has waited "
                                     "this long for its first token, waiting requests that never started move from "
                                     "replicas with a queue to replicas with free slots "
                                     "(integrations/serve_rebalance.py); 0 turns it off")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="the replicas' own log (structlog lines): info logs each request's outcome "
        "and events; debug adds each routing decision with its inputs (~600 bytes a request)")

    def ray_logging(self) -> dict:
        """Deployment options that make Ray Serve's own lines in the replicas follow log_level: at warning
        and error its INFO lines go, the access log among them (a line per HTTP request and per handle
        call, two per /metrics scrape), as uvicorn's access log follows vLLM's log level; {} at info and
        debug (Ray's defaults: its DEBUG is Ray's internals, not this service's)."""
        if self.log_level in ("debug", "info"):
            return {}
        return {"logging_config": {"log_level": self.log_level.upper(), "enable_access_log": False}}

    @field_validator("max_model_len", mode="before")
    @classmethod
    def _context_is_a_number(cls, value):
        if isinstance(value, bool):  # (true was read as 1)
            raise ValueError(f"got {value}; give a number of tokens (1 to the model's context)")
        return value  # (its bound is checked with the model's context: max_model_len_problem)

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, value):
        return value.lower() if isinstance(value, str) else value  # WARNING as Python's logging takes it

    @field_validator("model_name")
    @classmethod
    def _model_names(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value is None or value == "":  # the directory's name
            return value
        if problem := served_names_problem(value if isinstance(value, list) else [value]):
            raise ValueError(problem)
        return value

    @field_validator("api_keys")
    @classmethod
    def _api_keys(cls, value: list[str]) -> list[str]:
        if any(not key.strip() for key in value):
            raise ValueError("an empty key would let in a request with an empty Bearer token; remove it")
        return value

    @model_validator(mode="after")
    def _editor_connections(self) -> "ServeConfig":
        slots = self.ingress.max_ongoing_requests
        if self.editor_max_connections is not None and self.editor_max_connections >= slots:
            raise ValueError(f"editor_max_connections ({self.editor_max_connections}) must be below "
                             f"ingress.max_ongoing_requests ({slots}): each open editor socket holds one of those "
                             "call slots, and HTTP requests (/health among them) need the rest")
        return self

    def editor_connections(self, call_slots: int) -> int:
        """Editor WebSockets an ingress replica with `call_slots` (its max_ongoing_requests as Ray applies
        it: serve_app.call_slots) lets in: editor_max_connections, below call_slots; by default half."""
        if self.editor_max_connections:
            return max(0, min(self.editor_max_connections, call_slots - 1))
        return call_slots // 2  # (0 with one slot: a socket would take it from every HTTP request)

    @property
    def served_model_names(self) -> list[str]:
        """Every served model id, the one answers carry first (model_name as a list; set once validated)."""
        return [self.model_name] if isinstance(self.model_name, str) else list(self.model_name or [])

    @field_validator("runner")
    @classmethod
    def _runner_keys(cls, value: dict) -> dict:
        from integrations.engine_host import check_runner_options

        check_runner_options(value)
        return value

    @field_validator("engine")
    @classmethod
    def _engine_settings(cls, value: dict) -> dict:
        from integrations.engine_host import engine_config

        engine_config(value)  # EngineConfigError (a ValueError) names the setting
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        return [normalize_origin(origin) for origin in value]

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        return [normalize_host(host) for host in value]

    @model_validator(mode="after")
    def _drain_fits_shutdown(self):
        limit = self.engine_deployment.graceful_shutdown_timeout_s
        if limit < self.drain_timeout_s + 2:
            raise ValueError(f"engine_deployment.graceful_shutdown_timeout_s ({limit}) must exceed drain_timeout_s "
                             f"({self.drain_timeout_s}) by >= 2 s, or Ray kills replicas mid-drain")
        return self

    @model_validator(mode="after")
    def _resolve(self):
        model_dir = Path(self.model).expanduser().resolve()
        try:
            found = (model_dir / "config.json").is_file()
        except PermissionError:  # a directory this user may not search (chmod 000): was a traceback
            raise ValueError(f"model: {model_dir} cannot be read: permission denied; give the user running refusion "
                             "read and search permission on it (chmod a+rx)") from None
        if not found:
            what = ("does not exist" if not model_dir.exists() else "is not a directory" if not model_dir.is_dir()
                    else "has no config.json")
            raise ValueError(f"model: {model_dir} {what}; pass a model directory (default {DEFAULT_MODEL})")
        if self.max_model_len is not None and (problem := max_model_len_problem(self.max_model_len, model_dir)):
            raise ValueError(f"max_model_len: {problem}")
        self.model = str(model_dir)
        self.model_name = self.model_name or model_dir.name
        self.api_keys = list(dict.fromkeys(self.api_keys + keys_from_env()))
        return self


def model_context(model_dir: str | Path | None) -> int:
    """config.json's max_position_embeddings, in tokens; transformers' Qwen3 default (32768,
    workers.model_config.DEFAULT_CONTEXT) when config.json leaves it out, as transformers and vLLM read
    such a model (it was 0, no bound: a 200,000-token gen_length ran until memory ran out, helper-186).
    0 when config.json is unreadable, or with no `model_dir`: then nothing is checked against it here,
    and loading the model names the fault."""
    from workers.model_config import DEFAULT_CONTEXT

    if model_dir is None:
        return 0
    try:
        raw = json.loads((Path(model_dir) / "config.json").read_text())
        return int(raw.get("max_position_embeddings", DEFAULT_CONTEXT) or 0)
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def max_model_len_problem(value: int, model_dir: str | Path | None) -> str | None:
    """What is wrong with serving a context of `value` tokens from `model_dir` (vLLM's --max-model-len:
    1 to the model's context), or None. One rule and one wording for ServeConfig.max_model_len, `refusion
    serve --max-model-len` and `refusion run-batch --max-model-len`, which prefix the name the user gave."""
    context = model_context(model_dir)
    if value >= 1 and not (context and value > context):
        return None
    if context:
        return (f"got {value}; give 1 to {context} (the model's context, config.json max_position_embeddings; "
                "less serves a shorter context)")
    return f"got {value}; give a positive number of tokens"
