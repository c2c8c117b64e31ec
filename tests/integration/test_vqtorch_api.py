"""Every public name, class member and signature of vqtorch exists under `vqfunc.vqtorch`.

`tests/data/vqtorch_api.json` lists vqtorch's API as its source defines it (see
`support.vqtorch_api`): each module's public names, each class's methods, class attributes and
instance attributes, and each function's and method's parameters. The checks here run from
that file; where vqtorch's checkout is beside the repository (`../shared/vqtorch`), the file is
also checked against the source, so it cannot fall behind.

A vqtorch name `vqtorch.a.b` is `vqfunc.vqtorch.a.b`. Signatures match parameter by parameter
(name, kind, default); where vqtorch forwards `*args` / `**kwargs`, the compatibility layer
may spell the forwarded parameters out, and `test_forwarded_keywords` checks those.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from support import vqtorch_api, vqtorch_cases
from torch import nn

import vqfunc.vqtorch as vqtorch

API: dict[str, Any] = json.loads(vqtorch_cases.API_RECORD.read_text())


def compat(name: str) -> str:
    return "vqfunc." + name


def resolve(dotted: str) -> tuple[Any, Any]:
    """`(module object, the object dotted names)` for a vqtorch name, in vqfunc.vqtorch."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        if module in API["modules"]:
            obj = importlib.import_module(compat(module))
            for part in parts[cut:]:
                obj = (
                    inspect.getattr_static(obj, part)
                    if inspect.isclass(obj)
                    else getattr(obj, part)
                )
            return importlib.import_module(compat(module)), obj
    raise LookupError(dotted)


def test_record_matches_vqtorch_source() -> None:
    checkout = vqtorch_cases.vqtorch_checkout()
    if checkout is None:
        pytest.skip("vqtorch's checkout is not beside the repository (../shared/vqtorch)")
    fresh = json.loads(json.dumps(vqtorch_api.collect(checkout / "vqtorch")))
    assert fresh == API, "rerun tests/support/make_vqtorch_fixtures.py"


def test_record_lists_the_package_tree() -> None:
    assert set(API["modules"]) == {
        "vqtorch",
        "vqtorch.dists",
        "vqtorch.math_fns",
        "vqtorch.norms",
        "vqtorch.utils",
        "vqtorch.nn",
        "vqtorch.nn.affine",
        "vqtorch.nn.gvq",
        "vqtorch.nn.pool",
        "vqtorch.nn.rvq",
        "vqtorch.nn.vq",
        "vqtorch.nn.vq_base",
        "vqtorch.nn.utils",
        "vqtorch.nn.utils.init",
        "vqtorch.nn.utils.replace",
    }
    assert {"VectorQuant", "no_vq", "is_vq", "entropy"} <= set(API["modules"]["vqtorch"])


@pytest.mark.parametrize("module", sorted(API["modules"]))
def test_every_public_name_exists(module: str) -> None:
    mod = importlib.import_module(compat(module))
    missing = [name for name in API["modules"][module] if not hasattr(mod, name)]
    assert not missing, f"{compat(module)} lacks {missing}"
    assert hasattr(mod, "__all__")


def test_names_are_the_same_objects_across_the_tree() -> None:
    assert vqtorch.VectorQuant is vqtorch.nn.VectorQuant is vqtorch.nn.vq.VectorQuant
    assert vqtorch.nn._VQBaseLayer is vqtorch.nn.vq_base._VQBaseLayer
    assert vqtorch.nn.utils.lru_replacement is vqtorch.nn.utils.replace.lru_replacement
    assert vqtorch.no_vq is vqtorch.utils.no_vq
    assert vqtorch.utils.is_vq is vqtorch.is_vq
    # As in vqtorch: the top-level `utils` is the module of is_vq / no_vq, not nn.utils.
    assert vqtorch.utils is importlib.import_module("vqfunc.vqtorch.utils")


@pytest.mark.parametrize("name", sorted(API["classes"]))
def test_classes_have_vqtorch_members(name: str) -> None:
    record = API["classes"][name]
    _, cls = resolve(name)
    assert inspect.isclass(cls), name
    for method, decorators in record["methods"].items():
        member = inspect.getattr_static(cls, method, None)
        if member is None:  # inherited
            member = getattr(cls, method, None)
        assert member is not None, f"{name}.{method} is missing"
        if "property" in decorators:
            assert isinstance(inspect.getattr_static(cls, method), property), f"{name}.{method}"
        elif "staticmethod" in decorators:
            assert isinstance(inspect.getattr_static(cls, method), staticmethod), f"{name}.{method}"
        else:
            assert callable(member), f"{name}.{method}"
    for attribute in record["class_attributes"]:
        assert hasattr(cls, attribute), f"{name}.{attribute}"


