"""Chat messages to prompt text: the conversation as templates expect it, and ``--chat-template``
(a file or an inline Jinja template) overriding the tokenizer's own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hwlm.server.errors import APIError
from hwlm.server.protocol import ChatMessage

_TEMPLATE_MARKERS = ("{{", "{%")


def load_chat_template(value: str | None) -> str | None:
    """``--chat-template``: a path to a Jinja file, or the template itself (as vLLM accepts).
    A value that is neither an existing file nor template-like is a ValueError."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if any(marker in value for marker in _TEMPLATE_MARKERS):
        return value.replace("\\n", "\n")  # a shell-quoted inline template's escaped newlines
    raise ValueError(f"--chat-template: {value!r} is neither a file nor a Jinja template")


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
