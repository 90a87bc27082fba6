"""The checkout's `kernels/` folder (installed as dglm.kernels) must not stand in for the
`kernels` distribution that transformers imports when the checkout's root is on sys.path, as it
is under `python -m pytest` (the CI command)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_top_level_kernels_is_never_the_source_folder():
    code = (
        "import sys; sys.path.insert(0, '.')\n"
        "try:\n    import kernels\nexcept ImportError as e:\n    print('refused', e)\n"
        "else:\n    print('module', kernels.__file__)\n"
        "import dglm.kernels; print('dglm', dglm.kernels.__file__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    installed = importlib.util.find_spec("kernels") is not None and any(
        (Path(p) / "kernels").is_dir() and Path(p).resolve() != ROOT for p in sys.path if p
    )
    assert out[-1].startswith("dglm ") and out[-1].endswith(str(Path("kernels", "__init__.py")))
    if installed:
        kind, path = out[0].split(" ", 1)
        assert kind == "module" and Path(path).resolve().parent.parent != ROOT
    else:
        assert out[0].startswith("refused") and "dglm.kernels" in out[0]
