"""Chat messages to prompt text: the conversation as templates expect it, rendered by the
tokenizer's template or the one ``--chat-template`` gave (``hwlm.server.chat_template``)."""

from __future__ import annotations

from typing import Any

from hwlm.server.errors import APIError
from hwlm.server.protocol import ChatMessage


def conversation(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as the chat template expects them; content parts must be text."""
    if not messages:
        raise APIError("messages is empty: give at least one message", param="messages")
    return [{"role": m.role, "content": _text(i, m)} for i, m in enumerate(messages)]


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
) -> str:
    """The prompt text for ``messages``; 400 if there is no template or it fails."""
    try:
        text = tokenizer.apply_chat_template(
            conversation(messages),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            chat_template=chat_template,
        )
    except APIError:
        raise
    except Exception as exc:  # no template, or the template rejects the conversation
        raise APIError(f"cannot apply the chat template: {exc}", param="messages") from exc
    if not isinstance(text, str):
        raise APIError("the chat template did not produce text", param="messages")
    return text
