"""The tool-call formats on outputs written the way real models write them (Hermes/Qwen2.5
``<tool_call>``, Llama 3.1/3.2 JSON, Mistral ``[TOOL_CALLS]``, and the forced formats): the
calls and content of a whole output, and the stream deltas of the same output fed in pieces,
which must add up to the whole result."""

from __future__ import annotations

import json
from typing import Any

import pytest

from hwlm.server.tools import ToolCallStreamer, extract_tool_calls, get_tool_format
from hwlm.server.tools.base import ToolFormat
from hwlm.server.tools.forced import NamedFunctionFormat, RequiredFormat
from hwlm.server.tools.json_scan import InvalidJSON, scan_value

WEATHER = {"city": "Paris", "unit": "celsius"}
Call = tuple[str, dict[str, Any]]

# (format, output, content, calls)
CASES: list[tuple[str, str, str | None, list[Call]]] = [
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
        "\n</tool_call>",
        None,
        [("get_weather", WEATHER)],
    ),
    (
        "hermes",
        "Let me look that up for you.\n\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n'
        "</tool_call>",
        "Let me look that up for you.",
        [("get_weather", WEATHER), ("get_time", {"tz": "Europe/Paris"})],
    ),
    (  # a nested, escaped argument, and no closing tag before EOS
        "hermes",
        '<tool_call>\n{"name": "search", "arguments": {"q": "say \\"hi\\" {now}", '
        '"filters": {"tags": ["a", "b"], "limit": 3, "exact": false}}}',
        None,
        [
            (
                "search",
                {
                    "q": 'say "hi" {now}',
                    "filters": {"tags": ["a", "b"], "limit": 3, "exact": False},
                },
            )
        ],
    ),
    (  # not JSON inside the tags: content as written
        "hermes",
        "Sure.\n<tool_call>\nget_weather(city='Paris')\n</tool_call>",
        "Sure.\n<tool_call>\nget_weather(city='Paris')\n</tool_call>",
        [],
    ),
    (  # JSON without a name: content
        "hermes",
        'Here: <tool_call>{"arguments": {}}</tool_call> done',
        'Here: <tool_call>{"arguments": {}}</tool_call> done',
        [],
    ),
    ("hermes", "The weather in Paris is mild.", "The weather in Paris is mild.", []),
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
        None,
        [("get_weather", WEATHER)],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": '
        '"celsius"}}; {"name": "get_time", "parameters": {"tz": "UTC"}}',
        None,
        [("get_weather", WEATHER), ("get_time", {"tz": "UTC"})],
    ),
    (  # arguments as a JSON string
        "llama3_json",
        '{"name": "get_time", "arguments": "{\\"tz\\": \\"UTC\\"}"}',
        None,
        [("get_time", {"tz": "UTC"})],
    ),
    ("llama3_json", "It is sunny in Paris today.", "It is sunny in Paris today.", []),
    (  # a JSON answer that is not a call
        "llama3_json",
        '{"answer": 42, "name": 7}',
        '{"answer": 42, "name": 7}',
        [],
    ),
    (
        "mistral",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
        '"celsius"}}, {"name": "get_time", "arguments": {"tz": "UTC"}}]',
        None,
        [("get_weather", WEATHER), ("get_time", {"tz": "UTC"})],
    ),
    (
        "mistral",
        'I will check. [TOOL_CALLS] [{"name": "get_time", "arguments": {}}]',
        "I will check.",
        [("get_time", {})],
    ),
    (  # the v11 tokenizer's form
        "mistral",
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}'
        '[TOOL_CALLS]get_time[ARGS]{"tz": "UTC"}',
        None,
        [("get_weather", WEATHER), ("get_time", {"tz": "UTC"})],
    ),
    (
        "mistral",
        "[TOOL_CALLS] get_weather(city='Paris')",
        "[TOOL_CALLS] get_weather(city='Paris')",
        [],
    ),
    ("mistral", "No tools needed: 2 + 2 = 4.", "No tools needed: 2 + 2 = 4.", []),
]


