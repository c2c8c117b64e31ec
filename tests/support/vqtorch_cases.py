"""Training cases run step by step through vqtorch and through `vqfunc.vqtorch`.

`make_vqtorch_fixtures.py` runs every case with vqtorch itself and stores the records in
`tests/data/vqtorch_compat.pt`; `tests/integration/test_vqtorch_parity.py` runs the same cases
with `vqfunc.vqtorch` and compares. A case builds a layer from vqtorch's arguments under a
seed (so the initial codebook comes from the global generator, as a user's model does), puts a
learned linear encoder in front of it, and trains both with SGD for `steps` steps on
`mse(z_q, target) + 3 * misc["loss"].mean()`, the global generator reseeded before the loop
(dead-code replacement draws from it). `train` returns everything the comparison needs: the
initial and final `state_dict`s, the first step's outputs, `misc` and gradients, every step's
codes and loss, and an evaluation-mode pass at the end.

k-means: vqtorch's warm-up needs torchpq (CUDA only), so the records were made with torchpq's
`KMeans` replaced by `stand_in_centroids`, and the tests put the same rule in place of
`vqfunc.vqtorch`'s k-means (`vqfunc.vqtorch.nn.utils.init._kmeans_centroids`); the timing, the
data the warm-up sees and everything after it are then compared exactly. vqfunc's own k-means
is checked separately.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib
import importlib.util
import io
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

STEPS = 25
BATCH = 4
IN_FEATURES = 4
SPATIAL = (2, 2)
LR = 0.05
MOMENTUM = 0.5
LOSS_WEIGHT = 3.0


@dataclasses.dataclass(frozen=True)
class Case:
    """One training run.

    Attributes:
        layer: class name in `<package>.nn`.
        args: positional arguments, as vqtorch code writes them.
        kwargs: keyword arguments.
        layout: `"first"`: the input is `[B, F, H, W]` (features on dim 1); `"last"`:
            `[B, H, W, F]`.
        inplace: keyword arguments of `torch.optim.SGD` for `inplace_optimizer`, or None.
        warmup: one training-mode pass under `torch.no_grad()` before the loop (how vqtorch's
            README triggers the k-means warm-up).
        seed: seeds the layer, the encoder and the data.
        lr: learning rate of the training SGD (momentum `MOMENTUM`).
    """

    layer: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    layout: str = "first"
    inplace: dict[str, float] | None = None
    warmup: bool = False
    seed: int = 0
    lr: float = LR


CASES: dict[str, Case] = {
    "plain": Case("VectorQuant", (8, 16), {"beta": 0.9, "sync_nu": 0.5}),
    "plain_affine_dimlast": Case(
        "VectorQuant", (8, 16), {"affine_lr": 2.0, "affine_groups": 2, "dim": -1}, "last"
    ),
    "group_shared": Case("GroupVectorQuant", (8, 16, 2, True)),
    "group_shared_affine": Case(
        "GroupVectorQuant", (8, 16, 2, True), {"affine_lr": 3.0, "sync_nu": 1.0}
    ),
    "group_separate": Case("GroupVectorQuant", (8, 16, 2, False), {"beta": 0.8}),
    "group_separate_affine": Case(
        "GroupVectorQuant", (8, 16, 2, False), {"affine_lr": 3.0, "affine_groups": 2}
    ),
    "residual_shared": Case(
        "ResidualVectorQuant", (8, 16, 3, True), {"dim": -1, "sync_nu": 0.3}, "last"
    ),
    "residual_separate_affine": Case(
        "ResidualVectorQuant", (8, 16, 2, False), {"dim": -1, "affine_lr": 1.5}, "last"
    ),
    "replace": Case("VectorQuant", (8, 32), {"replace_freq": 3}),
    "replace_group_separate": Case("GroupVectorQuant", (8, 32, 2, False), {"replace_freq": 2}),
    "replace_residual": Case(
        "ResidualVectorQuant", (8, 16, 2, True), {"replace_freq": 3, "dim": -1}, "last"
    ),
    "replace_affine": Case("VectorQuant", (8, 32), {"affine_lr": 2.0, "replace_freq": 3}),
    "inplace": Case("VectorQuant", (8, 16), {"beta": 1.0}, inplace={"lr": 1.0, "momentum": 0.9}),
    "inplace_replace": Case(
        "VectorQuant", (8, 32), {"beta": 1.0, "replace_freq": 4}, inplace={"lr": 0.5}
    ),
    "norm_l2_cb_l2c": Case("VectorQuant", (8, 16), {"norm": "l2", "cb_norm": "l2c"}),
    "norm_l2c_cb_l2": Case("GroupVectorQuant", (8, 16, 2, True), {"norm": "l2c", "cb_norm": "l2"}),
    "norm_bn": Case("VectorQuant", (8, 16), {"norm": "bn"}),
    "norm_in": Case("VectorQuant", (8, 16), {"norm": "in"}),
    "norm_gn": Case("VectorQuant", (32, 16), {"norm": "gn", "cb_norm": "l2c"}),
    "norm_none_values": Case(
        "GroupVectorQuant", (8, 16, 2, False), {"norm": None, "cb_norm": None}
    ),
    "kmeans": Case("VectorQuant", (8, 8), {"kmeans_init": True, "sync_nu": 0.5}),
    "kmeans_fewer_vectors": Case("VectorQuant", (8, 32), {"kmeans_init": True}),
    "kmeans_group_separate": Case(
        "GroupVectorQuant", (8, 8, 2, False), {"kmeans_init": True, "replace_freq": 3}, warmup=True
    ),
    "kmeans_group_shared_affine": Case(
        "GroupVectorQuant", (8, 8, 2, True), {"kmeans_init": True, "affine_lr": 2.0}
    ),
    "kmeans_residual": Case(
        "ResidualVectorQuant",
        (8, 8, 2, True),
        {"kmeans_init": True, "dim": -1},
        "last",
        warmup=True,
    ),
    "kmeans_residual_separate": Case(
        "ResidualVectorQuant",
        (8, 8, 2, False),
        {"kmeans_init": True, "dim": -1},
        "last",
        warmup=True,
    ),
    "readme_options": Case(
        "VectorQuant",
        (8, 16),
        {
            "beta": 0.98,
            "kmeans_init": True,
            "norm": None,
            "cb_norm": None,
            "affine_lr": 10.0,
            "sync_nu": 0.2,
            "replace_freq": 4,
            "dim": -1,
        },
        "last",
        warmup=True,
        lr=0.002,
    ),
}


def stand_in_centroids(data: Tensor, k: int) -> Tensor:
    """The k-means stand-in of the records: `k` evenly spaced rows of `data` `[N, d]`.

    Deterministic and draws no random numbers, so both libraries' random streams stay aligned.
    """
    index = torch.linspace(0, data.shape[0] - 1, k).round().long().to(data.device)
    return data[index].clone()


def _detached(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    return value


def _state(module: nn.Module) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def build(package: ModuleType, case: Case) -> tuple[nn.Module, nn.Linear]:
    """The case's layer (from `package.nn`) and encoder, made under `case.seed`."""
    torch.manual_seed(case.seed)
    kwargs = dict(case.kwargs)
    if case.inplace is not None:
        options = dict(case.inplace)
        kwargs["inplace_optimizer"] = lambda *a, **k: torch.optim.SGD(*a, **k, **options)
    layer = getattr(package.nn, case.layer)(*case.args, **kwargs)
    encoder = nn.Linear(IN_FEATURES, case.args[0])
    return layer, encoder


