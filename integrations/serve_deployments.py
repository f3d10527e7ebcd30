"""Ray Serve options of the application's two deployments, the engine replicas and the HTTP ingress:
`engine_deployment` and `ingress` in the serve config's args (integrations/serve_config.py), each
validated with pydantic and turned into `Deployment.options(...)` keyword arguments."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The most max_ongoing_requests a replica may take. A Ray Serve replica is an async actor of 1000
# concurrent calls (Ray's default; Serve allows no other), shared by requests and Ray Serve's own calls
# (health check, queue-length probes, drain and metrics calls): these 64 stay free for them, else a
# replica whose request slots are all held (stalled uploads, long streams) fails its health check and
# is replaced, and the proxy can no longer route to it.
MAX_ONGOING_REQUESTS = 1000 - 64
# The application's deployments, by the names a config file's `deployments:` overrides use.
ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT = "RefusionEngine", "RefusionIngress"


class StrictModel(BaseModel):
    """A settings model that refuses unknown keys (an error names them)."""

    model_config = ConfigDict(extra="forbid")


class AutoscalingOptions(StrictModel):
    """Ray Serve autoscaling of engine replicas (replaces num_replicas when set)."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    initial_replicas: int | None = Field(default=None, ge=0)
    target_ongoing_requests: float = Field(default=16.0, gt=0)
    upscale_delay_s: float = Field(default=10.0, ge=0)
    downscale_delay_s: float = Field(default=60.0, ge=0)
    # How often replicas report their ongoing requests, and the window they are averaged over (Ray
    # Serve's defaults; shorter ones react faster to a ramp).
    metrics_interval_s: float | None = Field(default=None, gt=0)
    look_back_period_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self

    def to_ray(self) -> dict:
        return self.model_dump(exclude_none=True)


class RouterOptions(StrictModel):
    """How the ingress picks an engine replica (integrations/serve_router.py). prefix_affinity: requests
    with the same document, conversation or prompt head go to the same replica (its prefix cache holds
    them) unless that replica has more than imbalanced_threshold ongoing requests above the least
    loaded one; power_of_two: Ray Serve's default (two random replicas, the less loaded wins)."""

    policy: Literal["prefix_affinity", "power_of_two"] = "prefix_affinity"
    prefix_tokens: int = Field(default=256, ge=1, description="prompt ids keyed on when a request has no affinity key")
    imbalanced_threshold: float = Field(default=2.0, ge=0, description="ongoing-request gap that overrides affinity")

    def to_ray(self):
        """Ray Serve's RequestRouterConfig for the engine deployment."""
        from ray.serve.config import RequestRouterConfig

        from integrations.serve_router import ROUTER_CLASS

        return RequestRouterConfig(request_router_class=ROUTER_CLASS, request_router_kwargs=self.model_dump())


class EngineDeploymentOptions(StrictModel):
    """The engine replicas. num_gpus: 1 on GPU clusters, 0 on CPU. max_ongoing_requests bounds the
    concurrent calls per replica; keep it >= the engine's 3 x max_running + max_queue (interactive
    requests may queue max_running past a queue full of batch work, and under the fair share a client
    with fewer requests waiting than another max_running more) so the engine, not Ray, decides
    admission (and answers OverloadedError with a retry hint)."""

    num_replicas: int = Field(default=1, ge=1)
    autoscaling: AutoscalingOptions | None = None
    num_gpus: float = Field(default=0.0, ge=0)
    num_cpus: float = Field(default=1.0, ge=0)
    max_ongoing_requests: int = Field(default=512, ge=1)
    max_queued_requests: int = Field(default=-1, ge=-1)
    health_check_period_s: float = Field(default=10.0, gt=0)
    health_check_timeout_s: float = Field(default=30.0, gt=0)
    graceful_shutdown_wait_loop_s: float = Field(default=2.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(default=30.0, gt=0)
    torch_threads: int | None = Field(default=None, ge=1)
    resources: dict[str, float] = Field(default_factory=dict, description="Ray custom resources per replica")
    router: RouterOptions = Field(default_factory=RouterOptions)

    @field_validator("max_ongoing_requests")
    @classmethod
    def _ongoing(cls, value: int) -> int:
        return _room_for_ray(value)

    @model_validator(mode="after")
    def _one_way_to_scale(self):
        if self.autoscaling is not None and "num_replicas" in self.model_fields_set:
            raise ValueError("set num_replicas or autoscaling, not both: remove num_replicas to autoscale "
                             "(autoscaling.initial_replicas sets the starting count)")
        return self

    def ray_options(self) -> dict:
        """Keyword arguments for `Deployment.options(...)`."""
        options = {
            "ray_actor_options": _actor_options(self.num_cpus, self.num_gpus, self.resources),
            "request_router_config": self.router.to_ray(),
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_wait_loop_s": self.graceful_shutdown_wait_loop_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
        }
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.to_ray()
        else:
            options["num_replicas"] = self.num_replicas
        return options


class IngressOptions(StrictModel):
    """The HTTP ingress replicas: parsing, tokenizing and streaming only, so no CPU is reserved.
    max_ongoing_requests: HTTP requests one replica answers at once; max_queued_requests: requests Ray
    Serve's proxy holds for a full replica, beyond which it answers 503 itself (plain text, no
    Retry-After; -1: no bound, the proxy queues without end and a flood hangs every client)."""

    num_replicas: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=0.0, ge=0)
    max_ongoing_requests: int = Field(default=900, ge=1)
    max_queued_requests: int = Field(default=1000, ge=-1)
    resources: dict[str, float] = Field(default_factory=dict, description="Ray custom resources per replica")
    # How long a replaced ingress replica may finish its open streams before Ray kills it (cutting them);
    # None: the engine deployment's graceful_shutdown_timeout_s (Ray's own default, 20 s, cut streams
    # that the engine would still have finished).
    graceful_shutdown_timeout_s: float | None = Field(default=None, gt=0)

    @field_validator("max_ongoing_requests")
    @classmethod
    def _ongoing(cls, value: int) -> int:
        return _room_for_ray(value)

    def ray_options(self, engine_grace_s: float) -> dict:
        return {
            "num_replicas": self.num_replicas,
            "ray_actor_options": _actor_options(self.num_cpus, 0.0, self.resources),
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s or engine_grace_s,
        }


def _room_for_ray(value: int) -> int:
    if value > MAX_ONGOING_REQUESTS:
        raise ValueError(f"at most {MAX_ONGOING_REQUESTS}, got {value}: a replica takes 1000 concurrent calls, "
                         "and Ray Serve's own (its health check among them) need room")
    return value


def _actor_options(num_cpus: float, num_gpus: float, resources: dict[str, float]) -> dict:
    options = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if resources:  # e.g. {"accelerator_type_H200": 0.01} or a node-pinning resource of `ray start --resources`
        options["resources"] = dict(resources)
    return options
