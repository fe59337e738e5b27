"""Bit packing: n-bit unsigned integers stored densely in a uint8 stream (little-endian bit order)."""

from __future__ import annotations

import torch


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integers ``0 <= v < 2**bits`` into ``ceil(numel * bits / 8)`` bytes."""
    flat = values.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"values must lie in [0, {(1 << bits) - 1}] to pack into {bits} bits")
    if bits == 8:
        return flat.to(torch.uint8)
    if 8 % bits == 0:  # whole values per byte, in bytes (a bit stream of int64 would take 8 x bits bytes a value)
        per = 8 // bits
        v = flat.to(torch.uint8)
        pad = (-v.numel()) % per
        if pad:
            v = torch.cat([v, v.new_zeros(pad)])
        v = v.reshape(-1, per)
        out = v[:, 0].clone()
        for k in range(1, per):
            out |= v[:, k] << (k * bits)
        return out
    return _pack_bitstream(flat.to(torch.int64), bits)


def _pack_bitstream(flat: torch.Tensor, bits: int) -> torch.Tensor:
    """Any width: value i's bit b is bit ``i * bits + b`` of the stream, bytes filled from their low bit."""
    shifts = torch.arange(bits, dtype=torch.int64)
    bitstream = ((flat[:, None] >> shifts) & 1).reshape(-1)
    pad = (-bitstream.numel()) % 8
    bitstream = torch.cat([bitstream, bitstream.new_zeros(pad)]).reshape(-1, 8)
    return (bitstream << torch.arange(8, dtype=torch.int64)).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` values as int64."""
    if bits == 8:
        return packed[:numel].to(torch.int64)
    if 8 % bits == 0:  # whole values per byte: shift each byte once per slot (fast path, same layout)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        values = (packed[:, None] >> shifts) & ((1 << bits) - 1)
        return values.reshape(-1)[:numel].to(torch.int64)
    bitstream = ((packed.to(torch.int64)[:, None] >> torch.arange(8, dtype=torch.int64)) & 1).reshape(-1)
    bitstream = bitstream[: numel * bits].reshape(numel, bits)
    return (bitstream << torch.arange(bits, dtype=torch.int64)).sum(1)


def packed_nbytes(numel: int, bits: int) -> int:
    return (numel * bits + 7) // 8
