"""The shape of the package, read from its source with ``ast``: imports run one
way (no cycle between modules, nor between the top-level modules and subpackages),
no private Keras, no function over 80 lines, no module
over 450 lines, and imports inside functions only where they defer something heavy
or optional that the module does not import at the top already (so ``import
shopee_tpu`` stays light and Keras's backend stays open)."""

from __future__ import annotations

import ast
import os
from collections import defaultdict

from conftest import REPO

PACKAGE = os.path.join(REPO, "shopee_tpu")
# Third-party modules a function may import late: frameworks whose import is slow or
# fixes Keras's backend, and optional extras.
DEFERRED = {
    "keras",
    "tensorflow",
    "jax",
    "jaxlib",
    "tf_keras",
    "keras_hub",
    "kaggle",
    "kagglesdk",
    "sklearn",
    "skimage",
    "bson",
    "pymongo",
    "google",
    "slugify",
    "optuna",
    "matplotlib",
    "tqdm",
    "h5py",
    "PIL",
    "pandas",
    "yaml",
    "safetensors",
    "tf2onnx",
    "onnxruntime",
    "ai_edge_litert",
    "resource",  # Unix only
}


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


MODULES = _modules()
TREES = {m: ast.parse(open(p, encoding="utf-8").read()) for m, p in MODULES.items()}


def _lazy_exports() -> dict[tuple[str, str], str]:
    """``{(package, name): module}`` from each package's ``_EXPORTS`` table."""
    out = {}
    for module, tree in TREES.items():
        for node in tree.body:
            if isinstance(node, ast.Assign) and [
                getattr(t, "id", None) for t in node.targets
            ] == ["_EXPORTS"]:
                for name, target in ast.literal_eval(node.value).items():
                    out[module, name] = target
    return out


LAZY = _lazy_exports()


def _imports(tree: ast.AST):
    """``(module imported, inside a function)`` for every import statement."""

    def walk(node, inside):
        for child in ast.iter_child_nodes(node):
            # A script's `if __name__ == "__main__":` block runs late, like a function.
            deeper = inside or isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            )
            deeper = deeper or _is_main_block(child)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, deeper
            elif isinstance(child, ast.ImportFrom) and child.level == 0:
                # `from shopee_tpu.data.read import pipeline` imports the module
                # `pipeline`; `from shopee_tpu.data import load_dataset` imports
                # the package.
                # A package's lazy export is an import of the module behind it.
                for alias in child.names:
                    full = f"{child.module}.{alias.name}"
                    if full in MODULES:
                        yield full, deeper
                    else:
                        yield LAZY.get((child.module, alias.name), child.module), deeper
            yield from walk(child, deeper)

    yield from walk(tree, False)


def _is_main_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) in (
        "__name__ == '__main__'",
        '__name__ == "__main__"',
    )


