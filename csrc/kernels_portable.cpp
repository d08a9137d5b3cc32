// The portable Gram kernel: plain C++ the compiler vectorizes for the build's baseline ISA. It runs
// on every CPU and is the reference path for the ISA-specific kernels in kernels_x86.cpp.
#include <algorithm>
#include <cstdlib>
#include <memory>
#include <new>
#include <vector>

#include "gram_kernels.h"

namespace lorainit {
namespace portable {
#define LORAINIT_LEVEL 0
#include "gram_driver.inc"
#include "symm_driver.inc"
#include "gram64_driver.inc"
#undef LORAINIT_LEVEL

void run_f32(const Problem& p, int nthreads) { run_driver<KernelF32>(p, nthreads); }
const char* name_f32() { return KernelF32::name; }
}  // namespace portable
}  // namespace lorainit
