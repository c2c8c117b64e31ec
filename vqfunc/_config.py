"""`VQConfig`: the static description of a vector-quantization layer.

Everything that changes the code path lives here, as Python scalars and string literals. The
dataclass is frozen and hashable, so `torch.compile` guards on it as a constant; it is never a
pytree node and never holds tensors.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Dist = Literal["euclidean", "cosine"]
Estimator = Literal["ste", "rotation"]

_DISTS = ("euclidean", "cosine")
_ESTIMATORS = ("ste", "rotation")


class _BookLayout:
    """Codebook layout shared by the configurations: `num_codes` split over `_PARTS` parts
    (groups or residual levels), each with its own codebook unless `share`."""

    _PARTS = "groups"

    num_codes: int
    share: bool
    affine_groups: int

    @property
    def _num_parts(self) -> int:
        return int(getattr(self, self._PARTS))

    @property
    def num_books(self) -> int:
        """Number of codebooks: 1 when shared, one per group (or level) otherwise."""
        return 1 if self.share else self._num_parts

    @property
    def codes_per_book(self) -> int:
        """Number of codes `K` in each codebook."""
        return self.num_codes // self.num_books

    def _check_books(self, owner: str) -> None:
        """The codes split evenly over the codebooks, and the affine blocks over the codes."""
        parts, name = self._num_parts, self._PARTS
        if not self.share and self.num_codes % parts:
            raise ValueError(
                f"{owner}: with share=False, num_codes={self.num_codes} counts the codes of all "
                f"{parts} {name} and must be a multiple of {name}={parts}"
            )
        if self.codes_per_book % self.affine_groups:
            raise ValueError(
                f"{owner}: affine_groups={self.affine_groups} must divide the "
                f"{self.codes_per_book} codes of each codebook"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class VQConfig(_BookLayout):
    """Static configuration of a vector quantizer.

    Args:
        feature_size: size `F` of the quantized axis `dim` of the input.
        num_codes: number of codes. With `share=False` this counts the codes of all groups
            together (as vqtorch does): each of the `groups` codebooks holds
            `num_codes // groups` codes, and codes are indices into the group's own codebook.
        dim: the feature axis of the input (negative values count from the end). Default 1, as
            in vqtorch (`[B, F, H, W]` images); use `dim=-1` for `[..., F]` tokens.
        dist: `"euclidean"` or `"cosine"` (vectors and codes are l2-normalised before search).
        vector_normalize: with `dist="cosine"`, rescale each output vector to the norm of its
            input vector, so that the output keeps the input's norms.
        groups: split every `F`-vector into `groups` sub-vectors of `F // groups`, each
            quantized on its own.
        share: with `groups > 1`, whether all groups share one codebook (default) or each has
            its own.
        beta: weight of the codebook term in the commitment loss, in [0, 1]
            (`(1 - beta) * mse(z, sg(z_q)) + beta * mse(sg(z), z_q)`).
        affine_lr: learning-rate multiplier of the affine re-parameterisation of the codebook
            (`c' = (1 + affine_lr * s) * c + affine_lr * b`); 0 turns it off.
        affine_groups: number of consecutive blocks of codes with their own affine scale and
            bias; must divide the number of codes per codebook.
        sync_nu: weight `nu` of the synchronized update; 0 turns it off.
        estimator: gradient estimator, `"ste"` (straight-through) or `"rotation"`
            (the rotation trick of Fifty et al., 2024).
        replace_freq: dead-code replacement period `T` in training steps; 0 turns it off.
        replace_rho: relative noise `rho` added to the batch vectors that replace dead codes.
        ema_decay: decay `gamma` of EMA codebook updates; 0 turns them off.
        ema_eps: Laplace smoothing `eps` of the EMA cluster sizes.
        kmeans_init: whether the layer shim warms its codebook with k-means on its first
            training batch.
    """

    feature_size: int
    num_codes: int
    dim: int = 1
    dist: Dist = "euclidean"
    vector_normalize: bool = False
    groups: int = 1
    share: bool = True
    beta: float = 0.95
    affine_lr: float = 0.0
    affine_groups: int = 1
    sync_nu: float = 0.0
    estimator: Estimator = "ste"
    replace_freq: int = 0
    replace_rho: float = 1e-2
    ema_decay: float = 0.0
    ema_eps: float = 1e-5
    kmeans_init: bool = False

    def __post_init__(self) -> None:
        for name in ("feature_size", "num_codes", "groups", "affine_groups"):
            _positive_int(name, getattr(self, name))
        if not isinstance(self.dim, int) or isinstance(self.dim, bool):
            raise TypeError(f"VQConfig: dim must be an int, got {self.dim!r}")
        if self.dist not in _DISTS:
            raise ValueError(f"VQConfig: dist must be one of {_DISTS}, got {self.dist!r}")
        if self.estimator not in _ESTIMATORS:
            raise ValueError(
                f"VQConfig: estimator must be one of {_ESTIMATORS}, got {self.estimator!r}"
            )
        if self.feature_size % self.groups:
            raise ValueError(
                f"VQConfig: groups={self.groups} must divide feature_size={self.feature_size} "
                f"(divisors of {self.feature_size}: {_divisors(self.feature_size)})"
            )
        self._check_books("VQConfig")
        if self.vector_normalize and self.dist != "cosine":
            raise ValueError(
                "VQConfig: vector_normalize=True rescales cosine codes to the input's norm and "
                f"needs dist='cosine', got dist={self.dist!r}"
            )
        _in_range("beta", self.beta, 0.0, 1.0)
        _in_range("ema_decay", self.ema_decay, 0.0, 1.0, high_open=True)
        _non_negative("affine_lr", self.affine_lr)
        _non_negative("sync_nu", self.sync_nu)
        _non_negative("replace_rho", self.replace_rho)
        _non_negative("ema_eps", self.ema_eps)
        if not isinstance(self.replace_freq, int) or self.replace_freq < 0:
            raise ValueError(
                f"VQConfig: replace_freq must be an int >= 0 (0 turns replacement off), "
                f"got {self.replace_freq!r}"
            )

    @property
    def code_dim(self) -> int:
        """Size `d = feature_size // groups` of one code."""
        return self.feature_size // self.groups

    @property
    def codebook_shape(self) -> tuple[int, ...]:
        """`(K, d)` when shared, `(groups, K, d)` with separate codebooks."""
        if self.share:
            return (self.num_codes, self.code_dim)
        return (self.groups, self.codes_per_book, self.code_dim)

    def replace(self, **changes: object) -> VQConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _positive_int(name: str, value: object, *, owner: str = "VQConfig") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


def _non_negative(name: str, value: object) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise ValueError(f"VQConfig: {name} must be a number >= 0, got {value!r}")


def _in_range(
    name: str, value: object, low: float, high: float, *, high_open: bool = False
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and low <= value and (value < high if high_open else value <= high)  # type: ignore[operator]
    if not ok:
        bracket = ")" if high_open else "]"
        raise ValueError(f"VQConfig: {name} must be in [{low}, {high}{bracket}, got {value!r}")


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]
