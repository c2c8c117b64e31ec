"""`LFQConfig` and `ResidualLFQConfig`: the static description of lookup-free quantizers."""

from __future__ import annotations

import dataclasses
import math
from typing import TypeVar

from vqfunc._config import _is_int, _is_number

_C = TypeVar("_C", bound="_BinaryConfig")

# The codebook entropy and the histogram hold 2**bits values.
MAX_BITS = 30


@dataclasses.dataclass(frozen=True, kw_only=True)
class _BinaryConfig:
    """The fields shared by the plain and the residual lookup-free quantizer."""

    bits: int
    dim: int = 1
    entropy_weight: float = 0.1
    diversity_gamma: float = 1.0
    commitment_weight: float = 0.25
    inv_temperature: float = 100.0
    spherical: bool = False
    scale: float = 1.0

    def __post_init__(self) -> None:
        self._check_fields()

    def _check_fields(self) -> None:
        owner = type(self).__name__
        if not _is_int(self.bits) or not 1 <= self.bits <= MAX_BITS:
            raise ValueError(
                f"{owner}: bits must be an int in [1, {MAX_BITS}] (the codebook entropy and the "
                f"histogram hold 2**bits values), got {self.bits!r}"
            )
        if not _is_int(self.dim):
            raise TypeError(f"{owner}: dim must be an int, got {self.dim!r}")
        for name in ("entropy_weight", "diversity_gamma", "commitment_weight"):
            value = getattr(self, name)
            if not _is_number(value) or not value >= 0 or not math.isfinite(value):
                raise ValueError(f"{owner}: {name} must be a finite number >= 0, got {value!r}")
        for name in ("inv_temperature", "scale"):
            value = getattr(self, name)
            if not _is_number(value) or not value > 0 or not math.isfinite(value):
                raise ValueError(f"{owner}: {name} must be a finite number > 0, got {value!r}")
        if not isinstance(self.spherical, bool):
            raise TypeError(f"{owner}: spherical must be True or False, got {self.spherical!r}")

    @property
    def feature_size(self) -> int:
        """Size `F` of the input's feature axis: `bits`."""
        return self.bits

    @property
    def codebook_size(self) -> int:
        """Number of codes, `2 ** bits`."""
        return 1 << self.bits

    @property
    def code_scale(self) -> float:
        """The magnitude of every code entry: `scale`, or `scale / sqrt(bits)` when spherical."""
        return self.scale / math.sqrt(self.bits) if self.spherical else self.scale

    def replace(self: _C, **changes: object) -> _C:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LFQConfig(_BinaryConfig):
    """Static configuration of a lookup-free quantizer (LFQ; Yu et al., 2023, MAGVIT-v2) or,
    with `spherical=True`, a binary spherical quantizer (BSQ; Zhao et al., 2024).

    Each of the `bits` features is quantized by its sign to `+scale` or `-scale`; with
    `spherical`, the vector is first l2-normalised to norm `scale` and the codes are
    `+-scale / sqrt(bits)` (points of that sphere). The code of a vector is
    `sum_i 2**i [z_i > 0]` (the first feature least significant).

    The auxiliary loss is
    `entropy_weight * (per_sample_entropy - diversity_gamma * codebook_entropy)
    + commitment_weight * commitment`, with the code distribution of a vector
    `p(c | z) ∝ exp(-inv_temperature * ||z - c||^2)` over all `2**bits` codes (it factorises
    over the bits), the per-sample entropy the batch mean of `H(p(. | z))`, the codebook
    entropy `H` of the batch mean of `p(. | z)` (both in nats), and the commitment
    `mse(z, sg(z_q))`.

    Args:
        bits: number of features and of code bits `b`, in [1, 30] (`2**b` codes).
        dim: the feature axis of the input (default 1, as for `vqfunc.VQConfig`; use `dim=-1`
            for `[..., F]` tokens).
        entropy_weight: weight of the entropy terms.
        diversity_gamma: weight of the codebook entropy against the per-sample entropy.
        commitment_weight: weight of the commitment term.
        inv_temperature: inverse temperature `beta` of the code distribution; a bit is `+1`
            with probability `sigmoid(4 * beta * s * z_i)`, `s = code_scale`.
        spherical: binary spherical quantization (BSQ): normalise first, codes on the sphere.
        scale: magnitude of the codes (LFQ), or radius of the sphere (BSQ).
    """


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResidualLFQConfig(_BinaryConfig):
    """Static configuration of a residual lookup-free quantizer.

    `num_quantizers` LFQ stages: stage `i` (from 0) quantizes by sign what the earlier stages
    left, with codes `+-s_i`, `s_i = code_scale * 2**-i` (halving per stage, as in
    vector-quantize-pytorch's `ResidualLFQ`). Each stage has its own entropy terms, computed
    as in `LFQConfig` on its input and codes; the loss sums them over the stages and adds one
    commitment term between the input and the sum of the stages. With `spherical`, the input
    is l2-normalised once, before the first stage.

    Takes the fields of `LFQConfig` and:

    Args:
        num_quantizers: number of stages `Q` (`vqfunc.residual` calls its stages levels).
    """

    num_quantizers: int = 1

    def __post_init__(self) -> None:
        self._check_fields()
        if not _is_int(self.num_quantizers) or self.num_quantizers < 1:
            raise ValueError(
                f"ResidualLFQConfig: num_quantizers must be a positive int, got "
                f"{self.num_quantizers!r}"
            )
