"""``tools/`` builds artefacts from the package; the package never imports ``tools``."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_runtime_package_never_imports_tools():
    offenders = []
    for path in (ROOT / "ithaca").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            offenders += [
                f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "tools"
            ]
    assert offenders == []
    assert not list((ROOT / "ithaca" / "models" / "shapes").glob("train*.py"))
    assert (ROOT / "tools" / "shapes" / "train.py").is_file()
