"""The LOBPCG solver of git commit ``3c4612c`` (before the robustness work), for same-run comparisons in
``bench_lobpcg``.

The file is read from git history (``git show``) and loaded as a module with :data:`PATCHES` applied:
its imports of the native kernels are pointed at ``lorainit_kernels._native``, whose ``sym_matmul`` and
``rr_grams`` are the kernels it called. A patch that does not match exactly once raises, so the row
cannot silently disappear or run other code; a checkout without that commit (an installed copy, a
shallow clone) gives None and one warning, and ``bench_lobpcg`` then has no such row.
"""
from __future__ import annotations

import subprocess
import types
import warnings
from pathlib import Path
from typing import Optional

PRE_ROBUSTNESS_COMMIT = "3c4612c"
_PATH = "lorainit_kernels/linalg/lobpcg.py"

#: (text in the old source, its replacement); each must occur exactly once.
PATCHES = (
    ("from .._backends import has_native, native_module\n",
     "from lorainit_kernels import _native as _legacy_native\n"
     "has_native = lambda: True  # noqa: E731\n"
     "native_module = lambda: _legacy_native  # noqa: E731\n"),
    ("    from .. import _native\n\n    return getattr(_native, name)",
     "    return getattr(_legacy_native, name)"),
)


def patch_source(src: str, where: str = f"git:{PRE_ROBUSTNESS_COMMIT}:{_PATH}") -> str:
    """``src`` with every one of :data:`PATCHES` applied (``RuntimeError`` naming a patch that does not
    match exactly once)."""
    for i, (old, new) in enumerate(PATCHES):
        found = src.count(old)
        if found != 1:
            raise RuntimeError(f"bench/legacy.py: patch {i} ({old.strip().splitlines()[0]!r}) matches {found} times "
                               f"in {where}, expected once; update PATCHES")
        src = src.replace(old, new)
    return src


def _old_source() -> Optional[str]:
    root = Path(__file__).resolve().parent.parent
    try:
        return subprocess.run(["git", "show", f"{PRE_ROBUSTNESS_COMMIT}:{_PATH}"], cwd=root, check=True,
                              capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        detail = err.stderr.strip() if isinstance(err, subprocess.CalledProcessError) else str(err)
        warnings.warn(f"bench/legacy.py: git cannot show {PRE_ROBUSTNESS_COMMIT}:{_PATH} ({detail}); the "
                      f"pre-robustness LOBPCG row is left out", RuntimeWarning, stacklevel=3)
        return None


def pre_robustness_lobpcg() -> Optional[types.ModuleType]:
    """The old solver as a module (its ``lobpcg``), or None (with a warning) without that commit."""
    src = _old_source()
    if src is None:
        return None
    mod = types.ModuleType("lobpcg_pre_robustness")
    mod.__file__ = f"git:{PRE_ROBUSTNESS_COMMIT}:{_PATH}"
    exec(compile(patch_source(src, mod.__file__), mod.__file__, "exec"), mod.__dict__)
    return mod
