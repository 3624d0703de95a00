"""Shipped model configs (``config.json`` dicts), addressable by short name or Hugging Face id.

A preset gives the architecture only; its weights come from a local folder, the hub cache, or
``load_format="dummy"``. ``hwlm-tiny`` is the built-in default model (random weights) and uses the
tokenizer in ``tokenizer/`` next to this file; the other presets get one covering their whole
vocabulary, built at first use (``preset_tokenizers.py``).
"""

from __future__ import annotations

import copy
import difflib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).parent
TOKENIZER_DIR = PRESET_DIR / "tokenizer"
TINY_MODEL = "hwlm-tiny"


@dataclass(frozen=True)
class Preset:
    name: str  # short name, also the JSON file's stem
    hub_id: str | None  # where the real weights live, None for hwlm's own models

    @property
    def config(self) -> dict[str, Any]:
        return copy.deepcopy(_load(self.name))


_PRESETS = [
    Preset("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B"),
    Preset("qwen3-0.6b", "Qwen/Qwen3-0.6B"),
    Preset("llama-3-8b", "meta-llama/Meta-Llama-3-8B"),
    Preset("llama-3-70b", "meta-llama/Meta-Llama-3-70B"),
    Preset("opt-125m", "facebook/opt-125m"),
    Preset("c1-llama", None),
    Preset(TINY_MODEL, None),
]

# Lower-cased short name, hub id and hub id's tail (e.g. "meta-llama-3-8b") -> preset.
_BY_KEY: dict[str, Preset] = {}
for _p in _PRESETS:
    _BY_KEY[_p.name] = _p
    if _p.hub_id:
        _BY_KEY[_p.hub_id.lower()] = _p
        _BY_KEY[_p.hub_id.split("/")[-1].lower()] = _p


@cache
def _load(name: str) -> dict[str, Any]:
    with open(PRESET_DIR / f"{name}.json", encoding="utf-8") as f:
        config: dict[str, Any] = json.load(f)
    return config


def find_preset(name: str) -> Preset | None:
    """The preset called ``name`` (short name or hub id, any case), or None."""
    return _BY_KEY.get(name.strip().lower())


def get_preset(name: str) -> dict[str, Any] | None:
    """A fresh copy of the preset's ``config.json`` dict, or None if ``name`` is no preset."""
    preset = find_preset(name)
    return None if preset is None else preset.config


def list_presets() -> list[str]:
    """Short names of all shipped presets."""
    return [p.name for p in _PRESETS]


def preset_hint(name: str) -> str:
    """For a ``name`` that is no preset: the closest preset, if one is close, and all of them,
    e.g. "did you mean 'hwlm-tiny'? presets: qwen2.5-0.5b, ..., hwlm-tiny"."""
    close = difflib.get_close_matches(name.strip().lower(), list(_BY_KEY), n=1)
    guess = f"did you mean '{_BY_KEY[close[0]].name}'? " if close else ""
    return f"{guess}presets: {', '.join(list_presets())}"
