"""Dead-code replacement: vqtorch's least-recently-used restart (Huh et al., 2023), and the
usage rule of EnCodec and Mimi (`replace_rule="usage"`, see `vqfunc._replace_usage`).

Every code has a counter that starts at `T = cfg.replace_freq`. Each training step subtracts 1
from every counter and resets the counters of the codes used in the batch to `T`. A code whose
counter reaches 0 (unused for `T` consecutive steps) is replaced by a random vector of the
batch plus `rho * ||v|| * noise` (`rho = cfg.replace_rho`, `noise` standard normal), and its
counter restarts at `T`.

The step is split in two pure functions so that each part can run where it must:
`sample_candidates` draws one candidate per code from the batch (the only random part; it takes
pre-drawn `ReplaceRandomness` to run under `torch.compile`), and `replace_dead_codes` applies
the counters and swaps dead codes for their candidates with `torch.where` over all codes (no
host sync, no data-dependent shapes). Under data parallelism, all-reduce the histogram and
give every replica the same candidates.

With `replace_rule="usage"` the counters give way to a running average of each code's use, and
a code is dead when that average falls below `cfg.replace_threshold`; the candidates, their
randomness and the swap are the same.

Candidates live in the space the search sees (the effective codebook after the affine map,
normalised vectors for cosine); a replaced raw code is `invert_affine` of its candidate, so its
effective code equals the candidate.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from vqfunc._books import book_vectors, rows_per_book
from vqfunc._config import QuantizerConfig
from vqfunc._params import VQParams
from vqfunc._replace_usage import initial_usage, usage_update
from vqfunc._search import search_dtype
from vqfunc._swap import swap_codes


class ReplaceState(NamedTuple):
    """State of dead-code replacement.

    Attributes:
        counters: `[num_books, K]` int64 steps left before each code is replaced;
            `[num_books, 0]` unless the LRU rule is on (`cfg.replace_freq > 0`).
        usage: `[num_books, K]` float running average of each code's use per batch;
            `[num_books, 0]` unless the usage rule is on (`replace_rule="usage"`,
            `cfg.replace_threshold > 0`).
    """

    counters: Tensor
    usage: Tensor


class ReplaceRandomness(NamedTuple):
    """Pre-drawn randomness of one replacement step (see `draw_replace_randomness`).

    Attributes:
        keys: `[num_books, N]` uniform [0, 1) sort keys of the batch vectors (`N` the vectors
            each codebook sees); the valid vectors with the largest keys become candidates.
        noise: `[num_books, K, d]` standard-normal noise.
    """

    keys: Tensor
    noise: Tensor


class Candidates(NamedTuple):
    """One replacement candidate per code.

    Attributes:
        vectors: `[num_books, K, d]` candidate effective codes.
        valid: `[num_books, K]` bool; False where the batch held no vector to draw from.
    """

    vectors: Tensor
    valid: Tensor


def init_replace_state(params: VQParams, cfg: QuantizerConfig) -> ReplaceState:
    """Counters at `cfg.replace_freq` (LRU rule) or usage averages at their start (usage
    rule), on the params' device; the tensor of the rule that is off is `[num_books, 0]`."""
    layout = cfg.layout
    device = params.codebook.device
    lru = cfg.replace_rule == "lru" and cfg.replace_freq > 0
    k = layout.codes_per_book if lru else 0
    counters = torch.full((layout.num_books, k), cfg.replace_freq, dtype=torch.long, device=device)
    k = layout.codes_per_book if cfg.replace_rule == "usage" and cfg.replaces_codes else 0
    dtype = search_dtype(params.codebook.dtype)
    usage = torch.full((layout.num_books, k), initial_usage(cfg), dtype=dtype, device=device)
    return ReplaceState(counters, usage)