def _sgd(*args: Any, **kwargs: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(*args, **kwargs, lr=1.0)


# Instances that have every instance attribute vqtorch's class can have (some exist only with
# an option on), per class.
FACTORIES: dict[str, list[Callable[[], Any]]] = {
    "vqtorch.nn.vq_base._VQBaseLayer": [
        lambda: vqtorch.nn._VQBaseLayer(8, 16, kmeans_init=True),
    ],
    "vqtorch.nn.vq.VectorQuant": [
        lambda: vqtorch.nn.VectorQuant(
            8, 16, beta=1.0, affine_lr=1.0, replace_freq=2, kmeans_init=True, inplace_optimizer=_sgd
        ),
    ],
    "vqtorch.nn.gvq.GroupVectorQuant": [
        lambda: vqtorch.nn.GroupVectorQuant(8, 16, 2, False, affine_lr=1.0),
    ],
    "vqtorch.nn.rvq.ResidualVectorQuant": [
        lambda: vqtorch.nn.ResidualVectorQuant(8, 16, 2, False, affine_lr=1.0),
    ],
    "vqtorch.nn.affine.AffineTransform": [
        lambda: vqtorch.nn.AffineTransform(4),
        lambda: vqtorch.nn.AffineTransform(4, use_running_statistics=True),
    ],
    "vqtorch.nn.pool._VecPool2d": [lambda: vqtorch.nn.MaxVecPool2d()],
    "vqtorch.nn.pool.MaxVecPool2d": [lambda: vqtorch.nn.MaxVecPool2d()],
    "vqtorch.nn.pool.SoftMaxVecPool2d": [lambda: vqtorch.nn.SoftMaxVecPool2d()],
    "vqtorch.nn.utils.replace.ReplaceLRU": [lambda: vqtorch.nn.utils.ReplaceLRU()],
    "vqtorch.norms.Normalize": [lambda: vqtorch.norms.Normalize()],
    "vqtorch.norms.MaxNormConstraint": [lambda: vqtorch.norms.MaxNormConstraint()],
    "vqtorch.utils.no_vq": [lambda: vqtorch.no_vq(nn.Linear(1, 1))],
}


@pytest.mark.parametrize("name", sorted(API["classes"]))
def test_instances_have_vqtorch_attributes(name: str) -> None:
    expected = API["classes"][name]["instance_attributes"]
    assert name in FACTORIES, f"add an instance factory for {name}"
    present: set[str] = set()
    for make in FACTORIES[name]:
        instance = make()
        present |= {a for a in expected if hasattr(instance, a)}
        if isinstance(instance, vqtorch.no_vq):
            instance.__exit__(None, None, None)
    assert sorted(set(expected) - present) == []


def _default_matches(actual: Any, recorded: dict[str, Any] | None, module: Any) -> bool:
    if recorded is None:
        return actual is inspect.Parameter.empty
    if "value" in recorded:
        return actual == recorded["value"] and type(actual) in (type(recorded["value"]), float)
    if "name" in recorded:
        return actual == getattr(module, recorded["name"])
    return False


# Parameters that vqtorch requires and that have a default here, on purpose: vqtorch's README
# calls `no_vq()` without the modules its signature needs.
NEW_DEFAULTS = {("vqtorch.utils.no_vq.__init__", "modules"): None}


@pytest.mark.parametrize("name", sorted(API["signatures"]))
def test_signatures_match(name: str) -> None:
    module, obj = resolve(name)
    if isinstance(obj, property):
        return
    if isinstance(obj, staticmethod):
        obj = obj.__func__
    recorded = API["signatures"][name]
    actual = list(inspect.signature(obj).parameters.values())
    fixed = [p for p in recorded if p["kind"] not in ("var_positional", "var_keyword")]
    variadic = len(fixed) < len(recorded)
    assert len(actual) >= len(fixed), f"{name}: {actual} lacks parameters of {recorded}"
    for param, want in zip(actual, fixed, strict=False):
        assert param.name == want["name"], f"{name}: {param.name} != {want['name']}"
        assert param.kind.name.lower() == want["kind"], f"{name}.{param.name}: {param.kind}"
        if (name, param.name) in NEW_DEFAULTS:
            assert param.default == NEW_DEFAULTS[name, param.name]
            continue
        assert _default_matches(param.default, want["default"], module), (
            f"{name}.{param.name}: default {param.default!r}, vqtorch {want['default']}"
        )
    if not variadic:
        assert len(actual) == len(fixed), f"{name}: extra parameters {actual[len(fixed) :]}"


def _parameters(name: str, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        p["name"]: p["default"]["value"]
        for p in API["signatures"][name]
        if p["default"] is not None and p["name"] not in skip
    }


def test_forwarded_keywords() -> None:
    """vqtorch forwards `**kwargs` (VectorQuant -> _VQBaseLayer, GroupVectorQuant and
    ResidualVectorQuant -> VectorQuant): the same keywords, with the same defaults, work here."""
    base = _parameters("vqtorch.nn.vq_base._VQBaseLayer.__init__")
    plain = _parameters("vqtorch.nn.vq.VectorQuant.__init__")
    cases = {
        vqtorch.nn.VectorQuant: base,
        # The grouped and residual layers set code_vector_size themselves (vqtorch raises on it).
        vqtorch.nn.GroupVectorQuant: {**plain, **base},
        vqtorch.nn.ResidualVectorQuant: {**plain, **base},
    }
    for cls, expected in cases.items():
        if cls is not vqtorch.nn.VectorQuant:
            expected = {k: v for k, v in expected.items() if k != "code_vector_size"}
        parameters = inspect.signature(cls).parameters
        for keyword, default in expected.items():
            assert keyword in parameters, f"{cls.__name__} does not take {keyword}"
            assert parameters[keyword].default == default, (cls.__name__, keyword)
        assert "code_vector_size" not in parameters or cls is vqtorch.nn.VectorQuant
