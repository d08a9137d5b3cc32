"""The house rules of docs/layout.md, checked on the sources: no import cycle, imports flow one way."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"lorainit": ROOT / "python" / "lorainit", "lorainit_kernels": ROOT / "lorainit_kernels"}


def _modules(package: str):
    """{dotted module name: path} of every .py file of ``package``."""
    base = PACKAGES[package]
    out = {}
    for path in sorted(base.rglob("*.py")):
        parts = list(path.relative_to(base.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known=()):
    """Every module ``name`` imports, at any depth (inside functions too), relative imports resolved.

    ``from pkg import x`` counts as an import of ``pkg.x`` when that is a module in ``known`` (the
    package ``pkg`` itself is then only its parent, as for every submodule import), else of ``pkg``.
    """
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            for alias in node.names:
                found.add(f"{mod}.{alias.name}" if f"{mod}.{alias.name}" in known else mod)
    return found


def _graph(package: str):
    mods = _modules(package)
    graph = {}
    raw = {name: _imports(name, path, mods) for name, path in mods.items()}
    for name in mods:
        graph[name] = {m for m in raw[name] if m in mods and m != name}
    return graph, raw


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _top(modules):
    return {m.split(".")[0] for m in modules}


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_cycle_counting_function_level_imports(package):
    graph, _ = _graph(package)
    assert len(graph) > 5
    assert _cycle(graph) is None, f"import cycle in {package}: {' -> '.join(_cycle(graph))}"


def test_core_imports_no_trainer_layer_peft_transformers_or_bench():
    _, raw = _graph("lorainit_kernels")
    for name, imported in raw.items():
        bad = _top(imported) & {"lorainit", "peft", "transformers", "bench"}
        assert not bad, f"{name} imports {sorted(bad)}"


def test_trainer_layer_imports_no_bench():
    _, raw = _graph("lorainit")
    for name, imported in raw.items():
        assert "bench" not in _top(imported), f"{name} imports bench"


def test_method_modules_do_not_import_the_registry_and_common_imports_no_method():
    graph, _ = _graph("lorainit")
    families = [m for m in graph if m.startswith("lorainit.methods.") and m != "lorainit.methods.common"]
    assert {"lorainit.methods.lora_da", "lorainit.methods.hrp", "lorainit.methods.baselines"} <= set(families)
    for m in families:
        assert "lorainit.registry" not in graph[m], m
    assert not set(families) & graph["lorainit.methods.common"]


def test_every_builtin_method_resolves_and_the_methods_package_lists_them():
    import importlib

    import lorainit
    from lorainit.registry import BUILTIN, get_method

    for name, where in BUILTIN.items():
        spec = get_method(name)
        assert spec.name == name and where.startswith(spec.fn.__module__)
    assert set(BUILTIN) <= {m["name"] for m in lorainit.methods()}
    assert importlib.import_module("lorainit.methods.lora_da") is lorainit.methods.lora_da


def test_old_public_names_are_reexported():
    from lorainit import (BaselineConfig, HRPConfig, InitConfig, InitContext, InitReport, LoRADAConfig,  # noqa: F401
                          LoRAFactors, LoRAGAConfig, LoRAInitError, LoRAOneConfig, MiLoRAConfig, PiSSAConfig,
                          initialize_lora, methods, register_method)

    assert issubclass(LoRADAConfig, InitConfig) and issubclass(HRPConfig, InitConfig)
