"""Tool calls end to end: a tiny Qwen3 trained in-session (ReFusion objective, seconds) to answer weather
questions with a `<tool_call>{...}</tool_call>` block, deployed as its own Ray Serve application (prefix
/tools) on the session's Serve instance, with the `openai` SDK as the client. The model really writes
the block; the API parses it into `tool_calls` (plain and streamed).
"""

from __future__ import annotations

import json

import openai
import pytest
from model_factory import build_tokenizer

from integrations.chat import render_chat
from integrations.openai_models import ChatCompletionRequest

TOOLS = [{
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather for a city",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}]
CITIES = ["Paris", "Tokyo", "Lima"]
AR = {"mode": "ar"}


def _question(city: str) -> list[dict]:
    return [{"role": "user", "content": f"What is the weather in {city}?"}]


def _call(city: str) -> str:
    return '<tool_call>{"name": "get_weather", "arguments": {"city": "%s"}}</tool_call>' % city


@pytest.fixture(scope="module")
def tool_model_dir(tmp_path_factory):
    """Random tiny Qwen3 + the test BPE tokenizer, trained to emit the tool call for each city."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from training.trainer import train_model

    out = tmp_path_factory.mktemp("tool-model")
    bodies = {city: ChatCompletionRequest(messages=_question(city), tools=TOOLS) for city in CITIES}
    # The tokenizer also learns this test's phrases, so a call is a handful of tokens (quick to learn).
    prompts = {city: render_chat(None, b.messages, b.tools)[0] for city, b in bodies.items()}
    tok = build_tokenizer(out, vocab_size=512, extra_text=[t for c in CITIES for t in (prompts[c], _call(c))] * 20)
    eos, mask = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|mask|>")
    for city, body in bodies.items():  # exactly what the API will render with this tokenizer
        assert render_chat(tok, body.messages, body.tools)[0] == prompts[city]
    pairs = [(tok.encode(prompts[c], add_special_tokens=False), tok.encode(_call(c), add_special_tokens=False))
             for c in CITIES]
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=eos, pad_token_id=eos)
    model = Qwen3ForCausalLM(config).float()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        longest = max(len(p) + len(r) + 1 for p, r in pairs)
        records = train_model(model, pairs * 4, steps=300, batch_tokens=6 * longest, lr=1e-2, mask_token_id=mask,
                              eos_token_id=eos, seed=0, log_every=100)
    finally:
        torch.set_num_threads(threads)
    assert records[-1]["train_loss"] < 0.2, records
    model.save_pretrained(out)
    config_json = json.loads((out / "config.json").read_text())
    config_json["mask_token_id"] = mask
    (out / "config.json").write_text(json.dumps(config_json))
    return out


@pytest.fixture(scope="module")
def sdk(serve_port, tool_model_dir):
    from ray import serve

    from serve_testbed import serve_config, wait_healthy
    from integrations.serve_app import build_app

    serve.run(build_app(serve_config(tool_model_dir)), name="refusion-tools", route_prefix="/tools")
    url = f"http://127.0.0.1:{serve_port}/tools"
    wait_healthy(url)
    try:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    finally:
        serve.delete("refusion-tools")


def _model(sdk) -> str:
    return sdk.models.list().data[0].id


def _gather_stream(stream) -> tuple[str, str, str | None, str]:
    """(tool name, arguments, finish_reason, content) assembled from a streamed chat completion."""
    name, arguments, finish, content = "", "", None, ""
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for part in delta.tool_calls or []:
            name += part.function.name or "" if part.function else ""
            arguments += part.function.arguments or "" if part.function else ""
        finish = chunk.choices[0].finish_reason or finish
    return name, arguments, finish, content


@pytest.mark.parametrize("city", CITIES[:2])
def test_model_written_tool_call_is_parsed(sdk, city):
    out = sdk.chat.completions.create(model=_model(sdk), messages=_question(city), tools=TOOLS,
                                      max_tokens=96, extra_body=AR)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls", repr(choice.message.content)
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": city}, repr(call)
    assert "<tool_call>" not in (choice.message.content or "")


def test_model_written_tool_call_is_parsed_when_streamed(sdk):
    stream = sdk.chat.completions.create(model=_model(sdk), messages=_question("Lima"), tools=TOOLS,
                                         max_tokens=96, extra_body=AR, stream=True)
    name, arguments, finish, content = _gather_stream(stream)
    assert finish == "tool_calls"
    assert name == "get_weather" and json.loads(arguments) == {"city": "Lima"}
    assert "<tool_call>" not in content


def test_without_tools_the_block_stays_text(sdk):
    # No `tools` in the request: the prompt has no tools section and nothing is parsed into tool_calls.
    out = sdk.chat.completions.create(model=_model(sdk), messages=_question("Paris"), max_tokens=96,
                                      extra_body=AR)
    assert out.choices[0].message.tool_calls is None
    assert out.choices[0].finish_reason in ("stop", "length")


def test_turn_cut_by_max_tokens_after_a_call_reports_length(sdk, tool_model_dir):
    # max_tokens = exactly the call's tokens: the block closes, then the cap ends the turn before the
    # model could end it (EOS). The call is parsed, but the turn was cut: finish_reason "length".
    from transformers import AutoTokenizer

    n_call = len(AutoTokenizer.from_pretrained(tool_model_dir).encode(_call("Paris"), add_special_tokens=False))
    out = sdk.chat.completions.create(model=_model(sdk), messages=_question("Paris"), tools=TOOLS,
                                      max_tokens=n_call, extra_body=AR)
    assert out.choices[0].finish_reason == "length"
    assert [c.function.name for c in out.choices[0].message.tool_calls] == ["get_weather"]
    stream = sdk.chat.completions.create(model=_model(sdk), messages=_question("Paris"), tools=TOOLS,
                                         max_tokens=n_call, extra_body=AR, stream=True)
    finishes = [c.choices[0].finish_reason for c in stream if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]


def test_a_call_cut_by_max_tokens_is_an_incomplete_call_not_text(sdk, tool_model_dir):
    # The cap falls inside the arguments: the call comes back with the arguments so far (OpenAI's
    # behaviour; not valid JSON) and finish_reason "length"; its markup was the content before (helper-123).
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tool_model_dir)
    ids = tokenizer.encode(_call("Paris"), add_special_tokens=False)
    # the last cap inside the city's string, and the last inside the closing `</tool_call>`
    in_arguments = max(k for k in range(len(ids)) if 'Paris"' not in tokenizer.decode(ids[:k]))
    in_close = max(k for k in range(len(ids)) if "</tool_call>" not in tokenizer.decode(ids[:k]))
    for cap in (in_arguments, in_close):
        kwargs = dict(model=_model(sdk), messages=_question("Paris"), tools=TOOLS, max_tokens=cap, extra_body=AR)
        out = sdk.chat.completions.create(**kwargs)
        message = out.choices[0].message
        [call] = message.tool_calls
        assert out.choices[0].finish_reason == "length" and not message.content and call.function.name == "get_weather"
        arguments = call.function.arguments
        if cap == in_arguments:  # the arguments so far: not JSON yet
            assert '{"city": "Paris"}'.startswith(arguments) and len(arguments) < len('{"city": "Paris"}'), arguments
        else:  # whole arguments, the cut in the call's closing text
            assert json.loads(arguments) == {"city": "Paris"}
        streamed = [d.tool_calls[0] for c in sdk.chat.completions.create(stream=True, **kwargs) if c.choices
                    for d in [c.choices[0].delta] if d.tool_calls]
        # streamed as OpenAI streams a call (the tools grammar constrains it): its name first, then the
        # arguments in pieces that add up to the whole answer's
        assert [(c.index, c.function.name) for c in streamed[:1]] == [(0, "get_weather")]
        assert all(c.index == 0 and c.function.name is None for c in streamed[1:])
        assert "".join(c.function.arguments for c in streamed) == arguments


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_forced_tool_choice_is_prefilled_and_parsed(sdk, choice):
    # tool_choice "required" / a named function: the assistant's turn starts with the call's opening
    # (integrations.tool_calls.forced_call); the model writes the rest, the API parses the whole.
    out = sdk.chat.completions.create(model=_model(sdk), messages=_question("Tokyo"), tools=TOOLS, tool_choice=choice,
                                      max_tokens=96, extra_body=AR)
    choice_out = out.choices[0]
    assert choice_out.finish_reason == "tool_calls", repr(choice_out.message.content)
    (call,) = choice_out.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Tokyo"}
    # the prefilled tokens are prompt, not completion: usage counts only what the model wrote
    unforced = sdk.chat.completions.create(model=_model(sdk), messages=_question("Tokyo"), tools=TOOLS,
                                           max_tokens=96, extra_body=AR)
    assert out.usage.completion_tokens < unforced.usage.completion_tokens
    assert out.usage.prompt_tokens > unforced.usage.prompt_tokens


def test_forced_named_tool_choice_streamed(sdk):
    stream = sdk.chat.completions.create(model=_model(sdk), messages=_question("Paris"), tools=TOOLS, max_tokens=96,
                                         tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                         extra_body=AR, stream=True)
    name, arguments, finish, content = _gather_stream(stream)
    assert finish == "tool_calls" and not content
    assert name == "get_weather" and json.loads(arguments) == {"city": "Paris"}


def test_tool_choice_naming_a_tool_not_offered_is_a_400(sdk):
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(model=_model(sdk), messages=_question("Paris"), tools=TOOLS, max_tokens=8,
                                    tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert "tool_choice" in str(err.value) and "get_weather" in str(err.value)


RESPONSES_TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather for a city",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]


def test_responses_api_returns_the_model_written_call_as_a_function_call_item(sdk):
    """POST /v1/responses (openai SDK `responses.create`): the same turn as chat, the call as a
    function_call output item; streamed, its events carry the same call; sending the call and its
    output back as input items continues the conversation."""
    out = sdk.responses.create(model=_model(sdk), input=_question("Paris"), tools=RESPONSES_TOOLS,
                               max_output_tokens=96, extra_body=AR)
    assert out.status == "completed" and out.usage.output_tokens > 0
    (call,) = [item for item in out.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id.startswith("call_") and call.status == "completed"
    events = list(sdk.responses.create(model=_model(sdk), input=_question("Lima"), tools=RESPONSES_TOOLS,
                                       max_output_tokens=96, extra_body=AR, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = [e.item for e in events if e.type == "response.output_item.done" and e.item.type == "function_call"]
    assert len(done) == 1 and json.loads(done[0].arguments) == {"city": "Lima"}
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert arguments == done[0].arguments
    final = events[-1].response
    assert [i.type for i in final.output] == [i.type for i in out.output]
    follow = sdk.responses.create(model=_model(sdk), max_output_tokens=8, extra_body=AR, tools=RESPONSES_TOOLS, input=[
        *_question("Paris"),
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}])
    assert follow.status in ("completed", "incomplete") and follow.usage.input_tokens > out.usage.input_tokens
