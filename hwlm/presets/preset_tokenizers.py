"""Tokenizers for the presets of real architectures, covering each one's whole vocabulary.

With dummy weights a model generates ids from its whole vocabulary, so a preset needs a tokenizer
in which every id decodes to text, with the special tokens at the ids of its config. Each one is a
normal Hugging Face fast tokenizer (byte-level BPE, ``tokenizer.json``): the built-in 1,024-piece
tokenizer grown to the preset's ``vocab_size`` (``hwlm.presets.vocab``), the preset's special
tokens at their ids, and a chat template of the family's format. Nothing is downloaded: it is
built at first use (a few seconds) and cached under ``$HWLM_CACHE_DIR`` (default
``~/.cache/hwlm``), in a folder named by a hash of everything it is built from.

``hwlm-tiny`` keeps the 1,024-piece tokenizer in ``tokenizer/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hwlm import presets
from hwlm.presets import vocab

logger = logging.getLogger(__name__)

BUILD_VERSION = 1  # part of the cache key: bump when the recipe changes

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
PLAIN = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] + ': ' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)


@dataclass(frozen=True)
class TokenizerSpec:
    """A preset's special tokens (id -> text) and how they are used."""

    specials: dict[int, str]
    eos: str
    bos: str | None = None
    pad: str | None = None
    unk: str | None = None
    add_bos: bool = False  # prepend ``bos`` to every encoded text (Llama, OPT)
    chat_template: str = CHATML


