"""The Ray Serve application: an HTTP ingress (FastAPI) in front of engine replicas.

    serve run config/serve.yaml                      # Ray's CLI; import_path integrations.serve_app:build_app
    refusion serve --model DIR [--replicas N | --autoscale MIN:MAX]

    RefusionIngress (FastAPI, integrations.openai_api + editor router)
        | DeploymentHandle.options(stream=True).generate.remote(GenerationRequest) -> Delta, Delta, ...
    RefusionEngine  (one scheduler Engine per replica; num_gpus 1 on GPU clusters, 0 on CPU)

The engine replica streams Delta objects; an admission error travels as one EngineFailure record
(typed errors do not survive Ray's exception pickling). An engine replica warms up (one short request
per decoding path) before it takes traffic; Ray Serve's health check runs a one-token request through
the engine; the ingress's /health answers 200 only while an engine replica answers. Draining
(integrations/serve_drain.py, `refusion serve` on Ctrl-C/SIGTERM): the ingress refuses new requests,
every engine replica stops taking requests, finishes running ones within drain_timeout_s and ends the
rest with a clean error; replica shutdown (`__del__`) does the same for whatever is left. The engine
replica is integrations/serve_engine.py; this module holds the ingress and the application builders.
"""

from __future__ import annotations

from ray import serve
from ray.serve.handle import DeploymentHandle

from integrations.engine_client import read_model_card
from integrations.engine_host import engine_config
from integrations.ingress_gate import IngressGate
from integrations.openai_api import APISettings, create_app
from integrations.request_limits import RequestLimits
from integrations.serve_config import ServeConfig
from integrations.serve_deployments import ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT
from integrations.serve_drain import (DRAIN_RETRY_AFTER_S, die_on_sigterm, report_final, report_open_work, signal_drain,
                                      start_drain_watch, wait_for_drain_signal)
from integrations.serve_engine import EngineDeployment, set_log_level
from integrations.serve_engine_client import ServeEngineClient

__all__ = ["EngineDeployment", "IngressDeployment", "application", "build_app", "signal_drain"]


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress()
class IngressDeployment:
    """The HTTP front: OpenAI API, /metrics, /health and the editor protocol, over ServeEngineClient."""

    async def __init__(self, engine: DeploymentHandle, config: dict):
        from workers.loader import load_tokenizer

        die_on_sigterm()  # as the engine replica's
        self.config = ServeConfig.model_validate(config)
        set_log_level(self.config.log_level)
        tokenizer = load_tokenizer(self.config.model)
        context = serve.get_replica_context()
        # Its Ray actor name travels with each call: an engine replica cancels a dead ingress's requests.
        self.client = ServeEngineClient(engine, tokenizer, self.config.served_model_names[0], caller=context.replica_id.to_full_id_str(),
                                        rebalance_after_s=self.config.rebalance_after_s)
        self.client.read_scaling_ahead()  # the first /health need not wait for Serve's controller
        self.model_card = read_model_card(self.config.model, tokenizer, self.config.max_model_len)
        self.gate = IngressGate(socket_limit=lambda: self.config.editor_connections(call_slots(self.config)))
        replica = self.replica = context.replica_id.unique_id
        self._drain_signal = None
        self._drain_watch = start_drain_watch(self._drain_when_signalled(context.app_name, replica), f"ingress {replica}")

    async def _drain_when_signalled(self, app_name: str, replica: str) -> None:
        """On the drain signal: refuse new requests, and report those still being answered and the editor
        sockets still open (each closes with 1001 once its completions have answered)."""
        signal = self._drain_signal = await wait_for_drain_signal(app_name)
        self.gate.start_draining(DRAIN_RETRY_AFTER_S)
        await report_open_work(signal, f"ingress:{replica}", lambda: self.gate.open_work)

    async def __del__(self):
        # Ray Serve shuts this replica down only once its in-flight requests are answered: while a drain
        # runs, say so before the process goes, or the last periodic report (work still open 0.1 s ago)
        # would stand for a replica that is gone, and the drain would wait out its timeout.
        # With no drain (serve run's Ctrl-C, serve shutdown, a scale-down) the watch still polls for the
        # signal: stopped here too, as the engine's are, or a poll after the process's exit began fails
        # and logs a traceback saying a drain will wait for this replica.
        watch = getattr(self, "_drain_watch", None)
        if watch is not None:
            watch.cancel()
        signal = getattr(self, "_drain_signal", None)
        if signal is not None:
            await report_final(signal, f"ingress:{self.replica}", self.gate.open_work)

    def __serve_build_asgi_app__(self):
        engine = engine_config(self.config.engine)  # every replica's: prompts x n beyond its room are a 400
        limits = RequestLimits(max_body_bytes=self.config.max_body_bytes, body_timeout_s=self.config.body_timeout_s,
                               max_prompt_chars=self.config.max_prompt_chars,
                               context_length=self.model_card["limits"]["context_length"],
                               max_sequences=engine.max_running + engine.max_queue,
                               max_editor_connections=self.config.editor_connections(call_slots(self.config)),
                               editor_idle_timeout_s=self.config.editor_idle_timeout_s)
        settings = APISettings(
            model_name=self.config.served_model_names[0],
            model_aliases=tuple(self.config.served_model_names[1:]),
            api_keys=self.config.api_keys,
            default_max_tokens=self.config.default_max_tokens,
            decode_defaults=self.model_card["defaults"],
            allowed_origins=self.config.allowed_origins,
            allowed_hosts=self.config.allowed_hosts,
            limits=limits,
            pause_endpoints=self.config.pause_endpoints,
        )
        return create_app(settings, self.client, gate=self.gate)


