"""Reasoning formats (qwen3, deepseek_r1) on outputs written the way those models write them,
whole and streamed, alone and followed by tool calls: a chat message's ``reasoning_content``,
``content`` and ``tool_calls``, and the stream's deltas adding up to the whole message."""

from __future__ import annotations

from typing import Any

import pytest

from hwlm.server.chat_message import MessageFormat, MessageStream, whole_message
from hwlm.server.reasoning import ReasoningStart, get_reasoning_format, split_reasoning
from hwlm.server.tools import get_tool_format

QWEN3 = get_reasoning_format("qwen3")
R1 = get_reasoning_format("deepseek_r1")
CALL = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'

# (format, where the output starts, output, reasoning, content)
CASES: list[tuple[str, ReasoningStart, str, str | None, str | None]] = [
    (
        "qwen3",
        ReasoningStart.TAGGED,
        "<think>\nThe user asks 2+2.\n</think>\n\n4.",
        "The user asks 2+2.",
        "4.",
    ),
    ("qwen3", ReasoningStart.TAGGED, "2 + 2 = 4.", None, "2 + 2 = 4."),
    ("qwen3", ReasoningStart.TAGGED, "<think>\nStill going", "Still going", None),
    (
        "qwen3",
        ReasoningStart.INSIDE,
        "Forced to think.\n</think>\nDone",
        "Forced to think.",
        "Done",
    ),
    ("qwen3", ReasoningStart.AFTER, "<think>x</think>y", None, "<think>x</think>y"),
    (
        "deepseek_r1",
        ReasoningStart.INSIDE,
        "Okay, so 2+2.\n</think>\n\nIt is 4.",
        "Okay, so 2+2.",
        "It is 4.",
    ),
    (
        "deepseek_r1",
        ReasoningStart.INSIDE,
        "<think>\nHmm.\n</think>\n\nIt is 4.",
        "Hmm.",
        "It is 4.",
    ),
    ("deepseek_r1", ReasoningStart.INSIDE, "Hmm, no end in sight", "Hmm, no end in sight", None),
    (
        "deepseek_r1",
        ReasoningStart.INSIDE,
        "a < b </thin but not the end",
        "a < b </thin but not the end",
        None,
    ),
]


def _stream(fmt: MessageFormat, text: str, step: int) -> tuple[dict[str, Any], str | None]:
    """The deltas of ``text`` fed in pieces of ``step`` characters, merged as clients do."""
    stream = MessageStream(fmt)
    merged: dict[str, Any] = {"reasoning_content": "", "content": "", "tool_calls": {}}
    finish = None
    for end in range(step, len(text) + step, step):
        last = end >= len(text)
        delta, finish = stream.update(text[end - step : end], "stop" if last else None)
        merged["reasoning_content"] += delta.get("reasoning_content", "")
        merged["content"] += delta.get("content", "")
        for call in delta.get("tool_calls", []):
            entry = merged["tool_calls"].setdefault(call["index"], {"name": None, "arguments": ""})
            if "id" in call:
                entry["name"] = call["function"]["name"]
            entry["arguments"] += call["function"]["arguments"]
    return merged, finish


@pytest.mark.parametrize("name,start,text,reasoning,content", CASES)
def test_whole(
    name: str, start: ReasoningStart, text: str, reasoning: str | None, content: str | None
) -> None:
    fmt = MessageFormat(get_reasoning_format(name), start)
    message, finish = whole_message(fmt, text, "stop")
    assert (message["reasoning_content"], message["content"]) == (reasoning, content)
    assert finish == "stop"


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
@pytest.mark.parametrize("name,start,text,reasoning,content", CASES)
def test_streamed_deltas_add_up(
    name: str,
    start: ReasoningStart,
    text: str,
    reasoning: str | None,
    content: str | None,
    step: int,
) -> None:
    fmt = MessageFormat(get_reasoning_format(name), start)
    merged, _ = _stream(fmt, text, step)
    assert (merged["reasoning_content"] or None, merged["content"] or None) == (reasoning, content)


def test_end_marker_prefix_is_held() -> None:
    split = split_reasoning(R1, ReasoningStart.INSIDE, "thinking </thi", final=False)
    assert split.reasoning == "thinking"
    split = split_reasoning(R1, ReasoningStart.INSIDE, "thinking </think>ok", final=False)
    assert (split.reasoning, split.content) == ("thinking", "ok")


