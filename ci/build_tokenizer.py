"""Regenerate hwlm's built-in byte-level BPE tokenizer (hwlm/presets/tokenizer/).

The built-in tokenizer lets presets with dummy weights (and the default served model) run with
no download. It is trained on text that ships with Python itself, so it is reproducible here.
Run: python ci/build_tokenizer.py
"""

from __future__ import annotations

import codecs
import inspect
import pathlib
import this  # noqa: F401  (its rot13 text is part of the training corpus)

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 1024
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
OUT = pathlib.Path(__file__).resolve().parent.parent / "hwlm" / "presets" / "tokenizer"


def corpus() -> list[str]:
    import argparse
    import collections
    import json
    import logging

    zen = codecs.decode(this.s, "rot13")
    docs = [inspect.getdoc(m) or "" for m in (argparse, collections, json, logging, pathlib)]
    return [zen, *docs]


def main() -> None:
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
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    OUT.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(OUT))
    print(f"wrote {OUT} with {len(fast)} tokens; eos={fast.eos_token_id} bos={fast.bos_token_id}")


if __name__ == "__main__":
    main()
