"""When a sequence stops, with vLLM's rules and order.

After each new token: nothing stops it before ``min_tokens``; then EOS (unless ``ignore_eos``),
``stop_token_ids`` (stop_reason = the token), ``stop`` strings (stop_reason = the string; the text
is cut before it unless ``include_stop_str_in_output``, and after it in any case), ``max_tokens``
and the model's length limit (finish_reason "length").
"""

from __future__ import annotations

from hwlm.engine.sequence import Sequence


def check_stop(seq: Sequence, token: int, new_text: str, max_model_len: int) -> bool:
    """Set ``seq.finish_reason`` (and stop_reason/output_text) and return True if it stops.

    ``new_text`` is the text the detokenizer completed with ``token`` ("" without one)."""
    params = seq.params
    if seq.num_output_tokens >= params.min_tokens:
        if token in seq.eos_token_ids and not params.ignore_eos:
            seq.finish_reason = "stop"
            return True
        if token in (params.stop_token_ids or ()):
            seq.finish_reason, seq.stop_reason = "stop", token
            return True
        if new_text and params.stop_strings and _check_stop_strings(seq, len(new_text)):
            return True
    if params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
        seq.finish_reason = "length"
        return True
    if seq.num_tokens >= max_model_len:
        seq.finish_reason = "length"
        return True
    return False


def _check_stop_strings(seq: Sequence, num_new_chars: int) -> bool:
    """Look for a stop string in the new text and the characters before it that a stop string
    could span, never the whole text (the cost per step does not grow with the output)."""
    detokenizer = seq.detokenizer
    assert detokenizer is not None
    stops = seq.params.stop_strings
    window = detokenizer.tail(num_new_chars + max(len(s) for s in stops) - 1)
    found = find_stop_string(window, num_new_chars, stops, seq.params.include_stop_str_in_output)
    if found is None:
        return False
    stop, end = found
    seq.finish_reason, seq.stop_reason = "stop", stop
    seq.output_text = detokenizer.text[: detokenizer.text_length - len(window) + end]
    return True


def find_stop_string(
    text: str, num_new_chars: int, stops: list[str], include_in_output: bool
) -> tuple[str, int] | None:
    """The first of ``stops`` (in list order) that occurs in ``text`` overlapping its last
    ``num_new_chars`` characters, and where the text should end: before the stop string, or
    after it when ``include_in_output``."""
    for stop in stops:
        start = max(0, len(text) - num_new_chars - len(stop) + 1)
        index = text.find(stop, start)
        if index == -1:
            continue
        return stop, index + len(stop) if include_in_output else index
    return None
