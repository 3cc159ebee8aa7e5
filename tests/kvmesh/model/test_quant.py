"""GGUF block formats map onto MatMulNBits form exactly (no requantization)."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from kvmesh.model import quant


@pytest.mark.parametrize(("qtype", "convert"), [(QT.Q4_1, quant.q4_1), (QT.Q4_0, quant.q4_0), (QT.Q8_0, quant.q8_0)])
def test_block_formats_match_gguf_dequantization(qtype: QT, convert: object) -> None:
    w = np.random.default_rng(0).standard_normal((48, 96)).astype(np.float32)
    raw = quantize(w, qtype)
    expected = dequantize(raw, qtype)
    got = convert(raw, 48).dequantize()  # type: ignore[operator]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def test_q4_1_block_with_zero_scale_keeps_its_minimum() -> None:
    w = np.full((1, 32), 0.75, np.float32)  # constant block: llama's quantizer stores d = 0, m = 0.75
    raw = quantize(w, QT.Q4_1)
    assert np.array_equal(quant.q4_1(raw, 1).dequantize(), dequantize(raw, QT.Q4_1))


def test_pack4_puts_even_elements_in_low_nibbles() -> None:
    packed = quant.pack4(np.array([[1, 2, 3, 4, 5]], np.uint8))
    assert packed.tolist() == [[0x21, 0x43, 0x05]]
