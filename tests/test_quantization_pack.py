"""The CPU quantized layouts (backends/cpu_quant_pack.py), their graphs and the graph cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from hwlm.backends import cpu_quant_graph as graph  # noqa: E402
from hwlm.backends.cpu_quant_pack import (  # noqa: E402
    BlockQuantized,
    ChannelQuantized,
    dequantize_blocks,
    dequantize_channels,
    quantize_blocks,
    quantize_channels,
)


def _weight(n: int, k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("k", "block"), [(64, 32), (100, 32), (64, 128), (300, 128)])
def test_blocks_round_trip_within_one_step(bits: int, k: int, block: int) -> None:
    w = _weight(6, k)
    q = quantize_blocks(w, bits, block)
    k_blocks = -(-k // block)
    assert q.packed.shape == (6, k_blocks, block * bits // 8) and q.packed.dtype == np.uint8
    assert q.scales.shape == (6, k_blocks)
    back = dequantize_blocks(q)
    assert back.shape == w.shape
    # Each value is within one quantization step of its block (half a step, except the clipped
    # top code on the side opposite the block's extreme).
    step = np.repeat(np.abs(q.scales), block, axis=1)[:, :k]
    assert np.all(np.abs(back - w) <= step * 1.0001)
    assert np.mean(np.abs(back - w) <= step / 2 * 1.0001) > 0.99
    # The value of largest magnitude in each block is exact.
    first = w[:, :block]
    idx = np.abs(first).argmax(1)
    np.testing.assert_allclose(back[np.arange(6), idx], first[np.arange(6), idx], rtol=1e-6)


def test_int4_nibble_order_and_default_zero_point() -> None:
    """MatMulNBits' layout: element 2i in the low nibble, zero point 8, w = (code - 8) * scale."""
    w = np.zeros((1, 16), dtype=np.float32)
    w[0, 0], w[0, 1], w[0, 3] = -8.0, 1.0, 7.0
    q = quantize_blocks(w, 4, 16)
    assert q.scales[0, 0] == pytest.approx(1.0)
    assert q.zero_points is None
    assert q.packed[0, 0, 0] == 0x90  # codes 0 (=-8+8) low, 9 (=1+8) high
    assert q.packed[0, 0, 1] == 0xF8  # codes 8 (=0+8) low, 15 (=7+8) high
    np.testing.assert_array_equal(dequantize_blocks(q), w)


def test_zero_blocks_and_bad_settings() -> None:
    q = quantize_blocks(np.zeros((3, 64), dtype=np.float32), 4, 32)
    assert np.array_equal(dequantize_blocks(q), np.zeros((3, 64), dtype=np.float32))
    c = quantize_channels(np.zeros((3, 64), dtype=np.float32))
    assert np.array_equal(dequantize_channels(c), np.zeros((3, 64), dtype=np.float32))
    with pytest.raises(ValueError, match="4 or 8 bits"):
        quantize_blocks(_weight(2, 32), 3, 32)
    with pytest.raises(ValueError, match="power of two"):
        quantize_blocks(_weight(2, 32), 4, 48)


def test_channels_round_trip_within_half_a_step() -> None:
    w = _weight(5, 200)
    q = quantize_channels(w)
    assert q.codes.shape == (200, 5) and q.codes.dtype == np.int8
    assert np.abs(q.codes).max() == 127
    back = dequantize_channels(q)
    assert np.all(np.abs(back - w) <= q.scales[:, None] / 2 * 1.0001)


def test_graph_round_trip() -> None:
    w, bias = _weight(8, 96), _weight(1, 8)[0]
    for q in (quantize_blocks(w, 4, 32), quantize_blocks(w, 8, 32), quantize_channels(w)):
        back, back_bias = graph.read_graph(graph.build_graph(q, bias))
        assert type(back) is type(q)
        assert back_bias is not None and np.array_equal(back_bias, bias)
        if isinstance(q, BlockQuantized):
            assert isinstance(back, BlockQuantized)
            assert np.array_equal(dequantize_blocks(back), dequantize_blocks(q))
        else:
            assert isinstance(back, ChannelQuantized)
            assert np.array_equal(dequantize_channels(back), dequantize_channels(q))


def test_cache_reuses_graphs_keyed_by_weights_and_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(graph.CACHE_ENV, str(tmp_path / "cache"))
    calls = []

    def quantize(w: np.ndarray) -> BlockQuantized:
        calls.append(1)
        return quantize_blocks(w, 4, 32)

    w = _weight(4, 64)
    first = graph.cached_graph(w, None, "s", quantize)
    assert isinstance(first, str) and Path(first).is_file()
    assert graph.cached_graph(w.copy(), None, "s", quantize) == first and len(calls) == 1
    others = {
        graph.cached_graph(w, None, "other settings", quantize),
        graph.cached_graph(w + 1e-3, None, "s", quantize),
        graph.cached_graph(w, np.ones(4, dtype=np.float32), "s", quantize),
    }
    assert first not in others and len(others) == 3 and len(calls) == 4
    assert not list((tmp_path / "cache").glob("*.tmp"))

    monkeypatch.setenv(graph.CACHE_ENV, "off")
    assert isinstance(graph.cached_graph(w, None, "s", quantize), bytes)


def test_unwritable_cache_falls_back_to_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(graph.CACHE_ENV, str(blocker / "cache"))
    data = graph.cached_graph(_weight(4, 64), None, "s", lambda w: quantize_blocks(w, 4, 32))
    assert isinstance(data, bytes)
