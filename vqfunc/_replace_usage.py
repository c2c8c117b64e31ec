"""The usage rule of dead-code replacement (`replace_rule="usage"`): EnCodec's and Mimi's.

Every code keeps an exponential moving average `U_k` of its use: with decay
`g = cfg.replace_decay` and the batch's code counts `n_k` (masked and invalid rows excluded,
summed over the ranks under data parallelism), each step `U_k <- g U_k + (1 - g) n_k`. A code
is dead when, before this batch is added, its average is below the threshold
`t = cfg.replace_threshold`:

- `replace_usage="count"`: `U_k < t`, a number of uses per batch (EnCodec's
  `threshold_ema_dead_code`, compared with its EMA cluster size); it depends on the batch
  size: the same codebook in batches half as large uses each code half as often;
- `replace_usage="ratio"`: `U_k < t * mean_j U_j`, a fraction of the use every code would get
  were the use uniform (Mimi's `threshold_usage_ratio`); scaling the batch scales every `U_j`
  alike, so the rule does not depend on the batch size.

A dead code becomes its candidate (a random vector of the batch, as for the LRU rule) and its
average restarts at the codebook's mean `mean_j U_j` (Mimi's `replaced_usage_ratio = 1`), so
that it has time to be used before it is judged again. The averages start at `t` (count) or at
1 (ratio; any constant would do), so that no code is dead before it has seen a batch.
"""

from __future__ import annotations

from torch import Tensor

from vqfunc._config import QuantizerConfig


def initial_usage(cfg: QuantizerConfig) -> float:
    """The value every usage average starts at (see the module's doc)."""
    return cfg.replace_threshold if cfg.replace_usage == "count" else 1.0


def dead_by_usage(usage: Tensor, cfg: QuantizerConfig) -> Tensor:
    """`[num_books, K]` bool: the codes whose average `usage` (`[num_books, K]`) is below the
    threshold of `cfg.replace_usage`."""
    threshold = usage.new_tensor(cfg.replace_threshold)
    if cfg.replace_usage == "ratio":
        threshold = threshold * usage.mean(-1, keepdim=True)
    return usage < threshold


def usage_update(
    usage: Tensor, histogram: Tensor, candidates_valid: Tensor, cfg: QuantizerConfig
) -> tuple[Tensor, Tensor]:
    """One step of the usage rule: which codes are replaced, and the new averages.

    Args:
        usage: `[num_books, K]` float running averages `U`.
        histogram: `[num_books, K]` code counts of the batch.
        candidates_valid: `[num_books, K]` bool, False where the batch held no candidate.
        cfg: the static configuration.

    Returns:
        `(replaced [num_books, K] bool, new usage [num_books, K])`.
    """
    replaced = dead_by_usage(usage, cfg) & candidates_valid
    decay = cfg.replace_decay
    new_usage = decay * usage + (1.0 - decay) * histogram.to(usage.dtype)
    restart = new_usage.mean(-1, keepdim=True).expand_as(new_usage)
    return replaced, new_usage.where(~replaced, restart)