_QWEN = {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>"}
SPECS: dict[str, TokenizerSpec] = {
    "qwen2.5-0.5b": TokenizerSpec(
        _QWEN, eos="<|endoftext|>", bos="<|endoftext|>", pad="<|endoftext|>"
    ),
    "qwen3-0.6b": TokenizerSpec(_QWEN, eos="<|im_end|>", bos="<|endoftext|>", pad="<|endoftext|>"),
    "llama-3-8b": TokenizerSpec(
        {
            128000: "<|begin_of_text|>",
            128001: "<|end_of_text|>",
            128006: "<|start_header_id|>",
            128007: "<|end_header_id|>",
            128009: "<|eot_id|>",
        },
        eos="<|end_of_text|>",
        bos="<|begin_of_text|>",
        add_bos=True,
        chat_template=LLAMA3,
    ),
    "opt-125m": TokenizerSpec(
        {0: "<s>", 1: "<pad>", 2: "</s>", 3: "<unk>"},
        eos="</s>",
        bos="</s>",
        pad="<pad>",
        unk="<unk>",
        add_bos=True,
        chat_template=PLAIN,
    ),
    "c1-llama": TokenizerSpec(
        {0: "<unk>", 1: "<s>", 2: "</s>"},
        eos="</s>",
        bos="<s>",
        unk="<unk>",
        add_bos=True,
        chat_template=PLAIN,
    ),
}
SPECS["llama-3-70b"] = SPECS["llama-3-8b"]  # one tokenizer for the Llama 3 family


def tokenizer_path(model: str) -> Path | None:
    """The tokenizer folder of preset ``model`` (built and cached at first use); None when
    ``model`` is no preset."""
    preset = presets.find_preset(model)
    if preset is None:
        return None
    if preset.name not in SPECS:
        return presets.TOKENIZER_DIR
    return ensure_built(preset.name)


def cache_dir() -> Path:
    """Where hwlm caches what it builds: ``$HWLM_CACHE_DIR``, else ``$XDG_CACHE_HOME/hwlm``, else
    ``~/.cache/hwlm``."""
    if os.environ.get("HWLM_CACHE_DIR"):
        return Path(os.environ["HWLM_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "hwlm"


def ensure_built(name: str) -> Path:
    """The cached tokenizer folder of preset ``name``, built first if it is not there."""
    spec, vocab_size = SPECS[name], int((presets.get_preset(name) or {})["vocab_size"])
    folder = cache_dir() / "tokenizers" / f"{name}-{_digest(spec, vocab_size)}"
    if (folder / "tokenizer.json").is_file():
        return folder
    start = time.perf_counter()
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _build_into(folder, spec, vocab_size)
    except OSError as exc:
        raise ValueError(
            f"cannot write the tokenizer of preset '{name}' to {folder.parent}: {exc}; "
            "set HWLM_CACHE_DIR to a writable folder"
        ) from exc
    logger.info("built the %s tokenizer in %.1f s: %s", name, time.perf_counter() - start, folder)
    return folder


def _digest(spec: TokenizerSpec, vocab_size: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([BUILD_VERSION, vocab_size, asdict(spec)], sort_keys=True).encode())
    h.update((presets.TOKENIZER_DIR / "tokenizer.json").read_bytes())
    h.update(vocab.WORDS_FILE.read_bytes())
    return h.hexdigest()[:12]


def _build_into(folder: Path, spec: TokenizerSpec, vocab_size: int) -> None:
    """Write the tokenizer into a fresh folder beside ``folder``, then rename it into place, so
    that concurrent builders (test workers, server processes) never see a partial one."""
    files = build_files(spec, vocab_size)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        for filename, text in files.items():
            (staging / filename).write_text(text, encoding="utf-8")
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_files(spec: TokenizerSpec, vocab_size: int) -> dict[str, str]:
    """The tokenizer's files (name -> text): tokenizer.json, tokenizer_config.json and
    chat_template.jinja."""
    with open(presets.TOKENIZER_DIR / "tokenizer.json", encoding="utf-8") as f:
        base = json.load(f)
    base_specials = {t["content"] for t in base["added_tokens"]}
    by_id = sorted(base["model"]["vocab"].items(), key=lambda item: item[1])
    base_tokens = [token for token, _ in by_id if token not in base_specials]
    merges = [(a, b) for a, b in base["model"]["merges"]]
    regular, merges = vocab.grow_vocab(
        base_tokens, merges, vocab.load_words(), vocab_size - len(spec.specials)
    )
    clash = set(regular).intersection(spec.specials.values())
    if clash:
        raise ValueError(f"special tokens {sorted(clash)} are also regular pieces")
    ids = iter(i for i in range(vocab_size) if i not in spec.specials)
    table = {token: next(ids) for token in regular}
    table.update({text: i for i, text in spec.specials.items()})
    tokenizer = dict(base)
    tokenizer["added_tokens"] = [_added(i, text) for i, text in sorted(spec.specials.items())]
    tokenizer["post_processor"] = _post_processor(spec, table)
    tokenizer["model"] = dict(base["model"], vocab=table, merges=[list(m) for m in merges])
    return {
        "tokenizer.json": json.dumps(tokenizer, ensure_ascii=False),
        "tokenizer_config.json": json.dumps(_config(spec), indent=2),
        "chat_template.jinja": spec.chat_template,
    }


def _added(token_id: int, text: str) -> dict[str, Any]:
    return {
        "id": token_id,
        "content": text,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def _post_processor(spec: TokenizerSpec, table: dict[str, int]) -> dict[str, Any]:
    """Prepend the BOS token when the family does (``add_bos``), else leave texts as they are."""
    if not spec.add_bos or spec.bos is None:
        first: list[dict[str, Any]] = []
        specials: dict[str, Any] = {}
    else:
        first = [{"SpecialToken": {"id": spec.bos, "type_id": 0}}]
        specials = {spec.bos: {"id": spec.bos, "ids": [table[spec.bos]], "tokens": [spec.bos]}}
    return {
        "type": "TemplateProcessing",
        "single": [*first, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [*first, {"Sequence": {"id": "A", "type_id": 0}}]
        + [{"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": specials,
    }


def _config(spec: TokenizerSpec) -> dict[str, Any]:
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
        "eos_token": spec.eos,
    }
    for key, value in (("bos_token", spec.bos), ("pad_token", spec.pad), ("unk_token", spec.unk)):
        if value is not None:
            config[key] = value
    return config
