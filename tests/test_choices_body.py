"""Large non-streamed bodies are written one choice at a time: the bytes are the JSON object
the whole body would be, and a choice's objects are dropped once it is encoded."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

pytest.importorskip("fastapi")

from hwlm.server.sse import SMALL_BODY_CHOICES, _choices_body, choices_response  # noqa: E402

HEAD = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m"}


async def _collect(head: dict[str, Any], choices: list[Any], tail: dict[str, Any]) -> bytes:
    return b"".join([part async for part in _choices_body(head, choices, tail)])


@pytest.mark.parametrize(
    "tail", [{}, {"usage": {"prompt_tokens": 3}}, {"usage": None, "prompt_logprobs": [None, {}]}]
)
def test_the_body_is_the_whole_object(tail: dict[str, Any]) -> None:
    shared = {"tokens": ["a", "é"], "top": [{"x": -1.5}]}  # echo/logprobs shared by choices
    choices = [{"index": i, "text": f"t{i}", "logprobs": shared} for i in range(9)]
    expected = {**HEAD, "choices": [dict(c) for c in choices], **tail}
    body = asyncio.run(_collect(HEAD, choices, tail))
    assert json.loads(body) == expected
    assert choices == [None] * 9  # each choice released once written


def test_small_bodies_are_sent_whole_with_a_length() -> None:
    small = choices_response(HEAD, [{"index": 0}] * SMALL_BODY_CHOICES, {"usage": None})
    assert "content-length" in small.headers
    large = choices_response(HEAD, [{"index": 0}] * (SMALL_BODY_CHOICES + 1), {"usage": None})
    assert "content-length" not in large.headers
