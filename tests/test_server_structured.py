"""Structured outputs through the server: ``response_format``, vLLM's ``structured_outputs`` and
``guided_*`` fields on /v1/chat/completions and /v1/completions, against one real
``python -m hwlm.server`` process (hwlm-tiny, random weights) shared by the module. With random
weights a valid output comes from the constraint alone, so every output is checked against
its schema, regex or choices. Also: the 400s (two constraints, a bad schema or regex, a field
hwlm cannot honour) naming the field, ``GET /v1/models/{id}``, and the endpoints hwlm does not
serve answering 404."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("fastapi")

from tests.server_helpers import server_process, sse_events  # noqa: E402

MODEL = "hwlm-tiny"
MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]

# Nested objects, arrays, enums, bounded integers, additionalProperties false; every string and
# array is bounded, so a random model finishes within max_tokens (a float's digits are not:
# those are left out).
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
        "tags": {
            "type": "array",
            "items": {"type": "string", "maxLength": 5},
            "maxItems": 2,
        },
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "active", "tags", "address"],
    "additionalProperties": False,
}
SMALL = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 1, "maximum": 9},
    },
    "required": ["ok", "n"],
    "additionalProperties": False,
}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
SMALL_FORMAT = {"type": "json_schema", "json_schema": {"name": "small", "schema": SMALL}}
MAX_TOKENS = 200


@pytest.fixture(scope="module")
def server(device: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    args = [MODEL, "--device", device, "--max-model-len", "1024", "--max-num-seqs", "32"]
    log = tmp_path_factory.mktemp("structured") / "server.log"
    with server_process(args, log, env={"HWLM_API_KEY": ""}) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(server: str) -> Any:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def _post(server: str, path: str, body: dict[str, Any]) -> Any:
    return httpx.post(f"{server}/v1/{path}", json={"model": MODEL, **body}, timeout=120)


def _chat_texts(server: str, body: dict[str, Any]) -> list[str]:
    r = _post(server, "chat/completions", {"messages": MESSAGES, **body})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert all(c["finish_reason"] == "stop" for c in choices), choices
    return [c["message"]["content"] for c in choices]


def _completion_texts(server: str, body: dict[str, Any]) -> list[str]:
    r = _post(server, "completions", {"prompt": "JSON:", **body})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert all(c["finish_reason"] == "stop" for c in choices), choices
    return [c["text"] for c in choices]


def _validate(text: str, schema: dict[str, Any]) -> Any:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


# response_format ----------------------------------------------------------------------------


def test_json_schema_n4_all_valid(server: str) -> None:
    texts = _chat_texts(
        server,
        {"response_format": JSON_SCHEMA_FORMAT, "n": 4, "max_tokens": MAX_TOKENS, "seed": 1},
    )
    assert len(texts) == 4
    values = [_validate(t, PERSON) for t in texts]
    assert len({json.dumps(v, sort_keys=True) for v in values}) > 1  # sampled, not one answer


def test_json_schema_many_samples_valid(server: str) -> None:
    """Many samples of a small schema, over the completions endpoint (n=16 per request)."""
    for seed in range(2):
        body = {
            "response_format": SMALL_FORMAT,
            "n": 16,
            "max_tokens": 40,
            "seed": seed,
        }
        for text in _completion_texts(server, body):
            _validate(text, SMALL)


def test_json_schema_streamed(server: str) -> None:
    body = {"messages": MESSAGES, "response_format": SMALL_FORMAT, "stream": True}
    body |= {"max_tokens": MAX_TOKENS, "n": 2, "model": MODEL}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    texts: dict[int, str] = {}
    for event in events[:-1]:
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + (
                choice["delta"].get("content") or ""
            )
    assert sorted(texts) == [0, 1]
    for text in texts.values():
        _validate(text, SMALL)


def test_json_object(server: str) -> None:
    body = {"response_format": {"type": "json_object"}, "max_tokens": 20, "n": 2}
    r = _post(server, "chat/completions", {"messages": MESSAGES, **body})
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        text = choice["message"]["content"]
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(text), dict)
        else:  # an unbounded object may run out of tokens: what came is an object's start
            assert text.lstrip().startswith("{")


def test_response_format_text_is_unconstrained(server: str) -> None:
    r = _post(
        server,
        "chat/completions",
        {"messages": MESSAGES, "response_format": {"type": "text"}, "max_tokens": 4},
    )
    assert r.status_code == 200, r.text


# vLLM's fields ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["chat/completions", "completions"])
def test_guided_fields(server: str, path: str) -> None:
    texts = _chat_texts if path == "chat/completions" else _completion_texts
    for text in texts(server, {"guided_json": SMALL, "max_tokens": 40, "n": 2}):
        _validate(text, SMALL)
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    for text in texts(server, {"guided_regex": pattern, "max_tokens": 20, "n": 2}):
        assert re.fullmatch(pattern, text), text
    choices = ["red", "green", "blue"]
    for text in texts(server, {"guided_choice": choices, "max_tokens": 10, "n": 4}):
        assert text in choices
    grammar = 'start: "yes" | "no" | "maybe"'
    for text in texts(
        server, {"guided_grammar": grammar, "max_tokens": 10, "guided_decoding_backend": "x"}
    ):
        assert text in ("yes", "no", "maybe")


@pytest.mark.parametrize(
    "spec,check",
    [
        ({"json": SMALL}, lambda t: jsonschema.validate(json.loads(t), SMALL)),
        ({"json": json.dumps(SMALL)}, lambda t: jsonschema.validate(json.loads(t), SMALL)),
        ({"regex": "(ab|cd){2}"}, lambda t: re.fullmatch("(ab|cd){2}", t)),
        ({"choice": ["one", "two"]}, lambda t: t in ("one", "two")),
    ],
)
def test_structured_outputs_field(server: str, spec: dict[str, Any], check: Any) -> None:
    for text in _completion_texts(server, {"structured_outputs": spec, "max_tokens": 40, "n": 2}):
        assert check(text) is not False, text


# The official client --------------------------------------------------------------------------


def test_openai_client_response_format(client: Any) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, response_format=SMALL_FORMAT, max_tokens=MAX_TOKENS
    )
    _validate(response.choices[0].message.content, SMALL)


def test_openai_client_parse_with_pydantic(client: Any) -> None:
    pydantic = pytest.importorskip("pydantic")
    parse = getattr(getattr(client, "chat", None).completions, "parse", None)
    if parse is None:
        parse = getattr(client.beta.chat.completions, "parse", None)
    assert parse is not None, "the installed openai client has no chat.completions.parse"

    class Answer(pydantic.BaseModel):
        ok: bool
        level: int = pydantic.Field(ge=1, le=5)
        color: str = pydantic.Field(pattern="^(red|blue)$")

    completion = parse(model=MODEL, messages=MESSAGES, response_format=Answer, max_tokens=60)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Answer)
    assert 1 <= parsed.level <= 5 and parsed.color in ("red", "blue")


# Errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body,param",
    [
        ({"response_format": JSON_SCHEMA_FORMAT, "guided_json": SMALL}, "guided_json"),
        ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
        ({"structured_outputs": {"json": SMALL, "regex": "a"}}, "structured_outputs"),
        ({"guided_regex": "[0-9"}, "guided_regex"),
        ({"guided_json": "{not json"}, "guided_json"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 3}}}},
            "response_format",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_grammar": "start: ("}, "guided_grammar"),
        ({"guided_whitespace_pattern": r"\s*"}, "guided_whitespace_pattern"),
        ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "structured_outputs"),
        ({"structured_outputs": {"jsn": {}}}, "structured_outputs"),
    ],
)
@pytest.mark.parametrize("path", ["chat/completions", "completions"])
def test_bad_constraints_are_400_naming_the_field(
    server: str, path: str, body: dict[str, Any], param: str
) -> None:
    prompt = {"messages": MESSAGES} if path == "chat/completions" else {"prompt": "x"}
    r = _post(server, path, {**prompt, **body, "max_tokens": 5})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error" and error["message"]


def test_tools_auto_needs_the_server_flags(server: str) -> None:
    """As vLLM: tools default to tool_choice auto, which needs --enable-auto-tool-choice and
    --tool-call-parser (this server has neither); none always works."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": SMALL}}]
    for choice in (None, "auto"):
        body = {"messages": MESSAGES, "tools": tools, "max_tokens": 2}
        r = _post(
            server, "chat/completions", body if choice is None else {**body, "tool_choice": choice}
        )
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "tool_choice" and "--enable-auto-tool-choice" in error["message"]
    r = _post(
        server,
        "chat/completions",
        {"messages": MESSAGES, "tools": tools, "tool_choice": "none", "max_tokens": 2},
    )
    assert r.status_code == 200, r.text
    assert "tool_calls" not in r.json()["choices"][0]["message"]


