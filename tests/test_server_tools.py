"""Tool calling and reasoning through the server, against one real ``python -m hwlm.server``
process (hwlm-tiny, random weights) with ``--enable-auto-tool-choice --tool-call-parser hermes
--reasoning-parser deepseek_r1`` and a chat template that shows the tools and calls (and checks,
when asked, that they reached it). ``required`` and a named function are forced by a grammar, so
even random weights make valid calls: each is checked against its function's schema, streamed
and not. Then the official ``openai`` client, LangChain and litellm against the same server."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("fastapi")

from tests.server_helpers import server_process, sse_events  # noqa: E402

MODEL = "hwlm-tiny"
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {
        "tz": {"enum": ["UTC", "CET"]},
        "hours": {"type": "integer", "minimum": 0, "maximum": 23},
    },
    "required": ["tz"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
MAX_TOKENS = 120

# ChatML that shows the tools and the calls in the history. With ``expect_tools`` it fails
# unless the request's tools reached it; with ``expect_city``, unless an assistant's call
# arguments reached it as a dict. ``thinking`` opens the reasoning in the prompt; otherwise the
# prompt closes it (as Qwen3 with enable_thinking=false), so the answer starts at once.
TEMPLATE = """\
{%- if expect_tools is defined and (tools or []) | map(attribute='function.name') | list \
!= expect_tools %}{{ raise_exception('the tools did not reach the template') }}{% endif %}
{%- if tools %}<|im_start|>system
Tools: {{ tools | tojson }}<|im_end|>
{% endif %}
{%- for m in messages %}<|im_start|>{{ m.role }}
{%- for c in m.tool_calls or [] %}
{%- if expect_city is defined and c.function.arguments.city != expect_city %}\
{{ raise_exception('the call arguments did not reach the template as a dict') }}{% endif %}
<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>
{%- endfor %}
{{ m.content }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if thinking | default(false) %}<think>
{% else %}<think>

</think>