def data(case: Case) -> tuple[Tensor, Tensor]:
    """`(inputs [4, B, H, W, IN_FEATURES], target [B, H, W, F])`, from `case.seed`."""
    g = torch.Generator().manual_seed(case.seed)
    inputs = torch.randn(4, BATCH, *SPATIAL, IN_FEATURES, generator=g)
    target = torch.randn(BATCH, *SPATIAL, case.args[0], generator=g)
    return inputs, target


def _layout(t: Tensor, case: Case) -> Tensor:
    return t.permute(0, 3, 1, 2) if case.layout == "first" else t


def train(package: ModuleType, case: Case, *, steps: int = STEPS) -> dict[str, Any]:
    """Run `case` with `package` (`vqtorch` or `vqfunc.vqtorch`) and record it."""
    layer, encoder = build(package, case)
    record: dict[str, Any] = {"initial_state": _state(layer), "initial_encoder": _state(encoder)}
    inputs, target = data(case)
    target = _layout(target, case)
    record["inputs"], record["target"] = inputs, target
    parameters = list(encoder.parameters()) + list(layer.parameters())
    optimizer = torch.optim.SGD(parameters, lr=case.lr, momentum=MOMENTUM)
    torch.manual_seed(case.seed + 1)
    layer.train()
    if case.warmup:
        with torch.no_grad():
            layer(_layout(encoder(inputs[-1]), case))
        record["after_warmup"] = _state(layer)
    codes, losses = [], []
    for step in range(steps):
        optimizer.zero_grad()
        x = _layout(encoder(inputs[step % len(inputs)]), case)
        x.retain_grad()
        z_q, misc = layer(x)
        objective = ((z_q - target) ** 2).mean() + LOSS_WEIGHT * misc["loss"].mean()
        objective.backward()
        codes.append(misc["q"].detach().to(torch.int16))
        losses.append(float(misc["loss"].detach().mean()))
        if step == 0:
            record["first"] = {
                "z_q": z_q.detach().clone(),
                "misc": {k: _detached(v) for k, v in misc.items() if k != "perplexity"},
                "x_grad": x.grad.detach().clone(),
                "grads": {
                    name: p.grad.detach().clone()
                    for name, p in layer.named_parameters()
                    if p.grad is not None
                },
                "state_after": _state(layer),
            }
        optimizer.step()
    record["codes"] = torch.stack(codes)
    record["loss"] = torch.tensor(losses, dtype=torch.float64)
    record["final_state"] = _state(layer)
    record["final_encoder"] = _state(encoder)
    layer.eval()
    with torch.no_grad():
        z_q, misc = layer(_layout(encoder(inputs[0]), case))
    record["eval"] = {"z_q": z_q.clone(), "q": misc["q"].clone(), "d": misc["d"].clone()}
    return record


