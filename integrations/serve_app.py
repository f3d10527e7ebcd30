"""The Ray Serve application: an HTTP ingress (FastAPI) in front of engine replicas.

    serve run config/serve.yaml                      # Ray's CLI; import_path integrations.serve_app:build_app
    refusion serve --model DIR [--replicas N | --autoscale MIN:MAX]

    RefusionIngress (FastAPI, integrations.openai_api + editor router)
        | DeploymentHandle.options(stream=True).generate.remote(GenerationRequest) -> Delta, Delta, ...
    RefusionEngine  (one scheduler Engine per replica; num_gpus 1 on GPU clusters, 0 on CPU)

The engine replica streams Delta objects; an admission error travels as one EngineFailure record
(typed errors do not survive Ray's exception pickling). Ray Serve's health check runs a one-token
request through the engine; on shutdown the replica drains (in-flight requests finish or end with a
clean error within drain_timeout_s).
"""

from __future__ import annotations

import os
from typing import AsyncIterator

from ray import serve
from ray.serve.handle import DeploymentHandle

from integrations.engine_client import EngineFailure, LocalEngineClient, ServeEngineClient, read_model_card
from integrations.engine_host import build_engine, engine_metrics_text, one_token_probe
from integrations.openai_api import APISettings, create_app
from integrations.serve_config import ServeConfig
from scheduler.api import Delta, EngineError, GenerationRequest

@serve.deployment(name="RefusionEngine")
class EngineDeployment:
    """Hosts one scheduler Engine. Methods are called through deployment handles by the ingress."""

    async def __init__(self, config: dict):
        self.config = ServeConfig.model_validate(config)
        threads = self.config.engine_deployment.torch_threads
        if threads:
            import torch

            torch.set_num_threads(threads)
        engine, tokenizer = build_engine(self.config.model, self.config.runner, self.config.engine)
        await engine.start()
        self.engine = engine
        self.client = LocalEngineClient(engine, tokenizer, self.config.model_name, read_model_card(self.config.model))
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.cancelled = 0

    async def generate(self, req: GenerationRequest) -> AsyncIterator[Delta | EngineFailure]:
        """Stream the request's deltas. Cancelling this call (client gone) cancels it in the engine."""
        finished = False
        try:
            async for delta in self.client.stream(req):
                finished = finished or delta.finished
                yield delta
        except EngineError as exc:
            finished = True
            yield EngineFailure.from_exception(exc)
        finally:
            if not finished:
                self.cancelled += 1

    async def info(self) -> dict:
        info = await self.client.info()
        info.update(replica=self.replica, pid=os.getpid(), cancelled_by_client=self.cancelled)
        return info

    async def metrics(self) -> bytes:
        return engine_metrics_text(self.engine)

    async def check_health(self) -> None:
        """Ray Serve calls this periodically; raising marks the replica unhealthy (it is replaced)."""
        await one_token_probe(self.client, self.config.health_probe_timeout_s)

    async def __del__(self):
        # Ray Serve has already waited for in-flight calls (graceful_shutdown_wait_loop_s); stop() drains
        # whatever is left within the timeout and ends the rest with a clean error delta.
        engine = getattr(self, "engine", None)  # absent when __init__ failed
        if engine is not None:
            await engine.stop(drain_timeout_s=self.config.drain_timeout_s)


@serve.deployment(name="RefusionIngress")
@serve.ingress()
class IngressDeployment:
    """The HTTP front: OpenAI API, /metrics, /health and the editor protocol, over ServeEngineClient."""

    def __init__(self, engine: DeploymentHandle, config: dict):
        from transformers import AutoTokenizer

        self.config = ServeConfig.model_validate(config)
        tokenizer = AutoTokenizer.from_pretrained(self.config.model)
        self.client = ServeEngineClient(engine, tokenizer, self.config.model_name)
        self.decode_defaults = read_model_card(self.config.model)["defaults"]

    def __serve_build_asgi_app__(self):
        settings = APISettings(
            model_name=self.config.model_name,
            api_keys=self.config.api_keys,
            default_max_tokens=self.config.default_max_tokens,
            decode_defaults=self.decode_defaults,
        )
        return create_app(settings, self.client)


def build_app(args: dict) -> serve.Application:
    """Application builder for `serve run` / `serve deploy` (import_path integrations.serve_app:build_app)
    and `refusion serve`. `args` follows integrations.serve_config.ServeConfig."""
    config = ServeConfig.model_validate(args or {})
    plain = config.model_dump()
    engine = EngineDeployment.options(**config.engine_deployment.ray_options()).bind(plain)
    return IngressDeployment.options(**config.ingress.ray_options()).bind(engine, plain)
