"""The static configurations: one keyword-only base of shared fields, and the codebook layout.

Everything that changes the code path lives in a configuration, as Python scalars and string
literals. The dataclasses are frozen and hashable, so `torch.compile` guards on them as
constants; they are never pytree nodes and never hold tensors.

`QuantizerConfig` declares the fields (and defaults, and validators) that every quantizer
shares; `VQConfig` adds those of plain and grouped VQ, `vqfunc.residual.ResidualConfig` those
of residual VQ. Each field is declared once, here or in its subclass, and the layers take their
keyword arguments from these declarations. `CodebookLayout` says how the codes are stored; the
functions that only need shapes read `cfg.layout`, whatever the kind of quantizer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, NamedTuple, TypeVar

Dist = Literal["euclidean", "cosine"]
Estimator = Literal["ste", "rotation"]
ReplaceRule = Literal["lru", "usage"]
ReplaceUsage = Literal["count", "ratio"]

_DISTS = ("euclidean", "cosine")
_ESTIMATORS = ("ste", "rotation")
_REPLACE_RULES = ("lru", "usage")
_REPLACE_USAGES = ("count", "ratio")

_C = TypeVar("_C", bound="QuantizerConfig")


class CodebookLayout(NamedTuple):
    """How a quantizer stores its codes: `num_codes` split over `parts` users of a codebook.

    A grouped quantizer's parts are its groups (sub-vectors of one input vector), a residual
    quantizer's its levels. With `share`, every part searches one codebook; otherwise each
    part has its own, and `num_codes` counts the codes of all of them together.

    Attributes:
        parts: groups (plain VQ) or levels (residual VQ) per input vector.
        share: whether the parts share one codebook.
        num_codes: codes of all codebooks together.
        code_dim: size `d` of one code.
        affine_groups: consecutive blocks of codes per codebook with their own affine map.
        affine: whether the affine re-parameterisation is on (`affine_lr > 0`).
    """

    parts: int
    share: bool
    num_codes: int
    code_dim: int
    affine_groups: int
    affine: bool

    @property
    def num_books(self) -> int:
        """Number of codebooks: 1 when shared, one per part otherwise."""
        return 1 if self.share else self.parts

    @property
    def codes_per_book(self) -> int:
        """Number of codes `K` in each codebook."""
        return self.num_codes // self.num_books

    @property
    def codebook_shape(self) -> tuple[int, ...]:
        """`(K, d)` when shared, `(parts, K, d)` with one codebook per part."""
        if self.share:
            return (self.num_codes, self.code_dim)
        return (self.parts, self.codes_per_book, self.code_dim)

    @property
    def affine_shape(self) -> tuple[int, ...]:
        """Shape of each raw affine parameter: `[A, d]` (`[parts, A, d]` when not shared),
        with `A = 0` when the affine re-parameterisation is off."""
        rows = self.affine_groups if self.affine else 0
        if self.share:
            return (rows, self.code_dim)
        return (self.parts, rows, self.code_dim)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizerConfig:
    """The fields every quantizer shares (the base of `VQConfig` and `ResidualConfig`).

    Args:
        feature_size: size `F` of the quantized axis `dim` of the input.
        num_codes: number of codes. With `share=False` this counts the codes of all codebooks
            together (as vqtorch does): each of them holds `num_codes // parts` codes. A tuple
            of one size per part only where the quantizer takes it (residual VQ's per-level
            sizes, `vqfunc.residual.ResidualConfig`).
        dim: the feature axis of the input (negative values count from the end). Default 1, as
            in vqtorch (`[B, F, H, W]` images); use `dim=-1` for `[..., F]` tokens.
        share: whether the groups (or levels) share one codebook (default) or each has its own.
        beta: weight of the codebook term in the commitment loss, in [0, 1]
            (`(1 - beta) * mse(z, sg(z_q)) + beta * mse(sg(z), z_q)`).
        affine_lr: learning-rate multiplier of the affine re-parameterisation of the codebook
            (`c' = (1 + affine_lr * s) * c + affine_lr * b`); 0 turns it off.
        affine_groups: number of consecutive blocks of codes with their own affine scale and
            bias; must divide the number of codes per codebook.
        sync_nu: weight `nu` of the synchronized update; 0 turns it off.
        estimator: gradient estimator, `"ste"` (straight-through) or `"rotation"`
            (the rotation trick of Fifty et al., 2024).
        replace_freq: with `replace_rule="lru"`, the dead-code replacement period `T` in
            training steps; 0 turns it off.
        replace_rho: relative noise `rho` added to the vectors that replace dead codes.
        replace_rule: which codes are dead: `"lru"` (vqtorch's counter: unused for
            `replace_freq` steps) or `"usage"` (an exponential moving average of each code's
            use falls below `replace_threshold`; EnCodec's and Mimi's rule).
        replace_threshold: with `replace_rule="usage"`, the threshold; 0 turns replacement off.
            With `replace_usage="count"` it is a number of uses per batch (EnCodec's
            `threshold_ema_dead_code`); with `"ratio"` a fraction in (0, 1] of the mean usage
            of the codebook (Mimi's `threshold_usage_ratio`), which does not depend on the
            batch size.
        replace_usage: `"ratio"` (default) or `"count"`, the scale of `replace_threshold`.
        replace_decay: decay of the usage average of `replace_rule="usage"`, in [0, 1).
        kmeans_init: whether a layer warms its codebook with k-means on its first training
            batch (the functional core ignores it).
    """

    feature_size: int
    num_codes: int | tuple[int, ...]
    dim: int = 1
    share: bool = True
    beta: float = 0.95
    affine_lr: float = 0.0
    affine_groups: int = 1
    sync_nu: float = 0.0
    estimator: Estimator = "ste"
    replace_freq: int = 0
    replace_rho: float = 1e-2
    replace_rule: ReplaceRule = "lru"
    replace_threshold: float = 0.0
    replace_usage: ReplaceUsage = "ratio"
    replace_decay: float = 0.99
    kmeans_init: bool = False

    # The name of the parts of a vector that search a codebook, in messages ("groups", ...).
    _PARTS = "parts"

    def __post_init__(self) -> None:
        self._check()

    def _check(self) -> None:
        """Validate the shared fields; every message names the configuration class."""
        for name in ("feature_size", "affine_groups"):
            self._positive_int(name)
        self._check_num_codes()
        if not _is_int(self.dim):
            raise TypeError(f"{self._owner}: dim must be an int, got {self.dim!r}")
        for name in ("share", "kmeans_init"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(
                    f"{self._owner}: {name} must be True or False, got {getattr(self, name)!r}"
                )
        if self.estimator not in _ESTIMATORS:
            raise ValueError(
                f"{self._owner}: estimator must be one of {_ESTIMATORS}, got {self.estimator!r}"
            )
        self._in_range("beta", 0.0, 1.0)
        for name in ("affine_lr", "sync_nu", "replace_rho"):
            self._non_negative(name)
        if not _is_int(self.replace_freq) or self.replace_freq < 0:
            raise ValueError(
                f"{self._owner}: replace_freq must be an int >= 0 (0 turns replacement off), "
                f"got {self.replace_freq!r}"
            )
        self._check_replace_rule()

    def _check_replace_rule(self) -> None:
        """The fields of the replacement rule agree with `replace_rule`."""
        owner = self._owner
        if self.replace_rule not in _REPLACE_RULES:
            raise ValueError(
                f"{owner}: replace_rule must be one of {_REPLACE_RULES}, got {self.replace_rule!r}"
            )
        if self.replace_usage not in _REPLACE_USAGES:
            raise ValueError(
                f"{owner}: replace_usage must be one of {_REPLACE_USAGES}, "
                f"got {self.replace_usage!r}"
            )
        self._non_negative("replace_threshold")
        self._in_range("replace_decay", 0.0, 1.0, high_open=True)
        if self.replace_rule == "lru" and self.replace_threshold > 0:
            raise ValueError(
                f"{owner}: replace_threshold={self.replace_threshold!r} belongs to "
                "replace_rule='usage', but replace_rule is 'lru' (which counts steps with "
                "replace_freq); set replace_rule='usage' or leave replace_threshold at 0"
            )
        if self.replace_rule == "usage" and self.replace_freq > 0:
            raise ValueError(
                f"{owner}: replace_freq={self.replace_freq!r} is the period of "
                "replace_rule='lru'; with replace_rule='usage' leave replace_freq at 0 and set "
                "replace_threshold"
            )
        if self.replace_usage == "ratio" and self.replace_threshold > 1:
            raise ValueError(
                f"{owner}: with replace_usage='ratio', replace_threshold is a fraction of the "
                f"mean usage in (0, 1], got {self.replace_threshold!r} (for a number of uses "
                "per batch, set replace_usage='count')"
            )

    @property
    def replaces_codes(self) -> bool:
        """Whether dead-code replacement is on (`replace_freq > 0` for the LRU rule,
        `replace_threshold > 0` for the usage rule)."""
        if self.replace_rule == "usage":
            return self.replace_threshold > 0
        return self.replace_freq > 0

    def _check_num_codes(self) -> None:
        """`num_codes` is a positive int (a subclass may accept more)."""
        self._positive_int("num_codes")

    def _check_layout(self) -> None:
        """The codes split evenly over the codebooks, and the affine blocks over the codes."""
        layout, name = self.layout, self._PARTS
        if not self.share and layout.num_codes % layout.parts:
            raise ValueError(
                f"{self._owner}: with share=False, num_codes={self.num_codes} counts the codes "
                f"of all {layout.parts} {name} and must be a multiple of {name}={layout.parts}"
            )
        if layout.codes_per_book % self.affine_groups:
            raise ValueError(
                f"{self._owner}: affine_groups={self.affine_groups} must divide the "
                f"{layout.codes_per_book} codes of each codebook"
            )

    @property
    def layout(self) -> CodebookLayout:
        """How the codes are stored (see `CodebookLayout`)."""
        raise NotImplementedError

    @property
    def num_books(self) -> int:
        """Number of codebooks: 1 when shared, one per group (or level) otherwise."""
        return self.layout.num_books

    @property
    def codes_per_book(self) -> int:
        """Number of codes `K` in each codebook."""
        return self.layout.codes_per_book

    @property
    def codebook_shape(self) -> tuple[int, ...]:
        """Shape of `params.codebook`: `(K, d)` when shared, `(parts, K, d)` otherwise."""
        return self.layout.codebook_shape

    def replace(self: _C, **changes: object) -> _C:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def describe(self) -> str:
        """The fields that decide the params' shapes, as `name=value` pairs (for messages)."""
        names = ("num_codes", "feature_size", self._PARTS, "share", "affine_lr", "affine_groups")
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in names)

    @property
    def _owner(self) -> str:
        return type(self).__name__

    def _positive_int(self, name: str) -> None:
        value = getattr(self, name)
        if not _is_int(value) or value < 1:
            raise ValueError(f"{self._owner}: {name} must be a positive int, got {value!r}")

    def _non_negative(self, name: str) -> None:
        value = getattr(self, name)
        if not _is_number(value) or not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{self._owner}: {name} must be a finite number >= 0, got {value!r}")

    def _in_range(self, name: str, low: float, high: float, *, high_open: bool = False) -> None:
        value = getattr(self, name)
        ok = _is_number(value) and low <= value and (value < high if high_open else value <= high)
        if not ok:
            bracket = ")" if high_open else "]"
            raise ValueError(
                f"{self._owner}: {name} must be in [{low}, {high}{bracket}, got {value!r}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class VQConfig(QuantizerConfig):
    """Static configuration of a plain or grouped vector quantizer.

    Takes the fields of `QuantizerConfig` (`feature_size`, `num_codes`, `dim`, `share`,
    `beta`, `affine_lr`, `affine_groups`, `sync_nu`, `estimator`, `replace_freq`,
    `replace_rho`, `replace_rule`, `replace_threshold`, `replace_usage`, `replace_decay`,
    `kmeans_init`) and these:

    Args:
        dist: `"euclidean"` or `"cosine"` (vectors and codes are l2-normalised before search).
        vector_normalize: with `dist="cosine"`, rescale each output vector to the norm of its
            input vector, so that the output keeps the input's norms.
        groups: split every `F`-vector into `groups` sub-vectors of `F // groups`, each
            quantized on its own. With `share=False` each group has its own codebook of
            `num_codes // groups` codes, and codes index the group's own codebook.
        ema_decay: decay `gamma` of EMA codebook updates; 0 turns them off.
        ema_eps: Laplace smoothing `eps` of the EMA cluster sizes.
    """

    dist: Dist = "euclidean"
    vector_normalize: bool = False
    groups: int = 1
    ema_decay: float = 0.0
    ema_eps: float = 1e-5

    _PARTS = "groups"

    def __post_init__(self) -> None:
        self._check()
        self._positive_int("groups")
        if self.dist not in _DISTS:
            raise ValueError(f"VQConfig: dist must be one of {_DISTS}, got {self.dist!r}")
        if self.feature_size % self.groups:
            raise ValueError(
                f"VQConfig: groups={self.groups} must divide feature_size={self.feature_size} "
                f"(divisors of {self.feature_size}: {_divisors(self.feature_size)})"
            )
        self._check_layout()
        if not isinstance(self.vector_normalize, bool):
            raise TypeError(
                f"VQConfig: vector_normalize must be True or False, got {self.vector_normalize!r}"
            )
        if self.vector_normalize and self.dist != "cosine":
            raise ValueError(
                "VQConfig: vector_normalize=True rescales cosine codes to the input's norm and "
                f"needs dist='cosine', got dist={self.dist!r}"
            )
        self._in_range("ema_decay", 0.0, 1.0, high_open=True)
        self._non_negative("ema_eps")

    @property
    def layout(self) -> CodebookLayout:
        """One part per group, codes of `feature_size // groups`."""
        return CodebookLayout(
            parts=self.groups,
            share=self.share,
            num_codes=self.num_codes if isinstance(self.num_codes, int) else sum(self.num_codes),
            code_dim=self.code_dim,
            affine_groups=self.affine_groups,
            affine=self.affine_lr > 0,
        )

    @property
    def code_dim(self) -> int:
        """Size `d = feature_size // groups` of one code."""
        return self.feature_size // self.groups


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]
