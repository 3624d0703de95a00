"""Regenerate hwlm's built-in tokenizer data in hwlm/presets/.

* ``base``: the 1,024-piece byte-level BPE tokenizer (hwlm/presets/tokenizer/) of ``hwlm-tiny`` and
  the default served model. It is trained on text that ships with Python itself, so it is
  reproducible here.
* ``words``: hwlm/presets/words.txt.gz, the 20,000 most frequent lower-case English words of
  SymSpell's frequency dictionary (MIT licence; ``pip install symspellpy`` to regenerate). The
  presets of real architectures extend the base tokenizer with these words to their full
  vocabulary (hwlm/presets/vocab.py).

Run: python ci/build_tokenizer.py [base] [words]   (both by default)
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import gzip
import inspect
import io
import pathlib

VOCAB_SIZE = 1024
NUM_WORDS = 20_000
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PRESETS = pathlib.Path(__file__).resolve().parent.parent / "hwlm" / "presets"
OUT = PRESETS / "tokenizer"
WORDS = PRESETS / "words.txt.gz"


def corpus() -> list[str]:
    import argparse
    import collections
    import json
    import logging

    with contextlib.redirect_stdout(io.StringIO()):  # importing it prints the Zen of Python
        import this
    zen = codecs.decode(this.s, "rot13")
    docs = [inspect.getdoc(m) or "" for m in (argparse, collections, json, logging, pathlib)]
    return [zen, *docs]


def build_base() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    OUT.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(OUT))
    print(f"wrote {OUT} with {len(fast)} tokens; eos={fast.eos_token_id} bos={fast.bos_token_id}")


def build_words() -> None:
    from importlib.resources import files

    table = files("symspellpy") / "frequency_dictionary_en_82_765.txt"
    words: list[str] = []
    for line in table.read_text(encoding="utf-8").splitlines():  # "word count", most frequent first
        word = line.split()[0]
        if word.isascii() and word.isalpha() and word.islower():
            words.append(word)
    text = "\n".join(words[:NUM_WORDS]) + "\n"
    # mtime=0: the same words give the same bytes (the preset tokenizers' cache key hashes them).
    WORDS.write_bytes(gzip.compress(text.encode("ascii"), compresslevel=9, mtime=0))
    print(f"wrote {WORDS}: {min(NUM_WORDS, len(words))} words")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", nargs="*", choices=["base", "words"], default=["base", "words"])
    what = parser.parse_args().what
    if "base" in what:
        build_base()
    if "words" in what:
        build_words()


if __name__ == "__main__":
    main()
