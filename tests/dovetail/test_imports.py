"""`import dovetail` and `dovetail-launch --help` stay light: no torch, no transformers and no
worker module is loaded until a worker or a model is needed, and no module of the dovetail
package imports dovetail.workers at its top (the workers import dovetail, not the reverse)."""
import ast
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


def test_no_top_level_import_of_the_workers_from_the_dovetail_package():
    package = Path(dovetail.__file__).parent
    offenders = []
    for path in sorted(package.glob("*.py")):
        for node in ast.parse(path.read_text()).body:  # module level only: lazy imports are the point
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("dovetail.workers")]
    assert not offenders, offenders
