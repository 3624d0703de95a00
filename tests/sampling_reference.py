"""Float64 reference implementations of each sampling control, written element by element from
vLLM's documented rules (not from hwlm's code), for the sampler tests."""

from __future__ import annotations

import math

import numpy as np

NEG_INF = -math.inf


def allowed(logits: np.ndarray, ids: list[int]) -> np.ndarray:
    out = np.full_like(logits, NEG_INF)
    out[ids] = logits[ids]
    return out


def bad_words(logits: np.ndarray, words: list[list[int]], output: list[int]) -> np.ndarray:
    out = logits.copy()
    for word in words:
        *prefix, last = word
        if len(prefix) <= len(output) and (not prefix or output[-len(prefix) :] == prefix):
            out[last] = NEG_INF
    return out


def min_tokens(logits: np.ndarray, stops: list[int], num_output: int, min_count: int) -> np.ndarray:
    out = logits.copy()
    if num_output < min_count:
        out[stops] = NEG_INF
    return out


def logit_bias(logits: np.ndarray, bias: dict[int, float]) -> np.ndarray:
    out = logits.copy()
    for token, value in bias.items():
        out[token] += value
    return out


def penalties(
    logits: np.ndarray,
    prompt: list[int],
    output: list[int],
    repetition: float,
    frequency: float,
    presence: float,
) -> np.ndarray:
    out = logits.copy()
    for token in range(len(out)):
        if token in prompt or token in output:
            out[token] = out[token] / repetition if out[token] > 0 else out[token] * repetition
    for token in range(len(out)):
        count = output.count(token)
        out[token] -= frequency * count
        out[token] -= presence * (1.0 if count else 0.0)
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    finite = np.isfinite(logits)
    shifted = np.where(finite, logits - logits[finite].max(), NEG_INF)
    e = np.exp(shifted)
    return e / e.sum()


def distribution(
    logits: np.ndarray, temperature: float, min_p: float, top_k: int, top_p: float
) -> np.ndarray:
    """The probabilities a random request samples from: temperature, min_p, top-k, top-p."""
    probs = softmax(logits / temperature)
    keep = probs > 0
    if min_p > 0:
        keep &= probs >= min_p * probs.max()
    order = sorted(np.flatnonzero(keep), key=lambda t: -probs[t])
    if top_k > 0:
        order = order[:top_k]
    if top_p < 1.0:
        mass = sum(probs[t] for t in order)
        kept, before = [], 0.0
        for t in order:  # keep a token while the mass of the better ones is below top_p
            if before / mass >= top_p:
                break
            kept.append(t)
            before += probs[t]
        order = kept
    out = np.zeros_like(probs)
    out[order] = probs[order]
    return out / out.sum()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    m = logits.max()
    return logits - m - math.log(np.exp(logits - m).sum())
