"""The package's imports point one way (front door -> dispatch -> backends -> kernels) and form no cycle.

docs/design.md ("Architecture") draws the layers; this walks every module's AST, function-level
imports included, so a new upward import or cycle fails here rather than in a reviewer's head.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "convit_kernels"

# Lowest first; a module may import its own layer and those below. Prefixes cover subpackages.
LAYERS = {
    "kernels": (
        "_version",
        "convit_shapes",
        "dtypes",
        "settings",
        "build_config",
        "files",
        "reference",
        "separable",
        "accuracy",
        "op_registration",
        "verdict_cache",
        "extension_loader",
        "backends.triton.configs",
        "backends.triton.kernels",
        "backends.triton.launch",
    ),
    "backends": ("backends",),
    "dispatch": ("dispatch", "verification", "gpsa_op"),
    "front door": ("", "attention", "module", "patch"),
    "tools": (
        "arguments",
        "cli",
        "__main__",
        "compare_timm",
        "backends_report",
        "gpu_check",
        "aot",
        "bench",
        "train",
        "experiments",
    ),
}
RANK = {name: rank for rank, name in enumerate(LAYERS)}


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _layer(module: str) -> str:
    """The layer of a module: the longest prefix that names one (the package's __init__ is "")."""
    best, best_len = None, -1
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            matches = module == prefix or (prefix and module.startswith(prefix + "."))
            if matches and len(prefix) > best_len:
                best, best_len = layer, len(prefix)
    if best is None:
        raise AssertionError(f"convit_kernels.{module} is in no layer of tests/test_architecture.py: give it one")
    return best


def _imports(name: str, path: pathlib.Path, modules: dict) -> set[str]:
    """The package modules ``name`` imports (relative names resolved; ``from pkg import mod`` counted as mod)."""
    is_package = path.name == "__init__.py"
    package = name.split(".") if is_package else name.split(".")[:-1]
    package = [p for p in package if p]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            bases = [alias.name for alias in node.names]
            names = [[]] * len(bases)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                bases = [".".join(["convit_kernels"] + anchor + ([node.module] if node.module else []))]
            else:
                bases = [node.module or ""]
            names = [[alias.name for alias in node.names]]
        else:
            continue
        for base, imported in zip(bases, names):
            if base != "convit_kernels" and not base.startswith("convit_kernels."):
                continue
            module = base.removeprefix("convit_kernels").removeprefix(".")
            sub = [f"{module}.{n}".lstrip(".") for n in imported if f"{module}.{n}".lstrip(".") in modules]
            targets.update(sub or [module])
    targets.discard(name)
    return targets


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer():
    for name in _modules():
        _layer(name)


def test_imports_point_down():
    upward = [
        f"convit_kernels.{name or '__init__'} ({_layer(name)}) imports convit_kernels.{target} ({_layer(target)})"
        for name, targets in _graph().items()
        for target in targets
        if RANK[_layer(target)] > RANK[_layer(name)]
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    graph = _graph()
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                cycle = stack[stack.index(target) :] + [target]
                pytest.fail("import cycle: " + " -> ".join(f"convit_kernels.{m}" for m in cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_module_imports_another_modules_private_names():
    private = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("convit_kernels")):
                names = [alias.name for alias in node.names]
                # _version is a module of its own; dunders such as __version__ are public by convention.
                private += [
                    f"{name}: {n}" for n in names if n.startswith("_") and not n.startswith("__") and n != "_version"
                ]
    assert not private, private


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80


def _functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, lines from its def to its end) of every function, methods and nested functions included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node.end_lineno - node.lineno + 1
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield from _functions(node, prefix + node.name + ".")
        elif not isinstance(node, ast.Lambda):
            yield from _functions(node, prefix)


def test_modules_and_functions_stay_small():
    """Every module at most MAX_MODULE_LINES lines and every function at most MAX_FUNCTION_LINES."""
    sizes = {}
    for name, path in _modules().items():
        text = path.read_text()
        sizes[name or "__init__"] = (len(text.splitlines()), MAX_MODULE_LINES)
        for function, lines in _functions(ast.parse(text)):
            sizes[f"{name}.{function}".lstrip(".")] = (lines, MAX_FUNCTION_LINES)
    too_big = [
        f"convit_kernels.{name}: {lines} lines (at most {limit})"
        for name, (lines, limit) in sorted(sizes.items())
        if lines > limit
    ]
    assert not too_big, "split these by idea:\n" + "\n".join(too_big)


OP_LAYER = ("attention", "gpsa_op", "module", "patch")


def test_the_op_layer_names_no_backend():
    """The front door and the op pair name no registered backend in a string: what a backend can do are fields
    of its description (convit_kernels.backends.Backend), read wherever the op layer needs them."""
    import re

    from convit_kernels.backends import backend_names

    names = set(backend_names())
    quoted = [re.compile(rf"""(["'`]){re.escape(name)}\1""") for name in names]
    found = []
    for module in OP_LAYER:
        for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value in names or any(pattern.search(node.value) for pattern in quoted):
                    found.append(f"convit_kernels/{module}.py:{node.lineno}: {node.value[:80]!r}")
    assert not found, "\n".join(found)
