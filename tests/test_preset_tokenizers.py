"""The presets' built-in tokenizers: every id decodes to text, English tokenizes at about a token
a word, the config's special-token ids hold, the chat template renders, and a dummy-weight
generation is text."""

from __future__ import annotations

import json
import random
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hwlm import presets
from hwlm.models.loader import resolve_model
from hwlm.presets import preset_tokenizers, vocab
from hwlm.text.tokenizer import load_tokenizer

PRESETS = sorted(preset_tokenizers.SPECS)
ENGLISH = (
    "The history of the city began more than two thousand years ago, when a small group of "
    "farmers settled on the banks of the river. Over the following centuries the village grew "
    "into a busy market town, and merchants from distant countries came to trade wool, grain and "
    "wine. Today it is known for its old churches, its university and a lively summer festival."
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh tokenizer cache for this module (HWLM_CACHE_DIR)."""
    folder = tmp_path_factory.mktemp("hwlm-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HWLM_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="module")
def tokenizers(cache: Path) -> dict[str, Any]:
    return {name: load_tokenizer(str(preset_tokenizers.ensure_built(name))) for name in PRESETS}


def test_every_preset_of_a_real_architecture_has_one() -> None:
    assert set(PRESETS) == set(presets.list_presets()) - {presets.TINY_MODEL}


@pytest.mark.parametrize("name", PRESETS)
def test_random_ids_decode_to_text_of_realistic_length(
    name: str, tokenizers: dict[str, Any]
) -> None:
    tok, size = tokenizers[name], presets.get_preset(name)["vocab_size"]  # type: ignore[index]
    assert len(tok) == size
    ids = random.Random(0).sample(range(size), 4000)
    texts = [tok.decode([i], skip_special_tokens=True) for i in ids]
    text_share = sum(1 for t in texts if t and "\ufffd" not in t) / len(texts)
    assert text_share >= 0.99
    assert 3 <= statistics.mean(len(t.encode()) for t in texts) <= 8


@pytest.mark.parametrize("name", PRESETS)
def test_english_takes_one_to_two_tokens_a_word(name: str, tokenizers: dict[str, Any]) -> None:
    tok = tokenizers[name]
    ids = tok(ENGLISH, add_special_tokens=False)["input_ids"]
    assert 1.0 <= len(ids) / len(ENGLISH.split()) <= 2.0
    assert tok.decode(ids) == ENGLISH


@pytest.mark.parametrize("name", PRESETS)
def test_special_tokens_keep_the_config_ids(name: str, tokenizers: dict[str, Any]) -> None:
    tok, config = tokenizers[name], presets.get_preset(name)
    assert config is not None
    assert tok.eos_token_id == config["eos_token_id"]
    assert tok.bos_token_id == config["bos_token_id"]
    for token_id, text in preset_tokenizers.SPECS[name].specials.items():
        assert tok.convert_ids_to_tokens(token_id) == text
        assert tok(text, add_special_tokens=False)["input_ids"] == [token_id]
        assert tok.decode([token_id], skip_special_tokens=True) == ""


@pytest.mark.parametrize("name", PRESETS)
def test_chat_template_renders(name: str, tokenizers: dict[str, Any]) -> None:
    tok, spec = tokenizers[name], preset_tokenizers.SPECS[name]
    messages = [{"role": "user", "content": "Where is the river?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "Where is the river?" in text and "assistant" in text
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert set(ids) & set(spec.specials), "the template should use the family's special tokens"
    if spec.add_bos:
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_build_is_deterministic_and_cached(cache: Path) -> None:
    spec = preset_tokenizers.SPECS["c1-llama"]
    assert preset_tokenizers.build_files(spec, 32000) == preset_tokenizers.build_files(spec, 32000)
    folder = preset_tokenizers.ensure_built("c1-llama")
    assert folder.parent.parent == cache
    stamp = (folder / "tokenizer.json").stat().st_mtime_ns
    assert preset_tokenizers.ensure_built("c1-llama") == folder
    assert (folder / "tokenizer.json").stat().st_mtime_ns == stamp
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_words_come_first_and_become_single_tokens() -> None:
    base = json.loads((presets.TOKENIZER_DIR / "tokenizer.json").read_text())["model"]
    tokens = sorted(base["vocab"], key=base["vocab"].get)
    merges = [tuple(m) for m in base["merges"]]
    words = ["river", "festival", "merchants"]
    grown, grown_merges = vocab.grow_vocab(tokens, merges, words, len(tokens) + 40)
    assert len(grown) == len(tokens) + 40 and grown[: len(tokens)] == tokens
    assert grown_merges[: len(merges)] == merges
    assert all(vocab.SPACE + w in grown for w in words)
    pieces = grown[grown.index(vocab.SPACE + "merchants") + 1 :]
    assert pieces and all(2 <= len(p.replace(vocab.SPACE, " ").encode()) <= 10 for p in pieces)


def test_resolve_model_uses_the_built_tokenizer(cache: Path) -> None:
    resolved = resolve_model("qwen2.5-0.5b", "dummy")
    assert Path(resolved.tokenizer_path).parent.parent == cache
    assert Path(resolve_model(presets.TINY_MODEL, "auto").tokenizer_path) == presets.TOKENIZER_DIR


def test_an_unwritable_cache_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("HWLM_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(ValueError, match="HWLM_CACHE_DIR") as info:
        preset_tokenizers.ensure_built("c1-llama")
    assert "\n" not in str(info.value)


def test_dummy_generation_is_text(cache: Path, tmp_path: Path) -> None:
    """c1-llama shrunk to two small layers, its whole vocabulary kept, random weights: nearly
    every sampled token decodes to text on its own (a lone byte of a multi-byte character shows
    as U+FFFD, which a client receives as text too)."""
    from hwlm import LLM, SamplingParams

    config = dict(presets.get_preset("c1-llama") or {})
    config.update(num_hidden_layers=2, hidden_size=64, intermediate_size=128)
    config.update(num_attention_heads=4, num_key_value_heads=2)
    (tmp_path / "config.json").write_text(json.dumps(config))
    tokenizer = str(preset_tokenizers.ensure_built("c1-llama"))
    llm = LLM(str(tmp_path), tokenizer=tokenizer, load_format="dummy", device="cpu")
    params = SamplingParams(temperature=1.0, max_tokens=64, ignore_eos=True, seed=0)
    outputs = llm.generate(["The river", "Once upon a time"], params, use_tqdm=False)
    tok = llm.get_tokenizer()
    ids = [i for o in outputs for i in o.outputs[0].token_ids]
    assert len(ids) == 128
    texts = [tok.decode([i], skip_special_tokens=True) for i in ids]
    assert sum(1 for t in texts if t) / len(ids) >= 0.99
    assert all(len(o.outputs[0].text.encode()) >= 3 * 64 for o in outputs)
