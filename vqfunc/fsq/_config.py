"""`FSQConfig` and `ResidualFSQConfig`: the static description of finite scalar quantizers."""

from __future__ import annotations

import dataclasses
import math
from typing import TypeVar

from vqfunc._config import _is_int

_C = TypeVar("_C", bound="_GridConfig")

# Levels above this lose their extreme values to the bound's `1 - 1e-3` margin (see `bound`).
MAX_LEVEL = 1000


@dataclasses.dataclass(frozen=True, kw_only=True)
class _GridConfig:
    """The fields of the per-dimension grid, shared by the plain and the residual quantizer."""

    levels: tuple[int, ...]
    dim: int = 1
    preserve_symmetry: bool = False

    def __post_init__(self) -> None:
        self._check_grid()

    def _check_grid(self) -> None:
        owner = type(self).__name__
        levels = self.levels
        if isinstance(levels, list):
            # A list would make the configuration unhashable (torch.compile guards on it).
            levels = tuple(levels)
            object.__setattr__(self, "levels", levels)
        if not isinstance(levels, tuple) or not levels:
            raise TypeError(
                f"{owner}: levels must be a non-empty tuple of ints (one per feature, e.g. "
                f"levels=(8, 5, 5, 5)), got {self.levels!r}"
            )
        for i, level in enumerate(levels):
            if not _is_int(level) or not 2 <= level <= MAX_LEVEL:
                raise ValueError(
                    f"{owner}: levels[{i}] must be an int in [2, {MAX_LEVEL}], got {level!r} "
                    f"(levels={levels!r})"
                )
        if not _is_int(self.dim):
            raise TypeError(f"{owner}: dim must be an int, got {self.dim!r}")
        if not isinstance(self.preserve_symmetry, bool):
            raise TypeError(
                f"{owner}: preserve_symmetry must be True or False, got {self.preserve_symmetry!r}"
            )

    def _positive_int(self, name: str) -> None:
        value = getattr(self, name)
        if not _is_int(value) or value < 1:
            raise ValueError(f"{type(self).__name__}: {name} must be a positive int, got {value!r}")

    @property
    def code_dim(self) -> int:
        """Features of one code, `len(levels)`."""
        return len(self.levels)

    @property
    def codebook_size(self) -> int:
        """Number of codes of one codebook, `prod(levels)`."""
        return math.prod(self.levels)

    def replace(self: _C, **changes: object) -> _C:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True, kw_only=True)
class FSQConfig(_GridConfig):
    """Static configuration of a finite scalar quantizer (FSQ; Mentzer et al., 2023).

    Every feature `j` is bounded to a range of `levels[j]` values and rounded to the nearest
    of them; a vector's code is its tuple of level indices read as a mixed-radix number, the
    first feature least significant (as in the paper's reference code). There is no codebook
    to learn: the `prod(levels)` codes form the implicit grid `implicit_codebook(cfg)`.

    Args:
        levels: number of values of each feature (each in [2, 1000]), e.g. `(8, 5, 5, 5)` for
            1000 codes; a list is stored as a tuple.
        dim: the feature axis of the input (negative values count from the end). Default 1, as
            for `vqfunc.VQConfig`; use `dim=-1` for `[..., F]` tokens.
        preserve_symmetry: the symmetric grid of Parker et al. (2024, arXiv 2411.19842):
            feature `j` takes the values `2 k / (L - 1) - 1`, `k = 0 .. L - 1`, symmetric about
            0 for even `L` too. Off (the default), the paper's grid `(k - L // 2) / (L // 2)`,
            which holds 0 and, for even `L`, one more negative value than positive ones.
        num_codebooks: split every vector of `num_codebooks * len(levels)` features into
            `num_codebooks` sub-vectors, each with its own code (all on the same grid).
    """

    num_codebooks: int = 1

    def __post_init__(self) -> None:
        self._check_grid()
        self._positive_int("num_codebooks")

    @property
    def feature_size(self) -> int:
        """Size `F` of the input's feature axis: `num_codebooks * len(levels)`."""
        return self.num_codebooks * len(self.levels)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResidualFSQConfig(_GridConfig):
    """Static configuration of a residual finite scalar quantizer.

    `num_quantizers` FSQ stages on one grid: the first quantizes the input as `FSQConfig`
    does; stage `i` (from 0) rounds what the earlier stages left on the grid scaled by
    `s_i = rho ** i` per feature, where `rho = 1 / (L - 1)` on the symmetric grid, so that
    each stage's grid just spans the remainder of the stage before (see
    `vqfunc.fsq.quantize_residual`). `vqfunc.residual` calls its stages levels; here `levels`
    are the grid's values per feature, as in the FSQ paper, and the stages are counted by
    `num_quantizers`.

    Args:
        levels: number of values of each feature (each in [2, 1000]), as in `FSQConfig`.
        dim: the feature axis of the input (default 1; use `dim=-1` for `[..., F]` tokens).
        preserve_symmetry: the symmetric grid of `FSQConfig` (on by default here): remainders
            are symmetric about 0, and so is this grid. Off, the paper's grid, on which an even
            level has one value less above 0 (its stages shrink by `1 / (L - 2)`), and a level
            of 2 cannot hold a positive remainder (refused).
        num_quantizers: number of stages `Q`.
    """

    preserve_symmetry: bool = True
    num_quantizers: int = 1

    def __post_init__(self) -> None:
        self._check_grid()
        self._positive_int("num_quantizers")
        if not self.preserve_symmetry and 2 in self.levels:
            raise ValueError(
                f"ResidualFSQConfig: levels={self.levels!r} holds a level of 2, whose grid on "
                "the paper's scale is {-1, 0} and cannot round a positive remainder; use "
                "preserve_symmetry=True (the default) or levels of at least 3"
            )

    @property
    def feature_size(self) -> int:
        """Size `F` of the input's feature axis: `len(levels)`."""
        return len(self.levels)