@pytest.mark.parametrize(
    "fmt,prompt,start",
    [
        (QWEN3, "<|im_start|>assistant\n", ReasoningStart.TAGGED),
        (QWEN3, "<|im_start|>assistant\n<think>\n\n</think>\n\n", ReasoningStart.AFTER),
        (QWEN3, "<|im_start|>assistant\n<think>\n", ReasoningStart.INSIDE),
        (R1, "<｜Assistant｜>", ReasoningStart.INSIDE),
        (R1, "<｜Assistant｜><think>\n", ReasoningStart.INSIDE),
        (R1, "<｜Assistant｜><think></think>", ReasoningStart.AFTER),
    ],
)
def test_start_for_prompt(fmt: Any, prompt: str, start: ReasoningStart) -> None:
    assert fmt.start_for_prompt(prompt) is start


@pytest.mark.parametrize("step", [1, 4, 1000])
def test_reasoning_then_tool_calls(step: int) -> None:
    text = f"<think>\nThe user wants the time; call get_time.\n</think>\n\n{CALL}"
    fmt = MessageFormat(QWEN3, ReasoningStart.TAGGED, tool_format=get_tool_format("hermes"))
    message, finish = whole_message(fmt, text, "stop")
    assert message["reasoning_content"] == "The user wants the time; call get_time."
    assert message["content"] is None
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_time"]
    assert finish == "tool_calls"
    merged, stream_finish = _stream(fmt, text, step)
    assert merged["reasoning_content"] == message["reasoning_content"]
    assert merged["content"] == ""
    assert list(merged["tool_calls"].values()) == [
        {"name": "get_time", "arguments": message["tool_calls"][0]["function"]["arguments"]}
    ]
    assert stream_finish == "tool_calls"


def test_tool_markers_inside_reasoning_are_not_calls() -> None:
    text = f"<think>I could write {CALL} but won't.</think>Plain answer."
    fmt = MessageFormat(QWEN3, ReasoningStart.TAGGED, tool_format=get_tool_format("hermes"))
    message, finish = whole_message(fmt, text, "stop")
    assert "tool_calls" not in message and finish == "stop"
    assert message["content"] == "Plain answer."


def test_include_reasoning_false_drops_it() -> None:
    fmt = MessageFormat(R1, ReasoningStart.INSIDE, include_reasoning=False)
    message, _ = whole_message(fmt, "secret</think>answer", "stop")
    assert (message["reasoning_content"], message["content"]) == (None, "answer")
    merged, _ = _stream(fmt, "secret</think>answer", 3)
    assert (merged["reasoning_content"], merged["content"]) == ("", "answer")


def test_unknown_reasoning_parser() -> None:
    with pytest.raises(ValueError, match="deepseek_r1, qwen3"):
        get_reasoning_format("nope")


class _Seam:
    """What ChatShape.plan reads of the engine: the tokenizer and the limits."""

    max_model_len = 1024
    max_logprobs = 20
    sampling_defaults: dict[str, Any] = {}

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))


@pytest.mark.parametrize("thinking", [True, False])
def test_constraint_applies_after_the_reasoning(thinking: bool) -> None:
    """With a reasoning parser, the grammar starts after the end marker's tokens, unless the
    prompt has already closed the reasoning."""
    import asyncio

    pytest.importorskip("fastapi")
    transformers = pytest.importorskip("transformers")
    from hwlm import presets
    from hwlm.server.chat import ChatSettings, ChatShape
    from hwlm.server.protocol import ChatCompletionRequest

    tokenizer = transformers.AutoTokenizer.from_pretrained(presets.TOKENIZER_DIR)
    opening = "<think>\n" if thinking else "<think>\n\n</think>\n\n"
    template = (
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: " + opening + "{% endif %}"
    )
    request = ChatCompletionRequest(
        messages=[{"role": "user", "content": "Is 91 prime?"}],
        response_format={"type": "json_object"},
    )
    shape = ChatShape(request, "m", settings=ChatSettings(template, reasoning=R1))
    plan = asyncio.run(shape.plan(_Seam(tokenizer)))  # type: ignore[arg-type]
    constraint = plan.params.structured_outputs
    assert constraint is not None and constraint.json_object is True
    expected = tokenizer.encode("</think>", add_special_tokens=False) if thinking else None
    assert constraint.after_token_ids == expected
