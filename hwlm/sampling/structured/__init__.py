"""Structured outputs: a grammar (JSON schema, regex, choice, Lark/GBNF) turned into a token
bitmask each step, with llguidance (docs/sampling.md, "Structured outputs").

- ``check(params, tokenizer)``: the early, one-line error for a constraint that cannot compile.
- ``StructuredOutputs`` (manager.py): the engine's tokenizer adapter and grammar cache.
- ``GrammarState`` (state.py): one sequence's place in its grammar.
- ``BitmaskFiller`` / ``apply_bitmask`` (bitmask.py): a step's masks, filled on the host and
  applied on the logits' device.
"""

from hwlm.sampling.structured.bitmask import BitmaskFiller, MaskStats, StepBitmask, apply_bitmask
from hwlm.sampling.structured.check import check
from hwlm.sampling.structured.manager import StructuredOutputs
from hwlm.sampling.structured.state import GrammarState

__all__ = [
    "BitmaskFiller",
    "GrammarState",
    "MaskStats",
    "StepBitmask",
    "StructuredOutputs",
    "apply_bitmask",
    "check",
]
