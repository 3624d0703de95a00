"""``--chat-template``: a Jinja file, or the template itself (as vLLM accepts). No web framework
is imported here, so ``hwlm chat`` can use it where fastapi is not installed."""

from __future__ import annotations

from pathlib import Path

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