def call_slots(config: ServeConfig) -> int:
    """This ingress replica's max_ongoing_requests as Ray Serve applies it now: a `deployments:` override
    and an in-place `serve deploy` update included (the replica context follows a reconfiguration);
    the config's `ingress.max_ongoing_requests` outside a replica."""
    try:
        return int(serve.get_replica_context()._deployment_config.max_ongoing_requests)
    except Exception:  # noqa: BLE001 - not in a replica, or a Ray that keeps it elsewhere
        return config.ingress.max_ongoing_requests


def build_app(args: dict) -> serve.Application:
    """Application builder for `serve run` / `serve deploy` (import_path integrations.serve_app:build_app;
    Ray calls builders with one argument). `args` follows integrations.serve_config.ServeConfig."""
    return application(args)


def application(args: dict, deployment_overrides: dict[str, dict] | None = None) -> serve.Application:
    """The application of `args` (ServeConfig). deployment_overrides: {deployment name: Ray deployment
    options}, the config file's `deployments:` section, which `serve deploy` applies itself and
    `refusion serve` passes here; a replica count or autoscaling set there replaces the one in `args`.
    Raises TypeError/ValueError for an unknown option."""
    config = ServeConfig.model_validate(args or {})
    # Non-defaults only: the replicas validate it again, and a default written out (num_replicas beside
    # autoscaling) would read as set there.
    plain = config.model_dump(exclude_defaults=True)
    overrides = deployment_overrides or {}
    logging = config.ray_logging()
    engine = EngineDeployment.options(**_with_overrides({**config.engine_deployment.ray_options(), **logging},
                                                        overrides.get(ENGINE_DEPLOYMENT))).bind(plain)
    grace_s = config.engine_deployment.graceful_shutdown_timeout_s
    ingress_options = _with_overrides({**config.ingress.ray_options(grace_s), **logging},
                                      overrides.get(INGRESS_DEPLOYMENT))
    return IngressDeployment.options(**ingress_options).bind(engine, plain)


def starting_demand(args: dict,
                    deployment_overrides: dict[str, dict] | None = None) -> dict[str, tuple[int, dict[str, float]]]:
    """{deployment name: (replicas at start, {Ray resource: amount per replica})} of the application
    `application(args, deployment_overrides)` builds: the replica count, or autoscaling's
    initial_replicas (else min_replicas; Ray Serve's "auto" starts at 1), and ray_actor_options' num_cpus
    ("CPU"; Ray Serve's default 1), num_gpus ("GPU") and custom resources, or the placement_group_bundles'
    sums; amounts of 0 are left out. What a local Ray, whose resources never grow, must
    hold for the application to finish deploying."""
    config = ServeConfig.model_validate(args or {})
    overrides = deployment_overrides or {}
    options = {ENGINE_DEPLOYMENT: _with_overrides(config.engine_deployment.ray_options(),
                                                  overrides.get(ENGINE_DEPLOYMENT)),
               INGRESS_DEPLOYMENT: _with_overrides(config.ingress.ray_options(1.0), overrides.get(INGRESS_DEPLOYMENT))}
    demand = {}
    for name, option in options.items():
        autoscaling = option.get("autoscaling_config")
        if autoscaling is not None:
            autoscaling = dict(autoscaling) if isinstance(autoscaling, dict) else autoscaling.model_dump()
            replicas = autoscaling.get("initial_replicas")
            replicas = autoscaling.get("min_replicas", 1) if replicas is None else replicas
        else:
            replicas = option.get("num_replicas", 1)
            replicas = 1 if replicas == "auto" else replicas
        actor = option.get("ray_actor_options") or {}
        cpus = actor.get("num_cpus")
        per = {**(actor.get("resources") or {}), "CPU": 1 if cpus is None else cpus, "GPU": actor.get("num_gpus") or 0}
        bundles = option.get("placement_group_bundles")
        if bundles:  # a replica reserves its bundles (its actor runs in the first)
            per = {}
            for bundle in bundles:
                for resource, amount in bundle.items():
                    per[resource] = per.get(resource, 0) + amount
        demand[name] = (int(replicas), {k: float(v) for k, v in per.items() if v})
    return demand


def _with_overrides(options: dict, override: dict | None) -> dict:
    """Deployment options with a `deployments:` entry on top; its replica count or autoscaling replaces
    the code's (Ray Serve's own precedence under `serve deploy`)."""
    override = {k: v for k, v in (override or {}).items() if k != "name"}
    if {"num_replicas", "autoscaling_config"} & set(override):
        options = {k: v for k, v in options.items() if k not in ("num_replicas", "autoscaling_config")}
    return {**options, **override}