{% endif %}{% endif %}"""


@pytest.fixture(scope="module")
def server(device: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("tools")
    template = folder / "template.jinja"
    template.write_text(TEMPLATE)
    args = [MODEL, "--device", device, "--max-model-len", "1024", "--max-num-seqs", "32"]
    args += ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    args += ["--reasoning-parser", "deepseek_r1", "--chat-template", str(template)]
    with server_process(args, folder / "server.log", env={"HWLM_API_KEY": ""}) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(server: str) -> Any:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def _chat(server: str, **body: Any) -> Any:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS, **body}
    return httpx.post(f"{server}/v1/chat/completions", json=body, timeout=120)


def _streamed(server: str, **body: Any) -> list[dict[str, Any]]:
    """The choices of a streamed chat, each merged from its deltas as clients merge them."""
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "stream": True, **body}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    choices: dict[int, dict[str, Any]] = {}
    for event in events[:-1]:
        for choice in event["choices"]:
            merged = choices.setdefault(
                choice["index"],
                {"content": "", "reasoning_content": "", "tool_calls": {}, "finish_reason": None},
            )
            delta = choice["delta"]
            merged["content"] += delta.get("content") or ""
            merged["reasoning_content"] += delta.get("reasoning_content") or ""
            for call in delta.get("tool_calls", []):
                calls = merged["tool_calls"]
                if call["index"] not in calls:  # the first delta: id, type and name
                    assert call["id"].startswith("call_") and call["type"] == "function"
                    calls[call["index"]] = {
                        "id": call["id"],
                        "name": call["function"]["name"],
                        "arguments": "",
                    }
                else:
                    assert "id" not in call and "name" not in call["function"]
                calls[call["index"]]["arguments"] += call["function"].get("arguments", "")
            merged["finish_reason"] = choice["finish_reason"] or merged["finish_reason"]
    return [choices[i] for i in sorted(choices)]


def _check_call(name: str, arguments: str, only: str | None = None) -> None:
    assert name in SCHEMAS and (only is None or name == only), name
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def _check_message_calls(
    message: dict[str, Any], only: str | None = None, cut_short: bool = False
) -> int:
    """Check each call of a message (the last one may be unfinished when ``cut_short``);
    the number of calls."""
    calls = message["tool_calls"]
    assert calls and message["content"] is None
    for i, call in enumerate(calls):
        assert call["id"].startswith("call_") and call["type"] == "function"
        if not (cut_short and i == len(calls) - 1):
            _check_call(call["function"]["name"], call["function"]["arguments"], only)
    assert len({c["id"] for c in calls}) == len(calls)
    return len(calls)


# tool_choice ------------------------------------------------------------------------------------


def test_required(server: str) -> None:
    """Every call is valid. With random weights the list of calls may go on until max_tokens
    (nothing bounds its length), leaving the last call unfinished."""
    r = _chat(server, tools=TOOLS, tool_choice="required", n=2, seed=0, max_tokens=80)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] in ("tool_calls", "length"), choice
        _check_message_calls(choice["message"], cut_short=choice["finish_reason"] == "length")


def test_required_streamed(server: str) -> None:
    for choice in _streamed(server, tools=TOOLS, tool_choice="required", seed=1, max_tokens=80):
        assert choice["finish_reason"] in ("tool_calls", "length")
        assert choice["content"] == "" and choice["tool_calls"]
        calls = list(choice["tool_calls"].values())
        if choice["finish_reason"] == "length":
            calls = calls[:-1]
        for call in calls:
            _check_call(call["name"], call["arguments"])


def test_required_without_parallel_calls_makes_one(server: str) -> None:
    r = _chat(server, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, n=3)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "tool_calls"
        assert _check_message_calls(choice["message"]) == 1
    for choice in _streamed(server, tools=TOOLS, tool_choice="required", parallel_tool_calls=False):
        assert choice["finish_reason"] == "tool_calls"
        (call,) = choice["tool_calls"].values()
        _check_call(call["name"], call["arguments"])


@pytest.mark.parametrize("name", ["get_weather", "get_time"])
def test_named_function(server: str, name: str) -> None:
    choice_field = {"type": "function", "function": {"name": name}}
    r = _chat(server, tools=TOOLS, tool_choice=choice_field, n=2)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "tool_calls"
        assert _check_message_calls(choice["message"], only=name) == 1
    for choice in _streamed(server, tools=TOOLS, tool_choice=choice_field):
        assert choice["finish_reason"] == "tool_calls"
        (call,) = choice["tool_calls"].values()
        _check_call(call["name"], call["arguments"], only=name)


@pytest.mark.parametrize("stream", [False, True])
def test_auto(server: str, stream: bool) -> None:
    """The model decides: random weights rarely write a call, but whatever comes is either
    content or valid calls, and a call ends the choice with tool_calls."""
    body = {"tools": TOOLS, "max_tokens": 16, "n": 2}
    if stream:
        choices = _streamed(server, **body)
        messages = [
            (c["content"], list(c["tool_calls"].values()), c["finish_reason"]) for c in choices
        ]
        calls = [(m["name"], m["arguments"]) for _, cs, _ in messages for m in cs]
    else:
        r = _chat(server, **body)
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        messages = [
            (c["message"]["content"], c["message"].get("tool_calls", []), c["finish_reason"])
            for c in choices
        ]
        calls = [
            (m["function"]["name"], m["function"]["arguments"]) for _, cs, _ in messages for m in cs
        ]
    assert len(messages) == 2
    for content, made, finish in messages:
        assert (finish == "tool_calls") == (bool(made) and finish != "length") or not made
        assert made or isinstance(content, str)
    for name, _ in calls:
        assert name in SCHEMAS


@pytest.mark.parametrize("stream", [False, True])
def test_none(server: str, stream: bool) -> None:
    body = {"tools": TOOLS, "tool_choice": "none", "max_tokens": 8}
    if stream:
        (choice,) = _streamed(server, **body)
        assert choice["tool_calls"] == {} and choice["finish_reason"] in ("stop", "length")
    else:
        r = _chat(server, **body)
        assert r.status_code == 200, r.text
        (choice,) = r.json()["choices"]
        assert "tool_calls" not in choice["message"]
        assert choice["finish_reason"] in ("stop", "length")


def test_tools_and_history_reach_the_template(server: str) -> None:
    names = ["get_weather", "get_time"]
    ok = _chat(
        server,
        tools=TOOLS,
        tool_choice="none",
        max_tokens=2,
        chat_template_kwargs={"expect_tools": names},
    )
    assert ok.status_code == 200, ok.text
    wrong = _chat(
        server,
        tools=TOOLS,
        tool_choice="none",
        max_tokens=2,
        chat_template_kwargs={"expect_tools": ["other"]},
    )
    assert wrong.status_code == 400 and "did not reach" in wrong.json()["error"]["message"]
    history = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "unit": "celsius"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]
    r = _chat(
        server,
        messages=history,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        chat_template_kwargs={"expect_city": "Paris"},
    )
    assert r.status_code == 200, r.text
    _check_message_calls(r.json()["choices"][0]["message"])
    bad = _chat(
        server,
        messages=history,
        tools=TOOLS,
        tool_choice="none",
        max_tokens=2,
        chat_template_kwargs={"expect_city": "Rome"},
    )
    assert bad.status_code == 400


@pytest.mark.parametrize(
    "body,param",
    [
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "retrieval"}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}
                ],
                "tool_choice": "required",
            },
            "tools",
        ),
        ({"functions": [{"name": "f"}]}, "functions"),
    ],
)
def test_tool_errors_name_the_field(server: str, body: dict[str, Any], param: str) -> None:
    r = _chat(server, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


# Reasoning ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_content(server: str, stream: bool) -> None:
    """The prompt opens the reasoning and random weights never close it: all reasoning."""
    body = {"max_tokens": 12, "chat_template_kwargs": {"thinking": True}}
    if stream:
        (choice,) = _streamed(server, **body)
        assert choice["reasoning_content"] and choice["content"] == ""
    else:
        r = _chat(server, **body)
        assert r.status_code == 200, r.text
        message = r.json()["choices"][0]["message"]
        assert message["reasoning_content"] and message["content"] is None


def test_reasoning_closed_by_the_prompt_leaves_the_answer_constrained(server: str) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    r = _chat(server, response_format={"type": "json_schema", "json_schema": {"schema": schema}})
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert message["reasoning_content"] is None
    jsonschema.validate(json.loads(message["content"]), schema)


# Clients --------------------------------------------------------------------------------------


def test_openai_client_tools(client: Any) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=MAX_TOKENS,
        parallel_tool_calls=False,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    for call in choice.message.tool_calls:
        _check_call(call.function.name, call.function.arguments)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        tools=TOOLS,
        max_tokens=MAX_TOKENS,
        stream=True,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    arguments = "".join(
        c.function.arguments or ""
        for chunk in stream
        for choice in chunk.choices
        for c in choice.delta.tool_calls or []
    )
    _check_call("get_time", arguments)


def test_langchain(server: str) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    pydantic = pytest.importorskip("pydantic")

    class Weather(pydantic.BaseModel):
        """The weather in a city."""

        model_config = pydantic.ConfigDict(extra="forbid")  # bounded: no other keys
        city: str = pydantic.Field(max_length=8)
        unit: str = pydantic.Field(pattern="^(celsius|fahrenheit)$")

    llm = langchain_openai.ChatOpenAI(
        model=MODEL,
        base_url=f"{server}/v1",
        api_key="unused",
        max_tokens=MAX_TOKENS,
        max_retries=0,
        timeout=120,
    )
    for method in ("json_schema", "function_calling"):
        result = llm.with_structured_output(Weather, method=method).invoke("Weather in Paris?")
        assert isinstance(result, Weather), method
    bound = llm.bind_tools(TOOLS, tool_choice="any", parallel_tool_calls=False)
    message = bound.invoke("Weather in Paris?")
    assert message.tool_calls
    for call in message.tool_calls:
        _check_call(call["name"], json.dumps(call["args"]))


def test_litellm(server: str) -> None:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download at import
    litellm = pytest.importorskip("litellm")
    response = litellm.completion(
        model=f"openai/{MODEL}",
        api_base=f"{server}/v1",
        api_key="unused",
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=MAX_TOKENS,
        parallel_tool_calls=False,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    for call in choice.message.tool_calls:
        _check_call(call.function.name, call.function.arguments)
