"""`vqfunc.inits.codebook_warmup`: every VQ layer of a model warmed from data, in forward order."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vqfunc import ResidualVectorQuantize, VectorQuantize, VQParams
from vqfunc.inits import codebook_warmup
from vqfunc.residual import warmup_params as residual_warmup_params


def close_to_some_row(rows: torch.Tensor, table: torch.Tensor, tol: float = 1e-5) -> torch.Tensor:
    """For each row of `rows`, whether some row of `table` is within `tol` (max-abs)."""
    return ((rows.unsqueeze(1) - table.unsqueeze(0)).abs().amax(-1) <= tol).any(-1)


class Chain(nn.Module):
    """Two VQ layers registered in the opposite order to the one the forward pass calls them."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.late = VectorQuantize(feature_size=4, num_codes=6, dim=-1, generator=gen)
        self.early = VectorQuantize(feature_size=4, num_codes=6, dim=-1, generator=gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, _ = self.early(x)
        z, _ = self.late(z)
        return z


class CountingLoader:
    """A re-iterable loader that records how many batches it handed out."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches = batches
        self.served = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in self.batches:
            self.served += 1
            yield batch


def test_layers_are_warmed_in_forward_order() -> None:
    model = Chain()
    early_init = model.early.codebook.detach().clone()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(16, 4, generator=g) for _ in range(3)]
    codebook_warmup(model, data, num_batch=3, progress_bar=False)

    early = model.early.codebook.detach()
    late = model.late.codebook.detach()
    # The first layer's codes are input vectors.
    assert close_to_some_row(early, torch.cat(data), tol=0).all()
    # The second layer saw the first layer's *warmed* output: its codes are the first layer's
    # new codes, none of them the first layer's initial codes.
    assert close_to_some_row(late, early).all()
    assert not close_to_some_row(late, early_init, tol=1e-3).any()


def test_num_batch_bounds_the_batches_read() -> None:
    g = torch.Generator().manual_seed(2)
    # Batch i lives around 1000 * i, so each code shows which batch it came from.
    batches = [torch.randn(8, 4, generator=g) + 1000.0 * i for i in range(10)]
    loader = CountingLoader(batches)
    layer = VectorQuantize(feature_size=4, num_codes=16, dim=-1)
    codebook_warmup(nn.Sequential(layer), loader, num_batch=3, progress_bar=False)
    assert close_to_some_row(layer.codebook.detach(), torch.cat(batches[:3]), tol=0).all()
    # One batch to find the forward order, then num_batch for the layer.
    assert loader.served <= 1 + 3


def test_max_vectors_bounds_the_vectors_kept() -> None:
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(32, 4, generator=g) for _ in range(4)]
    layer = VectorQuantize(feature_size=4, num_codes=16, dim=-1)
    codebook_warmup(
        nn.Sequential(layer), batches, num_batch=4, max_vectors=8, generator=g, progress_bar=False
    )
    codebook = layer.codebook.detach()
    # With 8 kept vectors for 16 codes, 8 codes are the kept vectors and 8 their noisy copies.
    exact = close_to_some_row(codebook, torch.cat(batches), tol=0)
    assert int(exact.sum()) == 8
    assert torch.unique(codebook, dim=0).shape[0] == 16


@pytest.mark.parametrize("training", [True, False])
def test_training_mode_is_restored(training: bool) -> None:
    model = Chain()
    model.train(training)
    codebook_warmup(model, [torch.randn(12, 4)], num_batch=1, progress_bar=False)
    assert all(module.training == training for module in model.modules())


def test_loader_of_tuples_and_images() -> None:
    g = torch.Generator().manual_seed(4)
    images = torch.randn(20, 3, 4, 4, generator=g)
    labels = torch.arange(20)
    loader = DataLoader(TensorDataset(images, labels), batch_size=5)
    layer = VectorQuantize(feature_size=3, num_codes=10)  # dim=1, as in vqtorch
    model = nn.Sequential(nn.Identity(), layer)
    before = layer.codebook.detach().clone()
    codebook_warmup(model, loader, warmup_method="data", num_batch=4, progress_bar=False)
    pixels = images.movedim(1, -1).reshape(-1, 3)
    assert close_to_some_row(layer.codebook.detach(), pixels, tol=0).all()
    assert not torch.equal(layer.codebook.detach(), before)


def test_kmeans_method_and_reproducibility() -> None:
    g = torch.Generator().manual_seed(5)
    centers = 10.0 * torch.randn(4, 2, generator=g)
    data = (centers.unsqueeze(1) + 0.1 * torch.randn(4, 30, 2, generator=g)).reshape(-1, 2)
    batches = list(data[torch.randperm(120, generator=g)].split(40))

    def warmed(seed: int) -> torch.Tensor:
        layer = VectorQuantize(feature_size=2, num_codes=4, dim=-1)
        codebook_warmup(
            nn.Sequential(layer),
            batches,
            warmup_method="kmeans",
            generator=torch.Generator().manual_seed(seed),
            progress_bar=False,
        )
        return layer.codebook.detach()

    codes = warmed(0)
    assert torch.equal(codes, warmed(0))
    assert torch.cdist(centers, codes).min(-1).values.max() < 0.1


def test_progress_bar_names_each_layer(capsys: pytest.CaptureFixture[str]) -> None:
    codebook_warmup(Chain(), [torch.randn(12, 4)] * 2, num_batch=2)
    err = capsys.readouterr().err
    assert "warm-up 1/2" in err and "warm-up 2/2" in err and "2/2" in err


def test_returns_the_model_and_layers_keep_working() -> None:
    model = Chain()
    x = torch.randn(12, 4)
    assert codebook_warmup(model, [x], progress_bar=False) is model
    z = model(x)
    assert z.shape == x.shape and torch.isfinite(z).all()


class MixedChain(nn.Module):
    """A residual layer registered before the plain layer whose output it quantizes."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.late = ResidualVectorQuantize(
            feature_size=4, num_codes=8, groups=2, share=False, dim=-1, generator=gen
        )
        self.early = VectorQuantize(feature_size=4, num_codes=6, dim=-1, generator=gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, _ = self.early(x)
        z, _ = self.late(z)
        return z


def test_residual_layers_are_warmed_in_forward_order() -> None:
    model = MixedChain()
    g = torch.Generator().manual_seed(2)
    data = [torch.randn(16, 4, generator=g) for _ in range(3)]
    codebook_warmup(model, data, num_batch=3, progress_bar=False)
    early = model.early.codebook.detach()
    first_level = model.late.codebook.detach()[0]
    # The residual layer saw the warmed plain layer's outputs, which are its codes.
    assert close_to_some_row(early, torch.cat(data), tol=0).all()
    assert close_to_some_row(first_level, early, tol=0).all()


def test_residual_layer_warmed_like_residual_warmup_params() -> None:
    layer = ResidualVectorQuantize(feature_size=3, num_codes=6, groups=2, dim=-1)
    before = VQParams(*(p.detach().clone() for p in layer.params))
    g = torch.Generator().manual_seed(4)
    data = [torch.randn(5, 3, generator=g) for _ in range(2)]
    codebook_warmup(
        layer, data, "kmeans", num_batch=2, generator=torch.Generator().manual_seed(9),
        progress_bar=False,
    )  # fmt: skip
    expected = residual_warmup_params(
        before, torch.cat(data), layer.cfg, method="kmeans",
        generator=torch.Generator().manual_seed(9),
    )  # fmt: skip
    assert not torch.equal(expected.codebook, before.codebook)
    assert torch.equal(layer.codebook, expected.codebook)
