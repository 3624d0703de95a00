"""Default sampling settings from a model's ``generation_config.json``, as vLLM reads them.

Only the sampling fields vLLM takes over are read (``max_new_tokens`` becomes ``max_tokens``);
everything else in the file (``do_sample``, ``eos_token_id``, ...) is ignored here. A request's
own values always win: these are defaults for fields the caller did not set.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FILENAME = "generation_config.json"

# generation_config.json key -> SamplingParams field
_FIELDS = {
    "repetition_penalty": "repetition_penalty",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "max_new_tokens": "max_tokens",
}


def load_sampling_defaults(folder: str | Path | None) -> dict[str, Any]:
    """The SamplingParams overrides found in ``folder/generation_config.json`` ({} if none)."""
    if folder is None:
        return {}
    path = Path(folder) / FILENAME
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable %s: %s", path, exc)
        return {}
    return sampling_defaults_from_dict(raw)


def sampling_defaults_from_dict(raw: dict[str, Any]) -> dict[str, Any]:
    defaults = {field: raw[key] for key, field in _FIELDS.items() if raw.get(key) is not None}
    if defaults:
        logger.info("default sampling parameters from the model's %s: %s", FILENAME, defaults)
    return defaults
