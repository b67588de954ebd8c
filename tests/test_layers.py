"""The package's one-way dependency rule (docs/design.md): each layer imports only layers below
it, and no module imports another inside a function except the CLI (so `langmerge -h` starts
without torch) and the optional extras."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "src" / "langmerge"
LAYERS = {  # top-level name → layer; anything not listed is a primitive (layer 0)
    **dict.fromkeys(["merge", "data", "train", "evaluate", "models", "executors"], 1),
    "project": 2,
    "workflows": 3,
    **dict.fromkeys(["reporting", "demo"], 4),
    "cli": 5,
}


def layer(module: str) -> int:
    return LAYERS.get(module.split(".")[1] if "." in module else "", 0)


def imports(path: Path) -> list[tuple[str, bool]]:
    """(langmerge module imported, whether inside a function) for one file."""
    found = []

    def visit(node: ast.AST, inside: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [child.module] if child.module != "langmerge" else [
                    f"langmerge.{a.name}" for a in child.names]  # fmt: skip
                found.extend((n, inside) for n in names if n.startswith("langmerge"))
            elif isinstance(child, ast.Import):
                found.extend(
                    (a.name, inside) for a in child.names if a.name.startswith("langmerge")
                )
            visit(child, inside or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    visit(ast.parse(path.read_text()), False)
    return found


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts): p
            for p in PACKAGE.rglob("*.py")}  # fmt: skip


def test_every_module_imports_only_layers_below_it():
    def upward(name: str, target: str) -> bool:
        # the engines (layer 1) may use one another; other packages of one layer may not
        same = layer(target) == layer(name) > 1 and target.split(".")[1] != name.split(".")[1]
        return layer(target) > layer(name) or same

    found = [
        f"{n} → {t}" for n, path in modules().items() for t, _ in imports(path) if upward(n, t)
    ]
    assert found == []


def test_only_the_cli_imports_langmerge_modules_inside_functions():
    hidden = [f"{name} → {target}" for name, path in modules().items()
              if not name.startswith("langmerge.cli") and name != "langmerge.reporting.figures"
              for target, inside in imports(path) if inside]  # fmt: skip
    assert hidden == []
