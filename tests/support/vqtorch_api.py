"""vqtorch's public API, read from its source with `ast` (vqtorch itself is not imported).

`collect(package_dir)` walks vqtorch's package (`<vqtorch checkout>/vqtorch`) and returns a
JSON-able record of:

- `modules`: for every module, the public names it offers: its top-level functions, classes
  and constants that do not start with an underscore; for a package also the names its
  `__init__` imports (explicitly, as `_VQBaseLayer`, or with `*`: then the other module's
  names, without its submodules), and its submodules;
- `classes`: for every top-level class (private ones too), its bases, methods (with their
  decorators), class attributes and the instance attributes its methods assign (`self.x = ...`,
  `self.register_buffer("x", ...)`);
- `signatures`: every top-level function's and method's parameters: name, kind and default
  (a literal, or the name or source of the expression).

`make_vqtorch_fixtures.py` writes it to `tests/data/vqtorch_api.json`;
`tests/integration/test_vqtorch_api.py` checks `vqfunc.vqtorch` against that file, and, where
vqtorch's source is at hand, that the file is what the source says.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

ROOT_NAME = "vqtorch"


def _module_name(package_dir: Path, path: Path) -> str:
    parts = list(path.relative_to(package_dir).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([ROOT_NAME, *parts])


def _default(node: ast.expr | None) -> Any:
    if node is None:
        return None
    try:
        return {"value": ast.literal_eval(node)}
    except ValueError:
        if isinstance(node, ast.Name):
            return {"name": node.id}
        return {"expr": ast.unparse(node)}


def _signature(fn: ast.FunctionDef) -> list[dict[str, Any]]:
    a = fn.args
    positional = [*a.posonlyargs, *a.args]
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(a.defaults))
    defaults += list(a.defaults)
    params = [
        {"name": p.arg, "kind": "positional_or_keyword", "default": _default(d)}
        for p, d in zip(positional, defaults, strict=True)
    ]
    if a.vararg is not None:
        params.append({"name": a.vararg.arg, "kind": "var_positional", "default": None})
    for p, d in zip(a.kwonlyargs, a.kw_defaults, strict=True):
        params.append({"name": p.arg, "kind": "keyword_only", "default": _default(d)})
    if a.kwarg is not None:
        params.append({"name": a.kwarg.arg, "kind": "var_keyword", "default": None})
    return params


def _decorators(fn: ast.FunctionDef) -> list[str]:
    return [ast.unparse(d) for d in fn.decorator_list]


def _targets(node: ast.stmt) -> list[ast.expr]:
    if isinstance(node, ast.Assign):
        out: list[ast.expr] = []
        for target in node.targets:
            out.extend(target.elts if isinstance(target, ast.Tuple) else [target])
        return out
    if isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        return [node.target]
    return []


def _class_record(cls: ast.ClassDef) -> dict[str, Any]:
    methods, class_attributes, instance_attributes = {}, [], set()
    for node in cls.body:
        if isinstance(node, ast.FunctionDef):
            methods[node.name] = _decorators(node)
            for inner in ast.walk(node):
                if isinstance(inner, ast.stmt):
                    for target in _targets(inner):
                        if (
                            isinstance(target, ast.Attribute)
                            and isinstance(target.value, ast.Name)
                            and target.value.id == "self"
                        ):
                            instance_attributes.add(target.attr)
                if (
                    isinstance(inner, ast.Call)
                    and isinstance(inner.func, ast.Attribute)
                    and inner.func.attr == "register_buffer"
                    and isinstance(inner.func.value, ast.Name)
                    and inner.func.value.id == "self"
                    and inner.args
                    and isinstance(inner.args[0], ast.Constant)
                ):
                    instance_attributes.add(inner.args[0].value)
        for target in _targets(node):
            if isinstance(target, ast.Name):
                class_attributes.append(target.id)
    return {
        "bases": [ast.unparse(b) for b in cls.bases],
        "methods": methods,
        "class_attributes": sorted(class_attributes),
        "instance_attributes": sorted(instance_attributes),
    }


def collect(package_dir: Path) -> dict[str, Any]:
    """The API record of the vqtorch package at `package_dir` (see the module docstring)."""
    package_dir = Path(package_dir)
    paths = sorted(package_dir.rglob("*.py"))
    trees = {_module_name(package_dir, p): ast.parse(p.read_text()) for p in paths}
    packages = {_module_name(package_dir, p) for p in paths if p.name == "__init__.py"}
    defined: dict[str, list[str]] = {}
    classes: dict[str, Any] = {}
    signatures: dict[str, Any] = {}
    for module, tree in trees.items():
        names = []
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.append(node.name)
            for target in _targets(node):
                if isinstance(target, ast.Name):
                    names.append(target.id)
            if isinstance(node, ast.FunctionDef):
                signatures[f"{module}.{node.name}"] = _signature(node)
            if isinstance(node, ast.ClassDef):
                classes[f"{module}.{node.name}"] = _class_record(node)
                for item in node.body:
                    if isinstance(item, ast.FunctionDef):
                        signatures[f"{module}.{node.name}.{item.name}"] = _signature(item)
        defined[module] = names

    def resolve(module: str, relative: ast.ImportFrom) -> str:
        if relative.level == 0:
            return relative.module or ""
        base = module.split(".") if module in packages else module.split(".")[:-1]
        base = base[: len(base) - (relative.level - 1)]
        return ".".join(base + ([relative.module] if relative.module else []))

    public: dict[str, set[str]] = {}

    def names_of(module: str) -> set[str]:
        if module in public:
            return public[module]
        out = {n for n in defined.get(module, []) if not n.startswith("_")}
        if module in packages:
            out |= {
                m.rsplit(".", 1)[1] for m in trees if "." in m and m.rsplit(".", 1)[0] == module
            }
            for node in trees[module].body:
                if isinstance(node, ast.ImportFrom):
                    source = resolve(module, node)
                    for alias in node.names:
                        if alias.name == "*":
                            # The other module's names, not its submodules (which a star
                            # import only brings along when something imported them).
                            children = {
                                m.rsplit(".", 1)[1] for m in trees if m.startswith(source + ".")
                            }
                            out |= {n for n in names_of(source) if not n.startswith("_")} - children
                        else:
                            out.add(alias.asname or alias.name)
        public[module] = out
        return out

    reexported = {
        alias.name
        for module in packages
        for node in trees[module].body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
        if alias.name.startswith("_")
    }
    modules = {}
    for module in trees:
        names = names_of(module) | {n for n in defined[module] if n in reexported}
        modules[module] = sorted(names)
    return {"modules": modules, "classes": classes, "signatures": signatures}