def _ours(name: str) -> str | None:
    """The package module ``name`` refers to (the longest existing prefix)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name if name and name != "shopee_tpu" else None


def _edges(unit=lambda m: m):
    edges = defaultdict(set)
    for module, tree in TREES.items():
        for name, _ in _imports(tree):
            target = _ours(name)
            if target and unit(target) != unit(module):
                edges[unit(module)].add(unit(target))
    return edges


def _cycles(edges) -> list[list[str]]:
    """Strongly connected components with more than one node."""
    index, low, stack, on, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def _unit(module: str) -> str:
    """A top-level module, or the subpackage a module belongs to."""
    return ".".join(module.split(".")[:2])


def test_every_lazy_export_names_a_top_level_definition_of_its_module():
    def defined(module):
        names = set()
        for node in TREES[module].body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = (
                    node.targets if isinstance(node, ast.Assign) else [node.target]
                )
                names.update(getattr(t, "id", None) for t in targets)
            elif isinstance(node, ast.ImportFrom):
                names.update(a.asname or a.name for a in node.names)
        return names

    missing = [
        (package, name, module)
        for (package, name), module in LAZY.items()
        if module not in MODULES or name not in defined(module)
    ]
    assert LAZY and missing == []


def test_no_lazy_export_shares_its_name_with_a_submodule():
    # Importing package.x binds the package's attribute x to that module, so a
    # lazy export named x would then be the module, not the function.
    clashes = [
        (package, name) for package, name in LAZY if f"{package}.{name}" in MODULES
    ]
    assert LAZY and clashes == []


def test_no_import_cycle_between_modules():
    assert _cycles(_edges()) == []


def test_no_import_cycle_between_subpackages_and_top_level_modules():
    assert _cycles(_edges(_unit)) == []


def test_no_private_keras():
    private = [
        (module, name)
        for module, tree in TREES.items()
        for name, _ in _imports(tree)
        if name.startswith("keras.src")
    ]
    assert private == []
    # Nor private attributes of Keras objects (`_flatten_layers`, `_get_...`), but
    # for the one lookup Keras has no public form of, isolated in one function.
    names = ("_flatten_layers", "_get_variable_index", "_in_multi_worker_mode")
    names += ("_model_variables_moving_average", "_swap_variables", "_tracker")
    names += ("_distribution_strategy", "_layers", "_trainable_variables")
    used = [
        (module, node.attr)
        for module, tree in TREES.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in names
    ]
    assert used == [("shopee_tpu.models.optim", "_get_variable_index")]


def test_functions_and_modules_stay_short():
    long = [
        (module, node.name, node.end_lineno - node.lineno + 1)
        for module, tree in TREES.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > 80
    ]
    assert long == []
    sizes = {
        m: len(open(p, encoding="utf-8").read().splitlines())
        for m, p in MODULES.items()
    }
    assert {m: n for m, n in sizes.items() if n > 450} == {}


def _top_frameworks() -> dict[str, set[str]]:
    """The deferred frameworks each package module imports at module level,
    directly or through another package module."""
    out = {module: set() for module in MODULES}
    direct = defaultdict(set)
    for module, tree in TREES.items():
        for name, inside in _imports(tree):
            if inside:
                continue
            if name.split(".")[0] in DEFERRED:
                out[module].add(name.split(".")[0])
            elif (target := _ours(name)) and target != module:
                direct[module].add(target)
    changed = True
    while changed:
        changed = False
        for module, targets in direct.items():
            for target in targets:
                if not out[target] <= out[module]:
                    out[module] |= out[target]
                    changed = True
    return out


def _heavy() -> set[str]:
    """Package modules that import a deferred framework at module level, directly
    or through another package module."""
    return {module for module, found in _top_frameworks().items() if found}


def test_imports_inside_functions_defer_only_what_is_heavy_or_optional():
    heavy = _heavy()
    late = sorted(
        {
            (module, name)
            for module, tree in TREES.items()
            for name, inside in _imports(tree)
            if inside
            and name.split(".")[0] not in DEFERRED
            and _ours(name) not in heavy
        }
    )
    assert late == []


def test_imports_inside_functions_defer_what_the_module_does_not_import_already():
    # A late import whose frameworks its module imports at the top anyway defers
    # nothing, and belongs at the top.
    top = _top_frameworks()

    def brings(name: str) -> set[str]:
        if name.split(".")[0] in DEFERRED:
            return {name.split(".")[0]}
        return top.get(_ours(name), set())

    pointless = sorted(
        {
            (module, name)
            for module, tree in TREES.items()
            for name, inside in _imports(tree)
            if inside and brings(name) and brings(name) <= top[module]
        }
    )
    assert pointless == []


def test_no_test_skips_on_a_missing_package():
    # Every package a test needs is in the [test] extra, which `make test`
    # installs: a test that skipped when one is missing would hide it.
    skip = "importor" + "skip"
    folder = os.path.join(REPO, "tests")
    found = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                found += [f"{name}:{i}" for i, ln in enumerate(f, 1) if skip in ln]
    assert found == []
