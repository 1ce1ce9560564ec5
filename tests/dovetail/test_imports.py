"""`import dovetail` and `dovetail-launch --help` stay light (no torch, no transformers, no
worker module), and the packages import each other in one direction only: every import in
every module, lazy ones included, follows the layers below. Within a layer the modules
import each other without a cycle either (no two modules that need each other to load).

    protocol                               wire messages; imports nothing else of Dovetail
    spec, system, models, draft            pure rules, the machine, model files, the draft model
    workers | runtime                      the worker processes | the coordinator (never each other)
    training, server, flags, cli, dovetail applications: may import any of the above
"""
import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import dovetail

pytestmark = pytest.mark.timeout(120)

HEAVY = "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') or m.startswith('dovetail.workers'))"


def loaded_after(code: str) -> str:
    """What a fresh interpreter has loaded of HEAVY after running ``code``."""
    out = subprocess.run([sys.executable, "-c", f"import sys\n{code}\nprint({HEAVY})"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_import_dovetail_loads_no_torch_and_no_worker():
    assert loaded_after("import dovetail") == "[]"


def test_launch_help_loads_no_torch():
    code = ("import contextlib, io\nfrom dovetail.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
            "assert '--target-cpus' in out.getvalue()")
    assert loaded_after(code) == "[]"


LAYERS = {  # layer -> the layers its modules may import
    "protocol": {"protocol"},
    "base": {"protocol", "base"},
    "workers": {"protocol", "base", "workers"},
    "runtime": {"protocol", "base", "runtime"},
    "app": {"protocol", "base", "workers", "runtime", "app"},
}
SUBPACKAGE_LAYER = {"protocol": "protocol", "spec": "base", "system": "base", "models": "base", "draft": "base",
                    "workers": "workers", "runtime": "runtime", "training": "app", "server": "app", "cli": "app",
                    "flags": "app"}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return "app" if len(parts) == 1 else SUBPACKAGE_LAYER[parts[1]]


def source_modules():
    """(dotted name, file) of every module installed under the dovetail namespace."""
    roots = {"dovetail": Path(dovetail.__file__).parent}
    for sub in ("workers", "protocol"):
        roots[f"dovetail.{sub}"] = Path(importlib.import_module(f"dovetail.{sub}").__file__).parent
    for package, root in roots.items():
        for path in sorted(root.rglob("*.py")):
            parts = [p for p in path.relative_to(root).with_suffix("").parts if p != "__init__"]
            yield ".".join([package, *parts]), path


def dovetail_imports(path: Path):
    """(line, module) of every absolute import of a dovetail module in ``path``, lazy ones included."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        yield from ((node.lineno, n) for n in names if n == "dovetail" or n.startswith("dovetail."))


def test_every_subpackage_has_a_layer():
    subpackages = {name.split(".")[1] for name, _ in source_modules() if name.count(".") >= 1}
    assert subpackages <= set(SUBPACKAGE_LAYER), subpackages - set(SUBPACKAGE_LAYER)


def test_imports_follow_the_layers():
    offenders = []
    for module, path in source_modules():
        for line, name in dovetail_imports(path):
            if layer_of(name) not in LAYERS[layer_of(module)]:
                offenders.append(f"{path.name}:{line} {module} ({layer_of(module)}) imports {name} ({layer_of(name)})")
    assert not offenders, "\n".join(offenders)


def test_the_layer_check_sees_lazy_imports(tmp_path):
    """The check must catch an import inside a function, the kind that hid the old cycle."""
    f = tmp_path / "m.py"
    f.write_text("def load():\n    from dovetail.workers.hf import CausalLM\n")
    assert [n for _, n in dovetail_imports(f)] == ["dovetail.workers.hf"]
    assert layer_of("dovetail.workers.hf") not in LAYERS[layer_of("dovetail.runtime.launch")]


# ---- no import cycle, module by module ----------------------------------------------------------
def module_imports(module: str, path: Path, modules: set[str]) -> set[str]:
    """The dovetail modules that ``module`` (its source at ``path``) imports: lazy imports
    inside functions and relative imports included; ``from package import name`` counts as
    the module package.name where there is one, else as the package. The packages above a
    module, which Python loads first, are not counted: they are where a module lives, not
    what it needs."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {name for name in found if name in modules and name != module}


def import_graph() -> dict[str, set[str]]:
    sources = dict(source_modules())
    return {module: module_imports(module, path, set(sources)) for module, path in sources.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as [a, b, ..., a], or None (depth-first, three colours)."""
    done, on_path = set(), []

    def visit(node):
        on_path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_path:
                return on_path[on_path.index(nxt):] + [nxt]
            if nxt not in done:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        on_path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_no_import_cycle_among_dovetail_modules():
    """dovetail.cli <-> dovetail.server.cli and models.fetch <-> hub <-> loading were such cycles,
    hidden in imports inside functions: the shared flags now live in dovetail.flags, the
    shared errors and cache folder in models/store.py."""
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_sees_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def load():\n    from dovetail.b import x\n")
    (pkg / "b.py").write_text("from . import a\n")
    modules = {"dovetail", "dovetail.a", "dovetail.b"}
    graph = {"dovetail.a": module_imports("dovetail.a", pkg / "a.py", modules),
             "dovetail.b": module_imports("dovetail.b", pkg / "b.py", modules)}
    assert graph == {"dovetail.a": {"dovetail.b"}, "dovetail.b": {"dovetail.a"}}
    assert find_cycle(graph) == ["dovetail.a", "dovetail.b", "dovetail.a"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None
