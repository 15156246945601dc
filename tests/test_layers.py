"""The code's layers, read from its AST: imports run one way (leaves <- torch core <- io <- train <- sweep; report and
bench beside sweep), the torch-only core imports nothing of lora_lab but its leaves and itself, no import circle (also
through imports inside functions), and no private name imported or used across modules."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator

import pytest

PKG = Path(__file__).resolve().parent.parent / "lora_lab"

# Each top-level module or package of lora_lab, by layer: a module may import its own layer and the ones below.
LAYERS = {
    "leaf": 0,  # config, records, files, markdown, errors, shapes, memplan, processes
    "core": 1,  # torch only: targets, bases, lora, methods, optim, peft_io; adaptations (reads the typed config)
    "io": 2,  # models, data, tracking, notes, plots, quant
    "train": 3,
    "command": 4,  # sweep, report, bench, plan
}
UNITS = {
    "config": "leaf",
    "records": "leaf",
    "files": "leaf",
    "markdown": "leaf",
    "shapes": "leaf",
    "memplan": "leaf",
    "errors": "leaf",
    "processes": "leaf",
    "targets": "core",
    "bases": "core",
    "lora": "core",
    "methods": "core",
    "optim": "core",
    "peft_io": "core",
    "adaptations": "core",
    "models": "io",
    "data": "io",
    "tracking": "io",
    "notes": "io",
    "plots": "io",
    "quant": "io",  # the one module that imports bitsandbytes: the quantized base layers
    "train": "train",
    "sweep": "command",
    "report": "command",
    "bench": "command",
    "plan": "command",
}
# The LoRA core proper knows nothing of configs: torch, plain values, the file helpers.
TORCH_ONLY = {"targets", "bases", "lora", "methods", "optim", "peft_io"}
TORCH_ONLY_MAY_IMPORT = TORCH_ONLY | {"files"}
# The commands beside each other: none imports another (bench may time train's pieces; nobody imports sweep).
COMMANDS_NEVER = {
    "train": {"sweep", "report", "bench", "plan"},
    "report": {"sweep", "bench", "plan"},
    "bench": {"sweep", "report", "plan"},
    "plan": {"sweep", "report", "bench"},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(name: str, known: dict[str, Path]) -> str:
    """`lora_lab.train.loop.X` -> the longest known module prefix."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in known:
            return candidate
    return name


def imports(mod: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, str, int]]:
    """(imported module, imported name or '', line) for every lora_lab import of `mod`, function-level ones too."""
    tree = ast.parse(path.read_text())
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("lora_lab"):
                    yield _resolve(a.name, known), "", node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not source.startswith("lora_lab"):
                continue
            for a in node.names:
                full = f"{source}.{a.name}"
                if full in known:  # `from lora_lab import lora`, `from lora_lab.train import loop`
                    yield full, "", node.lineno
                else:
                    yield _resolve(source, known), a.name, node.lineno


def unit(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: {dst for dst, _, _ in imports(m, p, known) if dst != m} for m, p in known.items()}


def test_every_module_has_a_layer_and_a_docstring() -> None:
    for mod, path in modules().items():
        if mod == "lora_lab":
            continue
        assert unit(mod) in UNITS, f"{mod}: not in tests/test_layers.py's UNITS: give it a layer"
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and doc.strip(), f"{path}: no module docstring saying what it owns"


def test_imports_run_one_way() -> None:
    known = modules()
    bad = []
    for mod, path in known.items():
        src = unit(mod)
        if not src:
            continue
        for dst, _, line in imports(mod, path, known):
            d = unit(dst)
            if not d or d == src:
                continue
            where = f"{path.relative_to(PKG.parent)}:{line} imports {dst}"
            if LAYERS[UNITS[d]] > LAYERS[UNITS[src]]:
                bad.append(f"{where}: {UNITS[src]} layer may not import the {UNITS[d]} layer")
            if src in TORCH_ONLY and d not in TORCH_ONLY_MAY_IMPORT:
                bad.append(f"{where}: the torch-only core imports only itself and files")
            if d in COMMANDS_NEVER.get(src, set()):
                bad.append(f"{where}: {src} never imports {d}")
    assert not bad, "\n".join(bad)


def test_only_quant_imports_bitsandbytes() -> None:
    """bitsandbytes lives in lora_lab/quant.py alone: the LoRA core reaches a quantized base through bases.KINDS."""
    bad = []
    for mod, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if mod != "lora_lab.quant" and any(n.split(".")[0] == "bitsandbytes" for n in names):
                bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno}: imports bitsandbytes")
    assert not bad, "\n".join(bad)
    assert "import bitsandbytes" in (PKG / "quant.py").read_text()


def test_no_import_circle() -> None:
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                cycle = stack[stack.index(n) :] + [n]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_no_private_name_crosses_a_module() -> None:
    known = modules()
    bad = []
    for mod, path in known.items():
        tree = ast.parse(path.read_text())
        aliases: dict[str, str] = {}  # local name -> lora_lab module
        for dst, name, line in imports(mod, path, known):
            if dst == mod:
                continue
            if name.startswith("_"):
                bad.append(f"{path.relative_to(PKG.parent)}:{line}: imports private {dst}.{name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lora_lab"):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    if full in known:
                        aliases[a.asname or a.name] = full
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("lora_lab") and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and aliases[node.value.id] != mod
                and node.attr.startswith("_")
            ):
                bad.append(
                    f"{path.relative_to(PKG.parent)}:{node.lineno}: uses private {aliases[node.value.id]}.{node.attr}"
                )
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_circle_and_a_private_import(tmp_path: Path) -> None:
    """The rules above can fail: the same reading applied to a made-up pair of modules."""
    pkg = tmp_path / "lora_lab"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""x"""\n')
    (pkg / "a.py").write_text('"""a"""\nfrom lora_lab.b import _hidden\n')
    (pkg / "b.py").write_text('"""b"""\ndef f():\n    from lora_lab import a\n')
    known = {module_name_in(p, tmp_path): p for p in pkg.rglob("*.py")}
    found = {(m, d, n) for m, p in known.items() for d, n, _ in imports(m, p, known)}
    assert ("lora_lab.a", "lora_lab.b", "_hidden") in found
    assert ("lora_lab.b", "lora_lab.a", "") in found  # a function-level import counts


def module_name_in(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
