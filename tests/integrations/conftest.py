"""Integration fixtures: ONE local Ray instance and ONE Ray Serve application per test session.

    serve_base_url     "http://127.0.0.1:PORT": the refusion app on the random tiny model (no API keys,
                       roomy engine limits, browser origin ALLOWED_ORIGIN allowed); shared by the
                       OpenAI API, editor-protocol and bad-input tests.
    strict_base_url    "http://127.0.0.1:PORT/strict": a second app in the same Ray instance with
                       API_KEY required and a one-request engine (max_running=1, max_queue=0), for
                       auth and overload tests; started only when a test asks for it.
    client, model      an `openai.OpenAI` SDK client on serve_base_url and the id it serves (modules may
                       define their own `client`)
    accepts            accepts(grammar, text): whether a compiled grammar matches `text` whole, fed as the
                       shipped tokenizer splits it (no Ray)

Ray is kept small (2 CPUs, no dashboard); both apps and Ray are shut down at session end.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ports import free_port
from serve_testbed import API_KEY, LIVE_APPS, RAY_SERVE_ENV, STRICT_ALIAS, STRICT_ENGINE_OPTIONS, serve_config, wait_healthy


@pytest.hookimpl(hookwrapper=True, trylast=True)  # innermost: inside pytest's capture of the call
def pytest_runtest_call(item):
    """After each test's call, wait briefly for the in-process apps (serve_testbed.local_app, often
    module-scoped) to finish answering: the request-log line of a test's last request is written by the
    server's thread just after the client has its answer, and what is written between a test's phases
    (capture suspended) goes to the run's output."""
    yield
    for app in list(LIVE_APPS):
        app.settle()


@pytest.fixture(scope="session")
def serve_port():
    """A local Ray (2 CPUs, no dashboard) with Serve's HTTP proxy on a free port; torn down at the end."""
    import ray
    from ray import serve

    with pytest.MonkeyPatch.context() as env:
        for name, value in RAY_SERVE_ENV.items():
            env.setenv(name, value)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=100 * 1024 * 1024, configure_logging=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            yield port
        finally:
            serve.shutdown()
            ray.shutdown()


@pytest.fixture(scope="session")
def serve_base_url(serve_port, tiny_model_dir) -> str:
    """The refusion Serve app on tiny_model_dir, route prefix "/"."""
    from ray import serve

    from integrations.serve_app import build_app

    serve.run(build_app(serve_config(tiny_model_dir)), name="refusion", route_prefix="/")
    url = f"http://127.0.0.1:{serve_port}"
    wait_healthy(url)
    return url


@pytest.fixture(scope="session")
def strict_base_url(serve_port, tiny_model_dir) -> str:
    """A second app (prefix /strict) with API_KEY required and room for exactly one request, served under
    two model ids (the directory's name, then STRICT_ALIAS)."""
    from ray import serve

    from integrations.serve_app import build_app

    config = serve_config(tiny_model_dir, api_keys=[API_KEY], engine=dict(STRICT_ENGINE_OPTIONS),
                          model_name=[tiny_model_dir.name, STRICT_ALIAS])
    serve.run(build_app(config), name="refusion-strict", route_prefix="/strict")
    url = f"http://127.0.0.1:{serve_port}/strict"
    wait_healthy(url)
    return url


@pytest.fixture(scope="module")
def client(serve_base_url):
    import openai

    return openai.OpenAI(base_url=serve_base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "models" / "refusion-tiny-code"


@pytest.fixture(scope="module")
def accepts():
    """accepts(grammar, text): whether the grammar matches `text` whole (fed as the tokenizer splits it)."""
    from llguidance import LLMatcher
    from transformers import AutoTokenizer

    from decoding.grammar import GrammarTokenizer, with_compile_stack

    tok = AutoTokenizer.from_pretrained(str(SHIPPED_MODEL))
    view = GrammarTokenizer(tok, len(tok), tok.eos_token_id)

    def check(grammar: str, text: str) -> bool:
        matcher = with_compile_stack(lambda: LLMatcher(view.get(), grammar, log_level=0))
        assert not matcher.is_error(), matcher.get_error()
        return matcher.consume_tokens(tok.encode(text, add_special_tokens=False)) and matcher.is_accepting()

    return check