def _calls(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI tool-call deltas merged by index, as clients merge them."""
    merged: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        index = delta["index"]
        if index not in merged:
            assert delta["id"].startswith("call_") and delta["type"] == "function", delta
            assert delta["function"]["name"], delta
            merged[index] = {"id": delta["id"], "name": delta["function"]["name"], "arguments": ""}
        else:
            assert set(delta) == {"index", "function"}, delta
            assert set(delta["function"]) == {"arguments"}, delta
        merged[index]["arguments"] += delta["function"]["arguments"]
    assert sorted(merged) == list(range(len(merged)))
    return [merged[i] for i in sorted(merged)]


def _stream(tool_format: ToolFormat, text: str, step: int) -> tuple[str, list[dict[str, Any]]]:
    streamer = ToolCallStreamer(tool_format)
    content, deltas = "", []
    for end in range(step, len(text) + step, step):
        piece, calls = streamer.update(text[:end], final=end >= len(text))
        content += piece
        deltas += calls
    return content, _calls(deltas)


@pytest.mark.parametrize("name,text,content,calls", CASES)
def test_whole_output(name: str, text: str, content: str | None, calls: list[Call]) -> None:
    result = extract_tool_calls(get_tool_format(name), text)
    assert result.content == content
    assert [(c.name, json.loads(c.arguments)) for c in result.calls] == calls
    assert len({c.id for c in result.calls}) == len(calls)


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
@pytest.mark.parametrize("name,text,content,calls", CASES)
def test_stream_adds_up_to_the_whole(
    name: str, text: str, content: str | None, calls: list[Call], step: int
) -> None:
    tool_format = get_tool_format(name)
    streamed_content, streamed = _stream(tool_format, text, step)
    whole = extract_tool_calls(tool_format, text)
    assert (streamed_content or None) == whole.content
    assert [(c["name"], c["arguments"]) for c in streamed] == [
        (c.name, c.arguments) for c in whole.calls
    ]


@pytest.mark.parametrize(
    "name,text",
    [
        ("hermes", 'Ok.<tool_call>{"name": "get_weather", "arguments": {"city": "Pa'),
        ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Pa'),
        ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Pa'),
        ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Pa'),
    ],
)
def test_call_cut_short_is_kept_as_far_as_it_goes(name: str, text: str) -> None:
    """max_tokens ends the output inside a call: the stream has sent it, so the whole
    result keeps it too, with the arguments that came."""
    whole = extract_tool_calls(get_tool_format(name), text)
    assert [(c.name, c.arguments) for c in whole.calls] == [("get_weather", '{"city": "Pa')]
    for step in (1, 4):
        _, streamed = _stream(get_tool_format(name), text, step)
        assert [(c["name"], c["arguments"]) for c in streamed] == [("get_weather", '{"city": "Pa')]


def test_arguments_malformed_after_the_name_went_out() -> None:
    """Arguments that turn out not to be JSON make the block content; a stream has already
    sent the call's name by then (as vLLM's parsers do), but the content agrees."""
    text = '[TOOL_CALLS][{"name": "get_weather", "arguments": {city: "Paris"}}]'
    whole = extract_tool_calls(get_tool_format("mistral"), text)
    assert (whole.content, whole.calls) == (text, [])
    content, streamed = _stream(get_tool_format("mistral"), text, 1)
    assert content == text
    assert [(c["name"], c["arguments"]) for c in streamed] == [("get_weather", "{")]


def test_marker_prefix_is_held_until_known() -> None:
    streamer = ToolCallStreamer(get_tool_format("hermes"))
    assert streamer.update("Hi <tool", final=False) == ("Hi", [])
    assert streamer.update("Hi <tools are fun", final=False) == (" <tools are fun", [])


def test_name_is_sent_before_arguments() -> None:
    streamer = ToolCallStreamer(get_tool_format("hermes"))
    text = '<tool_call>{"name": "get_time", "arguments": {"tz": "U'
    content, deltas = streamer.update(text, final=False)
    assert content == ""
    assert deltas[0]["function"] == {"name": "get_time", "arguments": '{"tz": "U'}
    _, more = streamer.update(text + 'TC"}}</tool_call>', final=True)
    assert more == [{"index": 0, "function": {"arguments": 'TC"}'}}]


def test_parallel_tool_calls_false_keeps_the_first() -> None:
    text = CASES[1][1]
    streamer = ToolCallStreamer(get_tool_format("hermes"), max_calls=1)
    _, deltas = streamer.update(text, final=True)
    assert [c["name"] for c in _calls(deltas)] == ["get_weather"]


def test_forced_named_function() -> None:
    fmt = NamedFunctionFormat("get_weather")
    text = ' {"city": "Paris", "unit": "celsius"}'
    whole = extract_tool_calls(fmt, text)
    assert whole.content is None
    assert [(c.name, json.loads(c.arguments)) for c in whole.calls] == [("get_weather", WEATHER)]
    for step in (1, 5):
        content, streamed = _stream(fmt, text, step)
        assert content == "" and streamed[0]["arguments"] == whole.calls[0].arguments


def test_forced_required_list() -> None:
    fmt = RequiredFormat()
    text = (
        '[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
        '{"name": "get_time", "arguments": {}}]'
    )
    whole = extract_tool_calls(fmt, text)
    assert [c.name for c in whole.calls] == ["get_weather", "get_time"]
    content, streamed = _stream(fmt, text, 2)
    assert [(c["name"], c["arguments"]) for c in streamed] == [
        (c.name, c.arguments) for c in whole.calls
    ]


def test_forced_output_cut_short_keeps_what_came() -> None:
    text = '[{"name": "get_weather", "arguments": {"city": "Pa'
    whole = extract_tool_calls(RequiredFormat(), text)
    assert [(c.name, c.arguments) for c in whole.calls] == [("get_weather", '{"city": "Pa')]
    _, streamed = _stream(RequiredFormat(), text, 4)
    assert streamed[0]["arguments"] == '{"city": "Pa'


@pytest.mark.parametrize(
    "text,end",
    [
        ('{"a": [1, 2.5e3, -0, true, null, "x\\u00e9"]} tail', 44),
        ('"abc', None),
        ("[1, 2", None),
        ("12", None),  # more digits may follow
        ("tru", None),
        ('{"a": 1,', None),
    ],
)
def test_scan_value(text: str, end: int | None) -> None:
    assert scan_value(text, 0) == end


@pytest.mark.parametrize("text", ["{a: 1}", '{"a" 1}', "[1 2]", "01x", '"\\q"', "nul!", '{"a": 1]'])
def test_scan_value_rejects_what_is_not_json(text: str) -> None:
    with pytest.raises(InvalidJSON):
        scan_value(text, 0)


def test_unknown_parser_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="hermes, llama3_json, mistral"):
        get_tool_format("nope")
