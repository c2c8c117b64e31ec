"""The package's layering, read from the source with `ast` (nothing is imported):

(a) the pure core never imports the layers (`vqfunc.nn`) and defines no `nn.Module`;
(b) `vqfunc._kernels` imports nothing of vqfunc outside itself;
(c) the top-level package and every public module define `__all__`, and bind every name in it.

The core is every module under vqfunc/ except the layers (`vqfunc/nn/`), the modules built on
them (`inits.py`, `demo.py`, `bench.py`, the future `vqtorch/` shim) and the top-level
`__init__.py`. Imports count in every form and place: absolute or relative, `from vqfunc import
nn`, inside functions or `if TYPE_CHECKING:`, and `importlib.import_module` / `__import__` of a
constant name. The detectors themselves are checked on small sources at the end of this file.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "vqfunc"

LAYERS = "vqfunc.nn"
KERNELS = "vqfunc._kernels"
# Modules outside the pure core: the layers and what is built on them (and the top level,
# which re-exports the layers).
NOT_CORE = ("vqfunc", "vqfunc.inits", "vqfunc.demo", "vqfunc.bench")
NOT_CORE_PACKAGES = (LAYERS, "vqfunc.vqtorch")
# torch.nn classes that are not modules.
TORCH_NN_NON_MODULES = {"Parameter", "UninitializedParameter", "UninitializedBuffer", "Buffer"}


@dataclass(frozen=True)
class Source:
    path: Path  # relative to the repository root, for messages
    module: str  # dotted name, e.g. "vqfunc._kernels.cpu"; a package's is its own name
    is_package: bool
    tree: ast.Module

    @property
    def package(self) -> str:
        return self.module if self.is_package else self.module.rpartition(".")[0]


@dataclass(frozen=True)
class Import:
    line: int
    text: str  # the statement or call as written (unparsed)
    # `from X import a, b`: X, and the names X.a, X.b; `import X` (or a dynamic import): None,
    # and the name X.
    base: str | None
    names: tuple[str, ...]

    @property
    def targets(self) -> tuple[str, ...]:
        """The absolute dotted names it imports (a `from X import a` imports X and X.a)."""
        return self.names if self.base is None else (self.base, *self.names)


def module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def parse(text: str, module: str, is_package: bool = False, path: Path | None = None) -> Source:
    shown = path or Path(*module.split(".")).with_suffix(".py")
    return Source(shown, module, is_package, ast.parse(text, filename=str(shown)))


def package_sources() -> list[Source]:
    sources = []
    for file in sorted(PACKAGE.rglob("*.py")):
        if "__pycache__" in file.parts:
            continue
        module, is_package = module_name(file)
        sources.append(parse(file.read_text(), module, is_package, file.relative_to(ROOT)))
    return sources


SOURCES = package_sources()


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def is_core(module: str) -> bool:
    return module not in NOT_CORE and not any(within(module, p) for p in NOT_CORE_PACKAGES)


def is_public(module: str) -> bool:
    return not any(part.startswith("_") for part in module.split("."))


def resolve(source: Source, level: int, module: str | None) -> str:
    """The absolute name of `from <level dots><module> import ...` in `source`."""
    if level == 0:
        return module or ""
    base = source.package.split(".")
    if level > 1:
        base = base[: -(level - 1)]
    return ".".join([*base, module] if module else base)


def imports(source: Source) -> Iterator[Import]:
    """Every import of `source`, at any depth (in functions, under `if TYPE_CHECKING:`)."""
    for node in ast.walk(source.tree):
        base: str | None = None
        if isinstance(node, ast.Import):
            names = tuple(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = resolve(source, node.level, node.module)
            names = tuple(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and _is_dynamic_import(node):
            first = node.args[0]
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                continue
            name = first.value.lstrip(".")
            level = len(first.value) - len(name)
            names = (resolve(source, level, name) if level else name,)
        else:
            continue
        yield Import(node.lineno, ast.unparse(node), base, names)


def _is_dynamic_import(node: ast.Call) -> bool:
    func = node.func
    named = (isinstance(func, ast.Name) and func.id in {"__import__", "import_module"}) or (
        isinstance(func, ast.Attribute) and func.attr == "import_module"
    )
    return named and bool(node.args)


def alias_table(source: Source) -> dict[str, str]:
    """Local name -> the dotted name it was imported as (at any depth of the module)."""
    table: dict[str, str] = {}
    for node in ast.walk(source.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    table[alias.asname] = alias.name
                else:
                    first = alias.name.split(".")[0]
                    table[first] = first
        elif isinstance(node, ast.ImportFrom):
            base = resolve(source, node.level, node.module)
            for alias in node.names:
                if alias.name != "*":
                    table[alias.asname or alias.name] = f"{base}.{alias.name}"
    return table


def dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = dotted(node.value)
        return None if inner is None else f"{inner}.{node.attr}"
    if isinstance(node, ast.Subscript):  # a generic base, e.g. Base[T]
        return dotted(node.value)
    return None


def qualified(written: str | None, aliases: dict[str, str]) -> str:
    """`written` (e.g. "nn.Module") with its first name replaced by what it was imported as."""
    if written is None:
        return ""
    head, _, rest = written.partition(".")
    return aliases.get(head, head) + (f".{rest}" if rest else "")


def is_module_class(written: str, aliases: dict[str, str]) -> bool:
    """Whether a base class written as `written` is torch.nn.Module or one of its subclasses."""
    if written in {"Module", "nn.Module", "torch.nn.Module"}:
        return True
    full = qualified(written, aliases)
    if full in {"torch.nn.Module", "torch.nn.modules.module.Module"}:
        return True
    if within(full, "torch.nn.modules"):
        return True
    parts = full.split(".")
    # torch.nn.Linear, torch.nn.ModuleList, ...: torch.nn's classes are modules but for a few.
    return (
        len(parts) == 3
        and parts[:2] == ["torch", "nn"]
        and parts[2][:1].isupper()
        and parts[2] not in TORCH_NN_NON_MODULES
    )


# ---------------------------------------------------------------------------------------------
# The three rules, each returning one message per violation.


def core_violations(source: Source) -> list[str]:
    if not is_core(source.module):
        return []
    found = []
    for imp in imports(source):
        bad = sorted({t for t in imp.targets if within(t, LAYERS)})
        if bad:
            found.append(
                f"{source.path}:{imp.line}: `{imp.text}` imports {', '.join(bad)}; "
                f"the pure core must not import the layers"
            )
    aliases = alias_table(source)
    for node in ast.walk(source.tree):
        # `import vqfunc` then `vqfunc.nn.VectorQuantize`: reported once, at the shortest
        # attribute that reaches the layers.
        if isinstance(node, ast.Attribute):
            reached = qualified(dotted(node), aliases)
            if within(reached, LAYERS) and not within(
                qualified(dotted(node.value), aliases), LAYERS
            ):
                found.append(
                    f"{source.path}:{node.lineno}: `{ast.unparse(node)}` reaches {LAYERS}; "
                    f"the pure core must not use the layers"
                )
        if not isinstance(node, ast.ClassDef):
            continue
        for base in node.bases:
            written = dotted(base)
            if written is not None and is_module_class(written, aliases):
                found.append(
                    f"{source.path}:{node.lineno}: class {node.name} derives from {written}; "
                    f"nn.Module classes belong in vqfunc/nn, not the pure core"
                )
    return found


def kernel_violations(source: Source) -> list[str]:
    if not within(source.module, KERNELS):
        return []
    found = []
    for imp in imports(source):
        if imp.base is not None and within(imp.base, KERNELS):
            continue
        if imp.base == "vqfunc" and imp.names:
            # `from vqfunc import _kernels, x`: what counts is what is named.
            targets = imp.names
        elif imp.base is not None:
            targets = (imp.base,)  # `from vqfunc._search import f` imports vqfunc._search
        else:
            targets = imp.names
        outside = [t for t in targets if within(t, "vqfunc") and not within(t, KERNELS)]
        if outside:
            found.append(
                f"{source.path}:{imp.line}: `{imp.text}` imports {', '.join(outside)}; "
                f"vqfunc/_kernels may import only vqfunc._kernels"
            )
    return found


def _literal_names(node: ast.expr | None) -> list[tuple[int, str]] | None:
    """The (line, name) pairs of a literal list or tuple of strings, else None."""
    if not isinstance(node, ast.List | ast.Tuple):
        return None
    names = []
    for element in node.elts:
        if not (isinstance(element, ast.Constant) and isinstance(element.value, str)):
            return None
        names.append((element.lineno, element.value))
    return names


def _all_value(node: ast.AST) -> ast.expr | None:
    """What `node` puts in `__all__` (`__all__ = / += / : list[str] = [...]`,
    `__all__.extend([...])`, `__all__.append("x")`), or None if it does not touch it."""
    if isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            return node.value
    elif (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in {"extend", "append"}
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "__all__"
        and node.args
    ):
        arg = node.args[0]
        return ast.List([arg], ast.Load()) if node.func.attr == "append" else arg
    return None


def declared_all(source: Source) -> tuple[list[tuple[int, str]], list[str]] | None:
    """The module's `__all__` as (line, name) pairs and the problems reading it; None if the
    module does not define `__all__`."""
    names: list[tuple[int, str]] = []
    problems: list[str] = []
    defined = False
    for node in ast.walk(source.tree):
        value = _all_value(node)
        if value is None:
            continue
        defined = True
        literal = _literal_names(value)
        if literal is None:
            problems.append(
                f"{source.path}:{node.lineno}: __all__ is not a literal list of strings, so its "
                f"names cannot be checked: `{ast.unparse(node)}`"
            )
        else:
            names += literal
    return (names, problems) if defined else None


def _bound_by_target(target: ast.expr) -> Iterator[str]:
    if isinstance(target, ast.Name):
        yield target.id
    elif isinstance(target, ast.Tuple | ast.List):
        for element in target.elts:
            yield from _bound_by_target(element)
    elif isinstance(target, ast.Starred):
        yield from _bound_by_target(target.value)


def module_bindings(body: list[ast.stmt]) -> tuple[set[str], list[int]]:
    """Names bound at module level (in `if`/`try`/`with`/`for` blocks too, not in functions
    or classes), and the lines of star imports, whose names cannot be known."""
    bound: set[str] = set()
    stars: list[int] = []
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
            continue
        if isinstance(node, ast.Assign):
            for target in node.targets:
                bound.update(_bound_by_target(target))
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            if node.value is not None:  # `x: int` alone binds nothing
                bound.update(_bound_by_target(node.target))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                bound.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name == "*":
                    stars.append(node.lineno)
                else:
                    bound.add(alias.asname or alias.name)
        elif isinstance(node, ast.For | ast.AsyncFor):
            bound.update(_bound_by_target(node.target))
        elif isinstance(node, ast.With | ast.AsyncWith):
            for item in node.items:
                if item.optional_vars is not None:
                    bound.update(_bound_by_target(item.optional_vars))
        for block in ("body", "orelse", "finalbody"):
            inner, inner_stars = module_bindings(getattr(node, block, []))
            bound |= inner
            stars += inner_stars
        for handler in getattr(node, "handlers", []):
            inner, inner_stars = module_bindings(handler.body)
            bound |= inner
            stars += inner_stars
    return bound, stars


def public_sources() -> list[Source]:
    return [s for s in SOURCES if is_public(s.module)]


def missing_all(source: Source) -> list[str]:
    if not is_public(source.module) or declared_all(source) is not None:
        return []
    return [f"{source.path}:1: public module {source.module} does not define __all__"]


def unbound_all(source: Source) -> list[str]:
    declared = declared_all(source)
    if not is_public(source.module) or declared is None:
        return []
    names, problems = declared
    bound, stars = module_bindings(source.tree.body)
    found = list(problems)
    found += [
        f"{source.path}:{line}: star import; the names of __all__ cannot be checked"
        for line in stars
    ]
    found += [
        f"{source.path}:{line}: __all__ names {name!r}, which {source.module} does not bind"
        for line, name in names
        if name not in bound
    ]
    return found


def report(violations: list[str]) -> str:
    return f"{len(violations)} violation(s):\n" + "\n".join(violations)


# ---------------------------------------------------------------------------------------------
# The rules on the package.


def test_the_package_is_found() -> None:
    modules = {s.module for s in SOURCES}
    assert {"vqfunc", "vqfunc._quantize", "vqfunc.nn", KERNELS} <= modules
    assert any(is_core(m) for m in modules) and any(within(m, KERNELS) for m in modules)
    assert {"vqfunc", "vqfunc.nn"} <= {s.module for s in public_sources()}


def test_the_core_does_not_import_the_layers_or_define_modules() -> None:
    violations = [v for source in SOURCES for v in core_violations(source)]
    assert not violations, report(violations)


def test_kernels_import_nothing_of_vqfunc_outside_the_kernels() -> None:
    violations = [v for source in SOURCES for v in kernel_violations(source)]
    assert not violations, report(violations)


def test_the_top_level_and_every_public_module_define_all() -> None:
    violations = [v for source in SOURCES for v in missing_all(source)]
    assert not violations, report(violations)


def test_every_name_in_all_is_bound() -> None:
    violations = [v for source in SOURCES for v in unbound_all(source)]
    assert not violations, report(violations)


# ---------------------------------------------------------------------------------------------
# The detectors, on small sources: each form of violation is caught, allowed code is not.


@pytest.mark.parametrize(
    ("module", "is_package", "text"),
    [
        ("vqfunc._quantize", False, "import vqfunc.nn"),
        ("vqfunc._quantize", False, "import vqfunc.nn._base as base"),
        ("vqfunc._quantize", False, "from vqfunc.nn import VectorQuantize"),
        ("vqfunc._quantize", False, "from vqfunc.nn._base import Layer"),
        ("vqfunc._quantize", False, "from vqfunc import nn"),
        ("vqfunc._quantize", False, "from vqfunc import quantize, nn as layers"),
        ("vqfunc._quantize", False, "from .nn import VectorQuantize"),
        ("vqfunc._quantize", False, "from . import nn"),
        ("vqfunc.residual._state", False, "from ..nn._base import Layer"),
        ("vqfunc.residual", True, "from ..nn import VectorQuantize"),
        ("vqfunc._kernels.cpu", False, "from .. import nn"),
        ("vqfunc._quantize", False, "def f():\n    from vqfunc.nn import no_vq\n    return no_vq"),
        (
            "vqfunc._quantize",
            False,
            "import typing\nif typing.TYPE_CHECKING:\n    import vqfunc.nn",
        ),
        ("vqfunc._quantize", False, "import importlib\nimportlib.import_module('vqfunc.nn')"),
        ("vqfunc._quantize", False, "__import__('vqfunc.nn._base')"),
        ("vqfunc._quantize", False, "import vqfunc\ndef f():\n    return vqfunc.nn.no_vq.x"),
        ("vqfunc.checkpoint", False, "from torch import nn\nclass Layer(nn.Module): ..."),
        ("vqfunc._quantize", False, "import torch\nclass Layer(torch.nn.Module): ..."),
        ("vqfunc._quantize", False, "from torch.nn import Module\nclass Layer(Module): ..."),
        ("vqfunc._quantize", False, "import torch.nn as tnn\nclass Layer(tnn.Linear): ..."),
        ("vqfunc._quantize", False, "from torch.nn import Module as M\nclass Layer(M): ..."),
        ("vqfunc._quantize", False, "def f():\n    class Local(nn.Module): ...\n    return Local"),
    ],
)
def test_core_rule_catches(module: str, is_package: bool, text: str) -> None:
    source = parse(text, module, is_package)
    violations = core_violations(source)
    assert len(violations) == 1, violations
    assert violations[0].startswith(f"{source.path}:")


@pytest.mark.parametrize(
    ("module", "text"),
    [
        ("vqfunc._quantize", "import torch.nn.functional as F\nfrom torch import nn"),
        ("vqfunc._quantize", "from vqfunc._kernels import straight_through"),
        ("vqfunc._quantize", "from torch import nn\nclass P(nn.Parameter): ..."),
        ("vqfunc._quantize", "from typing import NamedTuple\nclass Out(NamedTuple): ..."),
        ("vqfunc.nn._base", "from torch import nn\nclass Layer(nn.Module): ..."),
        ("vqfunc.inits", "from vqfunc.nn._codebook_warmup import codebook_warmup"),
        ("vqfunc.demo", "from vqfunc.nn import VectorQuantize"),
        ("vqfunc.bench", "from vqfunc import nn"),
        ("vqfunc.vqtorch._layers", "from vqfunc.nn import VectorQuantize"),
        ("vqfunc", "from vqfunc.nn import VectorQuantize"),
        ("vqfunc._quantize", "import vqfunc.nnx"),
        (
            "vqfunc._quantize",
            "import vqfunc\nimport torch\nx = vqfunc.quantize, torch.nn.functional",
        ),
    ],
)
def test_core_rule_allows(module: str, text: str) -> None:
    assert core_violations(parse(text, module)) == []


@pytest.mark.parametrize(
    ("module", "is_package", "text"),
    [
        ("vqfunc._kernels.cpu", False, "import vqfunc"),
        ("vqfunc._kernels.cpu", False, "import vqfunc._search"),
        ("vqfunc._kernels.cpu", False, "from vqfunc import _search"),
        ("vqfunc._kernels.cpu", False, "from vqfunc._config import VQConfig"),
        ("vqfunc._kernels.cpu", False, "from .. import _search"),
        ("vqfunc._kernels.cpu", False, "from .._search import nearest_codes"),
        ("vqfunc._kernels", True, "from .._layout import to_rows"),
        ("vqfunc._kernels", True, "from vqfunc import _kernels, _search"),
        ("vqfunc._kernels.cpu", False, "def f():\n    from vqfunc.nn import no_vq"),
        ("vqfunc._kernels.cpu", False, "import importlib\nimportlib.import_module('vqfunc._ema')"),
        ("vqfunc._kernels.cpu", False, "import importlib\nimportlib.import_module('.._ema')"),
    ],
)
def test_kernel_rule_catches(module: str, is_package: bool, text: str) -> None:
    source = parse(text, module, is_package)
    violations = kernel_violations(source)
    assert len(violations) == 1, violations
    assert violations[0].startswith(f"{source.path}:")


@pytest.mark.parametrize(
    ("module", "is_package", "text"),
    [
        ("vqfunc._kernels.cpu", False, "import torch\nimport triton.language as tl"),
        ("vqfunc._kernels.cpu", False, "from vqfunc._kernels import cpu as _cpu_kernel"),
        ("vqfunc._kernels.cpu", False, "import vqfunc._kernels.triton_kernel"),
        ("vqfunc._kernels.cpu", False, "from vqfunc import _kernels"),
        ("vqfunc._kernels.cpu", False, "from . import torch_search\nfrom .cpu import f"),
        ("vqfunc._kernels", True, "from .cpu import available"),
        ("vqfunc._kernels.cpu", False, "importlib.import_module('vqfunc._kernels.triton_kernel')"),
        ("vqfunc._search", False, "from vqfunc._config import VQConfig"),
    ],
)
def test_kernel_rule_allows(module: str, is_package: bool, text: str) -> None:
    assert kernel_violations(parse(text, module, is_package)) == []


def test_all_rules_on_small_modules() -> None:
    assert missing_all(parse("x = 1", "vqfunc.checkpoint")) == [
        "vqfunc/checkpoint.py:1: public module vqfunc.checkpoint does not define __all__"
    ]
    assert missing_all(parse("x = 1", "vqfunc._config")) == []  # private
    assert missing_all(parse("x = 1", "vqfunc.residual._state")) == []  # private
    assert missing_all(parse("x = 1", "vqfunc._kernels.cpu")) == []  # in a private package
    assert len(missing_all(parse("x = 1", "vqfunc", is_package=True))) == 1
    assert missing_all(parse("__all__ = []", "vqfunc.checkpoint")) == []

    bound = """
