"""What crosses a link between tiers: a hidden state in one of three formats, padding dropped, or
for a text sent straight to cloud, its token ids (the carrier).

    float32  4 bytes a value, as computed
    float16  2 bytes a value
    int8     1 byte a value and one float16 scale per token (its absolute maximum / 127), the values
             deflated (zlib, lossless: most sit near zero, so they take fewer than 8 bits)

`pack` is what a tier sends and `unpack` what the next one computes from; offline outputs
(dimee_models/outputs.py) go through the same two functions, so what calibration certifies is what
is served, rounding included.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

Format = Literal["float32", "float16", "int8"]
Carrier = Literal["hidden", "tokens"]
Slice = Literal["float32", "int8"]
FORMATS: tuple[Format, ...] = ("float32", "float16", "int8")
CARRIERS: tuple[Carrier, ...] = ("hidden", "tokens")
INT8_MAX = 127
DEFLATE_LEVEL = 1  # zlib's fastest: higher levels save little more on int8 values and cost several times the CPU


class Wire(BaseModel):
    """A deployment's choice of what crosses its links (policy.json's `wire`), and of the arithmetic of
    the mobile slice that computes the hidden state it sends (dimee_models/onnx_layers.py)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Format = Field("float32", description="every hidden state a tier sends on")
    carrier: Carrier = Field("hidden", description="what a text sent straight from mobile to cloud carries: "
                                                   "the mobile hidden state, or its token ids (cloud runs every layer)")

    mobile_slice: Slice = Field("float32", description="the mobile slice's weights and products: float32, or int8 "
                                                        "(a device's; certified like the rest of the wire)")

    @property
    def rounds(self) -> bool:
        """Whether the answers differ from the float32 model's: they then need outputs of their own."""
        return self.format != "float32" or self.carrier != "hidden" or self.mobile_slice != "float32"

    @property
    def changes_states(self) -> bool:
        """Whether the hidden states past mobile differ from the float32 model's (rounded, or computed in int8)."""
        return self.format != "float32" or self.mobile_slice != "float32"


@dataclass(frozen=True)
class Packed:
    """The real tokens of a batch's rows, concatenated: (tokens, H) values and their row lengths."""

    values: np.ndarray  # (tokens, H) float32 or float16; int8: those values deflated, as uint8
    scales: np.ndarray | None  # (tokens,) float16: int8 only
    lengths: np.ndarray  # (B,) int32

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.lengths.nbytes + (0 if self.scales is None else self.scales.nbytes)


def bytes_per_token(fmt: Format, hidden_size: int) -> int:
    return hidden_size * np.dtype(fmt).itemsize + (2 if fmt == "int8" else 0)


def pack(hidden: np.ndarray, mask: np.ndarray, fmt: Format) -> Packed:
    """A right-padded batch (B, T, H) with its mask (B, T) as `fmt`, padding dropped."""
    values = hidden[mask.astype(bool)]  # (tokens, H) row by row: the real tokens come first in each row
    lengths = mask.sum(1).astype(np.int32)
    if fmt != "int8":
        return Packed(values.astype(fmt), None, lengths)
    # float16 is precision enough for a scale (int8 itself keeps 1/254 of a token's range)
    scales = (np.abs(values).max(1, initial=0) / INT8_MAX).astype(np.float16)
    scales[~(scales > 0)] = 1  # a token of zeros (or one too small for float16) is sent as zeros
    steps = np.clip(np.rint(values / scales.astype(np.float32)[:, None]), -INT8_MAX, INT8_MAX).astype(np.int8)
    return Packed(np.frombuffer(zlib.compress(steps, DEFLATE_LEVEL), np.uint8), scales, lengths)


def unpack(packed: Packed) -> tuple[np.ndarray, np.ndarray]:
    """(hidden (B, T, H) float32, mask (B, T) int64), T the longest row, padding zero."""
    if packed.scales is None:
        values = packed.values.astype(np.float32)
    else:
        steps = np.frombuffer(zlib.decompress(packed.values), np.int8).reshape(len(packed.scales), -1)
        values = steps * packed.scales.astype(np.float32)[:, None]
    lengths = packed.lengths
    mask = (np.arange(int(lengths.max(initial=0)))[None] < lengths[:, None]).astype(np.int64)
    hidden = np.zeros(mask.shape + values.shape[1:], dtype=np.float32)
    hidden[mask.astype(bool)] = values
    return hidden, mask


def round_trip(hidden: np.ndarray, mask: np.ndarray, fmt: Format) -> np.ndarray:
    """The hidden state the next tier computes from, padded as `hidden` was (padding zero)."""
    if fmt == "float32":
        return hidden
    out, _ = unpack(pack(hidden, mask, fmt))
    padded = np.zeros_like(hidden)
    padded[:, :out.shape[1]] = out
    return padded
