"""Per-group absmax scales: computed from a weight, stored in fp16 or double-quantized.

Every weight row is split into groups of ``group_size`` inputs (the last one partial when
``group_size`` does not divide ``in``); each group is normalized by its absolute maximum.
Storage costs 16 bits per group in fp16 (0.25 bit/param at group 64), or, double-quantized as in
QLoRA, 8 bits per group plus one fp32 scale per ``dq_block`` groups and one fp32 offset
(≈ 0.127 bit/param). Our double quantization is symmetric linear int8 around the mean absmax
(QLoRA uses an 8-bit dynamic float map; the bit cost is the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DQ_BLOCK = 256


def compute_absmax(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """fp32 absmax ``[out, groups]`` of ``weight [out, in]`` over groups of ``group_size`` inputs."""
    out_features, in_features = weight.shape
    groups = (in_features + group_size - 1) // group_size
    pad = groups * group_size - in_features
    w = weight.detach().to(torch.float32).abs()
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.view(out_features, groups, group_size).amax(dim=-1)


@dataclass
class GroupScales:
    """Stored absmax of shape ``[out, groups]``: fp16, or int8 codes + fp32 block scales + offset."""

    shape: tuple[int, int]
    absmax: torch.Tensor | None = None  # fp16 [out, groups]
    dq_codes: torch.Tensor | None = None  # int8 [out * groups]
    dq_scale: torch.Tensor | None = None  # fp32 [ceil(out * groups / dq_block)]
    dq_offset: torch.Tensor | None = None  # fp32 [1]
    dq_block: int = DQ_BLOCK

    @property
    def double_quant(self) -> bool:
        return self.dq_codes is not None

    @classmethod
    def store(cls, absmax: torch.Tensor, double_quant: bool = False, dq_block: int = DQ_BLOCK) -> GroupScales:
        """Round fp32 absmax ``[out, groups]`` to its storage form."""
        shape = (int(absmax.shape[0]), int(absmax.shape[1]))
        if not double_quant:
            return cls(shape=shape, absmax=absmax.to(torch.float16).clamp_max(65504.0))
        flat = absmax.to(torch.float32).reshape(-1)
        offset = flat.mean().reshape(1)
        centered = flat - offset
        n_blocks = (flat.numel() + dq_block - 1) // dq_block
        padded = torch.nn.functional.pad(centered, (0, n_blocks * dq_block - flat.numel()))
        scale = padded.view(n_blocks, dq_block).abs().amax(dim=1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.round(padded.view(n_blocks, dq_block) / scale[:, None] * 127.0)
        codes = codes.clamp(-127, 127).to(torch.int8).reshape(-1)[: flat.numel()]
        return cls(shape=shape, dq_codes=codes, dq_scale=scale, dq_offset=offset, dq_block=dq_block)

    def restore(self) -> torch.Tensor:
        """fp32 absmax ``[out, groups]`` exactly as the kernels see it."""
        if not self.double_quant:
            return self.absmax.to(torch.float32)
        scale = self.dq_scale.repeat_interleave(self.dq_block)[: self.dq_codes.numel()]
        values = self.dq_codes.to(torch.float32) / 127.0 * scale + self.dq_offset
        return values.clamp_min(0.0).view(self.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (for saving and byte accounting)."""
        if not self.double_quant:
            return {"absmax": self.absmax}
        return {"absmax.codes": self.dq_codes, "absmax.scale": self.dq_scale, "absmax.offset": self.dq_offset}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], shape: tuple[int, int], dq_block: int) -> GroupScales:
        if "absmax" in tensors:
            return cls(shape=shape, absmax=tensors["absmax"])
        return cls(
            shape=shape,
            dq_codes=tensors["absmax.codes"],
            dq_scale=tensors["absmax.scale"],
            dq_offset=tensors["absmax.offset"],
            dq_block=dq_block,
        )

    def to(self, device: torch.device | str) -> GroupScales:
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        return GroupScales.from_tensors(moved, self.shape, self.dq_block)
