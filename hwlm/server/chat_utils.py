"""Chat messages to prompt text: the conversation as templates expect it, rendered by the
tokenizer's template or the one ``--chat-template`` gave (``hwlm.server.chat_template``).

Tool calling reaches the template as Hugging Face templates expect it: the request's ``tools``
as the ``tools`` argument, an assistant message's ``tool_calls`` with their arguments as a dict
(templates write them with ``tojson``), a tool result's ``tool_call_id`` and ``name``."""

from __future__ import annotations

import json
from typing import Any

from hwlm.server.errors import APIError
from hwlm.server.protocol import ChatMessage

# Arguments of apply_chat_template that chat_template_kwargs may not override.
_RESERVED = frozenset(
    {"conversation", "tokenize", "add_generation_prompt", "chat_template", "tools"}
)


def conversation(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template expects them; content parts must be text."""
    if not messages:
        raise APIError("messages is empty: give at least one message", param="messages")
    return [_message(i, m) for i, m in enumerate(messages)]


def _message(index: int, message: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": _text(index, message)}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        out["tool_calls"] = [_tool_call(index, call) for call in message.tool_calls]
    return out


def _tool_call(index: int, call: dict[str, Any]) -> dict[str, Any]:
    """An assistant's tool call with its arguments as a dict (they come as JSON text)."""
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise APIError(f"messages[{index}]: a tool call needs function.name", param="messages")
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            pass  # the template gets the text as it is
    return {**call, "function": {**function, "arguments": arguments}}


def _text(index: int, message: ChatMessage) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise APIError(
                f"messages[{index}]: only text content parts are supported, got {part.type!r}",
                param="messages",
            )
        texts.append(part.text)
    return "\n".join(texts)


def apply_chat_template(
    tokenizer: Any,
    messages: list[ChatMessage],
    add_generation_prompt: bool,
    chat_template: str | None = None,
    tools: list[dict[str, Any]] | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> str:
    """The prompt text for ``messages`` (and ``tools``, for templates that show them; extra
    ``template_kwargs`` such as ``enable_thinking`` reach the template too); 400 if there is no
    template or it fails."""
    extra = dict(template_kwargs or {})
    reserved = sorted(_RESERVED & extra.keys())
    if reserved:
        raise APIError(
            f"chat_template_kwargs may not set {', '.join(reserved)}", param="chat_template_kwargs"
        )
    try:
        text = tokenizer.apply_chat_template(
            conversation(messages),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            chat_template=chat_template,
            tools=tools,
            **extra,
        )
    except APIError:
        raise
    except Exception as exc:  # no template, or the template rejects the conversation
        raise APIError(f"cannot apply the chat template: {exc}", param="messages") from exc
    if not isinstance(text, str):
        raise APIError("the chat template did not produce text", param="messages")
    return text