# --- the records, and vqtorch itself where its checkout is at hand ----------------------------

REPO = Path(__file__).resolve().parents[2]
RECORDS = REPO / "tests" / "data" / "vqtorch_compat.pt.gz"
API_RECORD = REPO / "tests" / "data" / "vqtorch_api.json"


def load_records() -> dict[str, Any]:
    """The records `make_vqtorch_fixtures.py` wrote (a gzipped `torch.save` of a dict)."""
    return torch.load(io.BytesIO(gzip.decompress(RECORDS.read_bytes())), weights_only=False)


def vqtorch_checkout() -> Path | None:
    """vqtorch's checkout beside the repository (`../shared/vqtorch`), if there is one."""
    path = REPO.parent / "shared" / "vqtorch"
    return path if (path / "vqtorch" / "__init__.py").is_file() else None


def install_torchpq_stand_in() -> None:
    """A `torchpq.clustering.KMeans` whose centroids are `stand_in_centroids` of the data."""

    class KMeans:
        def __init__(self, n_clusters: int, distance: str = "euclidean", **_: object) -> None:
            self.n_clusters = n_clusters

        def fit(self, data: Tensor) -> None:  # vqtorch passes [d, N]
            self.centroids = stand_in_centroids(data.T, self.n_clusters).T

    torchpq = ModuleType("torchpq")
    clustering = ModuleType("torchpq.clustering")
    clustering.KMeans = KMeans  # type: ignore[attr-defined]
    torchpq.clustering = clustering  # type: ignore[attr-defined]
    sys.modules["torchpq"], sys.modules["torchpq.clustering"] = torchpq, clustering


def import_vqtorch(checkout: Path) -> ModuleType:
    """vqtorch from its checkout, on CPU: torchpq replaced by the stand-in, and `stringcolor`
    (which only colours vqtorch's messages) by a pass-through when it is not installed."""
    if "stringcolor" not in sys.modules and importlib.util.find_spec("stringcolor") is None:
        stub = ModuleType("stringcolor")
        stub.cs = lambda text, *args, **kwargs: text  # type: ignore[attr-defined]
        sys.modules["stringcolor"] = stub
    install_torchpq_stand_in()
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    return importlib.import_module("vqtorch")


