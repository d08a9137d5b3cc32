"""The device fixture of tests/kernels/conftest.py (``device``; ``atol``/``rtol`` per ``dtype``), one definition."""
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_kernel_test_devices", Path(__file__).parents[1] / "kernels" / "conftest.py")
_devices = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_devices)

DEVICES, TOLERANCES = _devices.DEVICES, _devices.TOLERANCES
pytest_generate_tests, atol, rtol = _devices.pytest_generate_tests, _devices.atol, _devices.rtol
