"""Build script: the pure-Python packages plus the optional native extension ``lorainit_kernels._C``.

The extension is built by CMake (see CMakeLists.txt) and links neither libtorch nor a BLAS, so one
build serves every torch version. Set ``LORAINIT_SKIP_NATIVE=1`` to skip it; the package then runs
on its plain-torch path and says so once at import. A missing compiler or CMake also skips it, with
a warning, instead of failing the install.
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path):
        super().__init__(name, sources=[])
        self.source_dir = str(source_dir)


class CMakeBuild(build_ext):
    def run(self):
        if os.environ.get("LORAINIT_SKIP_NATIVE", "0") not in ("", "0"):
            print("LORAINIT_SKIP_NATIVE is set: skipping lorainit_kernels._C (torch path only)")
            return
        super().run()

    def build_extension(self, ext: CMakeExtension):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
        ]
        jobs = str(os.cpu_count() or 2)
        try:
            subprocess.run(["cmake", ext.source_dir, *cmake_args], cwd=build_temp, check=True)
            subprocess.run(["cmake", "--build", ".", "--config", cfg, "-j", jobs], cwd=build_temp, check=True)
        except (OSError, subprocess.CalledProcessError) as err:
            if os.environ.get("LORAINIT_REQUIRE_NATIVE", "0") not in ("", "0"):
                raise
            print(f"WARNING: building lorainit_kernels._C failed ({err}); the torch path will be used",
                  file=sys.stderr)


setup(
    packages=find_packages(where=".", include=["lorainit_kernels", "lorainit_kernels.*"])
    + [f"lorainit.{p}" if p else "lorainit" for p in [""] + find_packages(where="python/lorainit")],
    ext_modules=[CMakeExtension("lorainit_kernels._C", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
)
