"""Finite scalar quantization as the FSQ paper's reference code states it (Mentzer et al., 2023,
appendix A.1), re-written in float64 NumPy for the tests, and the symmetric grid of Parker et
al. (2024, arXiv 2411.19842, section 3.2).

Nothing here imports vqfunc: the tests compare the library against these functions.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-3


class PaperFSQ:
    """The reference quantizer on `levels` (float64 throughout)."""

    def __init__(self, levels: list[int] | tuple[int, ...]) -> None:
        self.levels = np.asarray(levels, dtype=np.int64)
        # Mixed radix, the first feature least significant.
        self.basis = np.concatenate(([1], np.cumprod(self.levels[:-1]))).astype(np.int64)

    @property
    def codebook_size(self) -> int:
        return int(np.prod(self.levels))

    def bound(self, z: np.ndarray) -> np.ndarray:
        half_l = (self.levels - 1) * (1 - EPS) / 2
        offset = np.where(self.levels % 2 == 1, 0.0, 0.5)
        shift = np.tan(offset / half_l)  # the reference's shift (tan, not arctanh)
        return np.tanh(z + shift) * half_l - offset

    def quantize(self, z: np.ndarray) -> np.ndarray:
        """Grid values in [-1, 1]; NumPy's round is half to even, like jnp.round."""
        half_width = self.levels // 2
        return np.round(self.bound(z)) / half_width

    def codes_to_indexes(self, zhat: np.ndarray) -> np.ndarray:
        half_width = self.levels // 2
        shifted = zhat * half_width + half_width
        return np.rint(shifted @ self.basis.astype(np.float64)).astype(np.int64)

    def indexes_to_codes(self, indices: np.ndarray) -> np.ndarray:
        digits = np.mod(np.floor_divide(indices[..., None], self.basis), self.levels)
        half_width = self.levels // 2
        return (digits - half_width) / half_width

    def centre(self, digits: np.ndarray) -> np.ndarray:
        """An input whose bounded value lies well inside level `digits` (the bound's inverse at
        the level's value, moved inwards at the outermost levels, which the bound's range only
        partly covers)."""
        half_l = (self.levels - 1) * (1 - EPS) / 2
        offset = np.where(self.levels % 2 == 1, 0.0, 0.5)
        shift = np.tan(offset / half_l)
        target = np.clip(digits - self.levels // 2 + offset, 0.25 - half_l, half_l - 0.25)
        return np.arctanh(target / half_l) - shift


class SymmetricFSQ:
    """`Q_L(x) = 2 / (L - 1) * floor((L - 1) * (tanh(x) + 1) / 2 + 1/2) - 1`, per feature."""

    def __init__(self, levels: list[int] | tuple[int, ...]) -> None:
        self.levels = np.asarray(levels, dtype=np.int64)
        self.basis = np.concatenate(([1], np.cumprod(self.levels[:-1]))).astype(np.int64)

    def digits(self, z: np.ndarray) -> np.ndarray:
        return np.floor((self.levels - 1) * (np.tanh(z) + 1) / 2 + 0.5).astype(np.int64)

    def quantize(self, z: np.ndarray) -> np.ndarray:
        return 2.0 / (self.levels - 1) * self.digits(z) - 1.0

    def indexes(self, z: np.ndarray) -> np.ndarray:
        return self.digits(z) @ self.basis
