// Thin pybind11 bindings of the CPU kernels (module lorainit_kernels._C).
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "lorainit C++ CPU kernels (no libtorch: raw pointers and strides)";
  m.def("version", []() { return 1; });
}