# Endpoints ------------------------------------------------------------------------------------


def test_get_model(server: str, client: Any) -> None:
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model"
    r = httpx.get(f"{server}/v1/models/other-model", timeout=10)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"
    assert r.json()["error"]["param"] == "model"


@pytest.mark.parametrize(
    "method,path",
    [
        ("POST", "/v1/responses"),
        ("GET", "/v1/responses/resp_123"),
        ("POST", "/v1/embeddings"),
        ("POST", "/v1/audio/transcriptions"),
        ("POST", "/v1/images/generations"),
        ("POST", "/v1/moderations"),
        ("GET", "/v1/files"),
        ("POST", "/v1/batches"),
        ("POST", "/v1/fine_tuning/jobs"),
        ("POST", "/v1/rerank"),
        ("POST", "/v1/score"),
        ("POST", "/pooling"),
    ],
)
def test_unserved_endpoints_are_404_naming_them(server: str, method: str, path: str) -> None:
    r = httpx.request(method, f"{server}{path}", json={"model": MODEL}, timeout=10)
    assert r.status_code == 404, r.text
    message = r.json()["error"]["message"]
    assert path in message and "not served by hwlm" in message


def test_openai_client_embeddings_is_not_found(client: Any) -> None:
    with pytest.raises(openai.NotFoundError, match="not served by hwlm"):
        client.embeddings.create(model=MODEL, input="hello")