import os
import os.path as osp
from typing import Any as Whatever
from . import sibling
a, (b, *c) = 1, (2, 3)
d: int = 4
e: int
def f(): g = 1
class H: i = 1
try:
    from fast import j
except ImportError:
    j = None
if os.name:
    for k in []: pass
    with open(os.devnull) as m: pass
"""
    good = bound + '__all__ = ["os", "osp", "Whatever", "sibling", "a", "b", "c", "d", "f"]\n'
    good += '__all__ += ["H", "j", "k", "m"]\n'
    assert unbound_all(parse(good, "vqfunc.checkpoint")) == []
    bad = bound + '__all__ = ["e", "g", "i", "path"]\n__all__.append("missing")\n'
    assert unbound_all(parse(bad, "vqfunc.checkpoint")) == [
        f"vqfunc/checkpoint.py:{bad.count(chr(10)) - 1}: __all__ names {name!r}, which "
        "vqfunc.checkpoint does not bind"
        for name in ("e", "g", "i", "path")
    ] + [
        f"vqfunc/checkpoint.py:{bad.count(chr(10))}: __all__ names 'missing', which "
        "vqfunc.checkpoint does not bind"
    ]
    computed = unbound_all(parse("__all__ = [n for n in dir()]", "vqfunc.distributed"))
    assert len(computed) == 1 and "not a literal list" in computed[0]
    star = unbound_all(parse("from os import *\n__all__ = ['path']", "vqfunc.distributed"))
    assert star[0] == "vqfunc/distributed.py:1: star import; the names of __all__ cannot be checked"