# --- vqtorch's other modules: norms, dists, math_fns, pool, the running-statistics affine ----


def functions(package: ModuleType) -> dict[str, Any]:
    """Outputs of `package`'s non-layer functions and modules on fixed inputs (where vqtorch
    works: its cosine search and its `entropy` over inner axes are left out)."""
    importlib.import_module(f"{package.__name__}.nn.pool")
    g = torch.Generator().manual_seed(7)
    w = torch.randn(6, 5, generator=g) * 4
    x, y = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    tensor, book = torch.randn(2, 9, 5, generator=g), torch.randn(7, 5, generator=g)
    image = torch.randn(2, 3, 6, 7, generator=g)
    counts = torch.rand(4, 6, generator=g) * 5
    norms, dists = package.norms, package.dists
    out: dict[str, Any] = {
        "max_norm": norms.max_norm(w, max_norm=5.0),
        "max_norm_default": norms.max_norm(w * 3),
        "normalize": norms.Normalize()(x),
        "max_norm_constraint": norms.MaxNormConstraint(max_norm=2.0)(x),
        "match_norm": norms.match_norm(x, y, dim=1),
        "get_norm": [
            type(norms.get_norm(n, 32)[0]).__name__ for n in ("l2", "l2c", "bn", "gn", "in", None)
        ],
        "before_grouping": [
            norms.get_norm(n, 32)[1] for n in ("l2", "l2c", "bn", "gn", "in", None)
        ],
        "euclidean_distance": dists.euclidean_distance(x, y),
        "cosine_distance": dists.cosine_distance(x, y),
        "cdist_top1": dists.euclidean_cdist_topk(tensor, book),
        "cdist_top3": dists.euclidean_cdist_topk(tensor, book, 4, 3),
        "cdist_all": dists.euclidean_cdist_topk(tensor, book, topk=-1),
        "entropy_last": package.math_fns.entropy(counts),
        "entropy_first": package.math_fns.entropy(counts, dim=0),
        "entropy_keepdim": package.math_fns.entropy(counts, keepdim=True),
        "entropy_vector": package.math_fns.entropy(counts[0]),
        "max_vec_pool": package.nn.pool.MaxVecPool2d()(image),
        "max_vec_pool_k2": package.nn.pool.MaxVecPool2d(2, 1, 0)(image),
        "softmax_vec_pool": package.nn.pool.SoftMaxVecPool2d()(image),
        "max_onehot": package.nn.pool.MaxVecPool2d.max_onehot(counts.view(2, 3, 4), dim=1),
    }
    affine = package.nn.AffineTransform(5, use_running_statistics=True, num_groups=1, momentum=0.3)
    affine.train()
    for step in range(3):
        affine.update_running_statistics(tensor * (step + 1), book + step)
    out["running_affine"] = {
        "codebook": affine(book),
        "params": affine.get_affine_params(),
        "state": {k: v.clone() for k, v in affine.state_dict().items()},
    }
    learned = package.nn.AffineTransform(5, lr_scale=3.0, num_groups=7)
    with torch.no_grad():
        learned.scale.copy_(torch.randn(7, 5, generator=g))
        learned.bias.copy_(torch.randn(7, 5, generator=g))
    out["learned_affine"] = learned(book)
    # A grouped layer whose affine map is swapped for one with running statistics: every
    # group's search first folds that group's vectors into the statistics.
    torch.manual_seed(3)
    layer = package.nn.GroupVectorQuant(8, 16, 2, False, affine_lr=1.0, dim=-1)
    layer.affine_transform = package.nn.AffineTransform(4, use_running_statistics=True)
    layer.train()
    steps = []
    for step in range(3):
        z_q, misc = layer(torch.randn(12, 8, generator=g) * (step + 2) + step)
        steps.append({"z_q": z_q.detach(), "q": misc["q"], "loss": misc["loss"].detach().mean()})
    out["running_affine_layer"] = {"steps": steps, "state": _state(layer)}
    return out
