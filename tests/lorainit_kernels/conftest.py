"""Every kernel and solver test takes the ``device`` fixture (CPU, and CUDA when present) and ``atol``/``rtol``
per ``dtype``: one definition, in tests/support/devices.py."""
from devices import DEVICES, TOLERANCES, atol, pytest_generate_tests, rtol  # noqa: F401
