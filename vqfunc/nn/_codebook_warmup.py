"""`codebook_warmup`: warm every VQ layer of a model from data (vqtorch's API)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sized
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from vqfunc import distributed
from vqfunc._params import AnyParams
from vqfunc._warmup import WarmupMethod
from vqfunc._warmup import warmup_params as vqfunc_warmup_params
from vqfunc.nn._residual_vector_quantize import ResidualVectorQuantize
from vqfunc.nn._vector_quantize import VectorQuantize
from vqfunc.residual._warmup import warmup_params as residual_warmup_params

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


_NO_BATCH = object()

Layer = VectorQuantize | ResidualVectorQuantize


class _StopForward(Exception):
    """Raised by a hook once the layer being warmed has seen its input."""


def _default_inputs(batch: Any) -> Any:
    """A loader's batch -> the model's input: a tensor as is, else the first item."""
    if isinstance(batch, (list, tuple)):
        return batch[0]
    return batch


def _to_device(value: Any, device: torch.device | None) -> Any:
    if device is not None and isinstance(value, Tensor):
        return value.to(device)
    return value


def codebook_warmup(
    model: nn.Module,
    loader: Iterable[Any],
    warmup_method: WarmupMethod = "data",
    num_batch: int = 128,
    *,
    max_vectors: int = 1 << 16,
    generator: torch.Generator | None = None,
    inputs: Callable[[Any], Any] = _default_inputs,
    progress_bar: bool = True,
    process_group: ProcessGroup | None = None,
) -> nn.Module:
    """Warm the codebooks of every VQ layer in `model` from `num_batch` batches.

    The VQ layers are the `VectorQuantize` layers (fitted with `warmup_params`) and the
    `ResidualVectorQuantize` layers (fitted level after level with `vqfunc.residual.warmup_params`).

    Layers are warmed one after the other in the order the forward pass reaches them, so a
    later layer sees the output of the already warmed earlier ones. For each layer the forward
    pass stops right after that layer's input is captured, and at most `max_vectors` input
    vectors are kept (a random subset of each batch), which bounds memory.

    Args:
        model: any module holding VQ layers.
        loader: iterable of batches (re-iterated once per layer), e.g. a `DataLoader`.
        warmup_method: `"data"` or `"kmeans"` (see `warmup_params`).
        num_batch: batches per layer.
        max_vectors: vectors kept per layer.
        generator: source of randomness for the subsets and the warm-up.
        inputs: maps a batch to the model's input (default: the batch, or its first item).
        progress_bar: show a progress bar (`tqdm.auto`: a widget in notebooks, text on stderr).
        process_group: under `torch.distributed`, the ranks that warm up together (default:
            the world group): each rank collects from its own loader, the first rank fits every
            codebook on the vectors of all ranks and broadcasts it (`vqfunc.distributed`).
            Call it on the bare model, before wrapping it in DistributedDataParallel.

    Returns:
        `model`, its VQ layers warmed in place; its training mode is restored.
    """
    if warmup_method not in ("data", "kmeans"):
        raise ValueError(
            f"codebook_warmup: warmup_method must be 'data' or 'kmeans', got {warmup_method!r}"
        )
    for name, value in (("num_batch", num_batch), ("max_vectors", max_vectors)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"codebook_warmup: {name} must be an int >= 1, got {value!r}")
    if iter(loader) is loader:
        # A one-shot iterator would be used up by the first layer (and by finding the order).
        raise TypeError(
            f"codebook_warmup: loader must be re-iterable (e.g. a list or a DataLoader), got "
            f"the one-shot iterator {type(loader).__name__}; pass list(loader) or the DataLoader"
        )
    layers: list[Layer] = [
        m for m in model.modules() if isinstance(m, (VectorQuantize, ResidualVectorQuantize))
    ]
    if not layers:
        raise ValueError(
            "codebook_warmup: model holds no vqfunc.VectorQuantize layer (nor "
            "ResidualVectorQuantize)"
        )
    param = next(model.parameters())
    device = param.device
    was_training = model.training
    # Every layer's tensors as they were, to put back if any layer fails: the model is either
    # fully warmed or left unchanged.
    saved = [{k: v.clone() for k, v in layer.state_dict().items()} for layer in layers]
    model.eval()
    try:
        for index, layer in enumerate(_forward_order(model, layers, loader, inputs, device)):
            rows = _collect_inputs(
                model,
                layer,
                loader,
                inputs,
                device,
                num_batch,
                max_vectors,
                generator,
                desc=f"warm-up {index + 1}/{len(layers)}",
                progress_bar=progress_bar,
            )
            layer.load_params(_fit(layer, rows, warmup_method, generator, process_group))
    except BaseException:
        for layer, tensors in zip(layers, saved, strict=True):
            layer.load_state_dict(tensors)
        raise
    finally:
        model.train(was_training)
    return model


def _fit(
    layer: Layer,
    rows: Tensor,
    method: WarmupMethod,
    generator: torch.Generator | None,
    group: ProcessGroup | None,
) -> AnyParams:
    """New params of `layer` fitted to `rows` `[M, F]` (of every rank, under distributed)."""
    warmup = vqfunc_warmup_params if isinstance(layer, VectorQuantize) else residual_warmup_params
    return warmup(
        layer.params,
        rows,
        layer.cfg.replace(dim=-1),  # type: ignore[arg-type]
        method=method,
        generator=generator,
        sync=distributed.sync_for(group),
    )


def _forward_order(
    model: nn.Module,
    layers: list[Layer],
    loader: Iterable[Any],
    inputs: Callable[[Any], Any],
    device: torch.device,
) -> list[Layer]:
    """The VQ layers in the order one forward pass calls them (layers never called last)."""
    order: list[Layer] = []
    hooks = [
        layer.register_forward_pre_hook(
            lambda mod, args: order.append(mod) if mod not in order else None
        )
        for layer in layers
    ]
    try:
        batch = next(iter(loader), _NO_BATCH)
        if batch is _NO_BATCH:
            raise ValueError("codebook_warmup: loader yielded no batch; expected at least one")
        with torch.no_grad():
            model(_to_device(inputs(batch), device))
    finally:
        for hook in hooks:
            hook.remove()
    return order + [layer for layer in layers if layer not in order]


def _collect_inputs(
    model: nn.Module,
    layer: Layer,
    loader: Iterable[Any],
    inputs: Callable[[Any], Any],
    device: torch.device,
    num_batch: int,
    max_vectors: int,
    generator: torch.Generator | None,
    *,
    desc: str,
    progress_bar: bool,
) -> Tensor:
    """Rows `[M, F]` of `layer`'s inputs over `num_batch` batches, `M <= max_vectors`."""
    per_batch = math.ceil(max_vectors / num_batch)
    total = min(num_batch, len(loader)) if isinstance(loader, Sized) else num_batch
    kept: list[Tensor] = []

    def capture(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        rows = x.movedim(layer.cfg.dim % x.ndim, -1).reshape(-1, layer.cfg.feature_size)
        if rows.shape[0] > per_batch:
            gen_device = generator.device if generator is not None else rows.device
            pick = torch.randperm(rows.shape[0], generator=generator, device=gen_device)
            rows = rows[pick[:per_batch].to(rows.device)]
        kept.append(rows.clone())
        raise _StopForward

    hook = layer.register_forward_pre_hook(capture)
    try:
        batches = itertools.islice(loader, num_batch)
        for batch in tqdm(batches, total=total, desc=desc, disable=not progress_bar):
            try:
                with torch.no_grad():
                    model(_to_device(inputs(batch), device))
            except _StopForward:
                pass
    finally:
        hook.remove()
    if not kept:
        if distributed.active_group() is None:
            raise ValueError("codebook_warmup: the loader yielded no batch reaching the layer")
        # Another rank may hold data: the collective warm-up decides for all ranks alike.
        return layer.codebook.new_zeros(0, layer.cfg.feature_size)
    return torch.cat(kept)[:max_vectors]
