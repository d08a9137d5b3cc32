"""The LOBPCG solver as it was before the robustness work (git commit ``3c4612c``), for same-run
before/after comparisons in ``bench_lobpcg``.

The file is read from git history (``git show``) and loaded as a module with one change: the import
of the ``_backends`` shim it used (dropped since) becomes the current ``lorainit_kernels._native``,
whose ``sym_matmul`` and ``rr_grams`` are the kernels it called. Returns None where git or the commit
is not available (e.g. an installed copy without history).
"""
from __future__ import annotations

import subprocess
import types
from pathlib import Path
from typing import Optional

PRE_ROBUSTNESS_COMMIT = "3c4612c"
_PATH = "lorainit_kernels/linalg/lobpcg.py"


def pre_robustness_lobpcg() -> Optional[types.ModuleType]:
    root = Path(__file__).resolve().parent.parent
    try:
        src = subprocess.run(["git", "show", f"{PRE_ROBUSTNESS_COMMIT}:{_PATH}"], cwd=root, check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    old_import = "from .._backends import has_native, native_module\n"
    if old_import not in src:
        return None
    src = src.replace(old_import, "from lorainit_kernels import _native as _legacy_native\n"
                                  "has_native = lambda: True  # noqa: E731\n"
                                  "native_module = lambda: _legacy_native  # noqa: E731\n")
    src = src.replace("    from .. import _native\n\n    return getattr(_native, name)",
                      "    return getattr(_legacy_native, name)")
    mod = types.ModuleType("lobpcg_pre_robustness")
    mod.__file__ = f"git:{PRE_ROBUSTNESS_COMMIT}:{_PATH}"
    exec(compile(src, mod.__file__, "exec"), mod.__dict__)
    return mod
