"""Names that ``lorainit_kernels.linalg.lobpcg`` and its tests import from here; see ``lorainit_kernels.backends``."""
from .backends import BACKENDS, _load_native, has_native, has_triton, native_module, triton_interpreting  # noqa: F401