def draw_replace_randomness(
    num_rows: int,
    cfg: QuantizerConfig,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> ReplaceRandomness:
    """Draw the randomness of one replacement step, e.g. outside a compiled step.

    Args:
        num_rows: number of input vectors in the batch (the product of the input's
            non-feature axes).
        cfg: the static configuration.
        generator: source of randomness (default: the global generator).
        device: where the tensors go (default: the generator's device, else CPU).
        dtype: floating dtype of the tensors.
    """
    if device is None and generator is not None:
        device = generator.device
    gen_device = generator.device if generator is not None else device
    n = rows_per_book(num_rows, cfg)
    keys = torch.rand(cfg.layout.num_books, n, generator=generator, device=gen_device, dtype=dtype)
    noise = torch.randn(
        cfg.layout.num_books,
        cfg.layout.codes_per_book,
        cfg.layout.code_dim,
        generator=generator,
        device=gen_device,
        dtype=dtype,
    )
    return ReplaceRandomness(keys.to(device), noise.to(device))


def sample_candidates(
    z: Tensor,
    codes: Tensor,
    cfg: QuantizerConfig,
    *,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    randomness: ReplaceRandomness | None = None,
) -> Candidates:
    """One candidate per code, drawn from the batch's (unmasked) vectors, plus noise.

    Codes take distinct random vectors while the batch holds enough of them, and cycle
    through them otherwise (as vqtorch does).

    Args:
        z: `[*B, F]` the searched vectors, `QuantizeOutput.z`.
        codes: `[*B]` (or `[*B, G]`) their codes, `QuantizeOutput.codes` (for the layout).
        cfg: the static configuration.
        mask: optional `[*B]` mask; masked vectors are never candidates.
        generator: source of randomness when `randomness` is not given.
        randomness: pre-drawn keys and noise (from `draw_replace_randomness`), so that the
            function draws nothing itself (for `torch.compile`).

    Returns:
        `Candidates`; `valid` is False for every code of a codebook that saw no valid vector.
    """
    books = book_vectors(z.detach(), codes, cfg, mask)
    num_books, n, d = books.vectors.shape
    k = cfg.layout.codes_per_book
    if randomness is None:
        randomness = draw_replace_randomness(
            codes.reshape(-1, cfg.layout.parts).shape[0],  # the input vectors
            cfg,
            generator=generator,
            device=z.device,
            dtype=books.vectors.dtype,
        )
    if tuple(randomness.keys.shape) != (num_books, n) or tuple(randomness.noise.shape) != (
        num_books,
        k,
        d,
    ):
        raise ValueError(
            f"sample_candidates: randomness has keys {tuple(randomness.keys.shape)} and noise "
            f"{tuple(randomness.noise.shape)}, expected {(num_books, n)} and {(num_books, k, d)} "
            "(draw it with draw_replace_randomness(num_rows, cfg))"
        )
    if n == 0:
        vectors = books.vectors.new_zeros(num_books, k, d)
        return Candidates(vectors, torch.zeros(num_books, k, dtype=torch.bool, device=z.device))
    is_valid = books.weights > 0
    # Valid vectors sort before masked ones; the top keys among them are a uniform draw.
    scores = torch.where(is_valid, randomness.keys.to(books.vectors.dtype), -1.0)
    top = min(k, n)
    order = scores.topk(top, dim=-1).indices  # [books, top]
    num_valid = is_valid.sum(-1, keepdim=True).clamp(max=top)  # [books, 1]
    slots = torch.arange(k, device=z.device).expand(num_books, k) % num_valid.clamp(min=1)
    picked = order.gather(1, slots)
    chosen = books.vectors.gather(1, picked.unsqueeze(-1).expand(num_books, k, d))
    noise = randomness.noise.to(chosen.dtype)
    vectors = chosen + cfg.replace_rho * chosen.norm(dim=-1, keepdim=True) * noise
    return Candidates(vectors, (num_valid > 0).expand(num_books, k))


def replace_dead_codes(
    params: VQParams,
    state: ReplaceState,
    histogram: Tensor,
    candidates: Candidates,
    cfg: QuantizerConfig,
) -> tuple[VQParams, ReplaceState]:
    """One replacement step: with the LRU rule the counters count down and the codes whose
    counter reaches 0 are replaced; with the usage rule the codes whose average use is below
    the threshold are (see `vqfunc._replace_usage`).

    Args:
        params: current params.
        state: current counters.
        histogram: `[num_books, K]` code counts of the batch (`QuantizeOutput.histogram`,
            masked rows excluded); a code with a count > 0 was used.
        candidates: from `sample_candidates`.
        cfg: the static configuration (replacement on: `cfg.replaces_codes`).

    Returns:
        New params (dead codes replaced; affine parameters unchanged) and state.
    """
    new_params, new_state, _ = replace_step(params, state, histogram, candidates, cfg)
    return new_params, new_state


def replace_step(
    params: VQParams,
    state: ReplaceState,
    histogram: Tensor,
    candidates: Candidates,
    cfg: QuantizerConfig,
) -> tuple[VQParams, ReplaceState, Tensor]:
    """`replace_dead_codes`, also returning which codes were replaced (`[num_books, K]`).

    Dispatches on `cfg.replace_rule`: the LRU counters (`count_down`, `replace_expired`) or the
    usage averages (`vqfunc._replace_usage.usage_update`).
    """
    if cfg.replace_rule != "usage":
        return replace_expired(params, count_down(state, histogram, cfg), candidates, cfg)
    if not cfg.replaces_codes:
        raise ValueError(
            "replace_dead_codes: cfg.replace_threshold is 0 with replace_rule='usage'; expected "
            "a threshold > 0 (replacement is off)"
        )
    expected = (cfg.layout.num_books, cfg.layout.codes_per_book)
    if tuple(state.usage.shape) != expected:
        raise ValueError(
            f"replace_dead_codes: state.usage has shape {tuple(state.usage.shape)}, expected "
            f"{expected} (from init_replace_state(params, cfg))"
        )
    replaced, usage = usage_update(state.usage, histogram, candidates.valid, cfg)
    new_params = swap_codes(params, replaced, candidates.vectors, cfg)
    return new_params, state._replace(usage=usage), replaced


def count_down(state: ReplaceState, histogram: Tensor, cfg: QuantizerConfig) -> ReplaceState:
    """The first half of a replacement step: counters of used codes back at `T`, the others
    one lower (never below 0). The codes at 0 are the dead ones `replace_expired` replaces.

    Args:
        state: current counters.
        histogram: `[num_books, K]` code counts of the batch; a code with a count > 0 was used.
        cfg: the static configuration (`replace_freq > 0`).
    """
    if cfg.replace_freq <= 0:
        raise ValueError(
            f"replace_dead_codes: cfg.replace_freq is {cfg.replace_freq}; expected a period "
            "> 0 (replacement is off)"
        )
    counters = state.counters
    expected = (cfg.layout.num_books, cfg.layout.codes_per_book)
    if tuple(counters.shape) != expected:
        raise ValueError(
            f"replace_dead_codes: state.counters has shape {tuple(counters.shape)}, expected "
            f"{expected} (from init_replace_state(params, cfg))"
        )
    used = histogram > 0
    return state._replace(counters=torch.where(used, cfg.replace_freq, counters - 1).clamp(min=0))


def replace_expired(
    params: VQParams, state: ReplaceState, candidates: Candidates, cfg: QuantizerConfig
) -> tuple[VQParams, ReplaceState, Tensor]:
    """The second half of a replacement step: every code whose counter is 0 (and whose
    candidate is valid) becomes its candidate, and its counter restarts at `T`.

    Returns:
        New params, counters, and which codes were replaced (`[num_books, K]` bool).
    """
    period = cfg.replace_freq
    counters = state.counters
    replaced = (counters == 0) & candidates.valid
    counters = torch.where(replaced, period, counters)
    new_params = swap_codes(params, replaced, candidates.vectors, cfg)
    return new_params, state._replace(counters=counters), replaced
