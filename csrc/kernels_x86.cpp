// x86 Gram kernels, one copy of gram_driver.inc per ISA level, each compiled under its own
// `#pragma GCC target` so that the rest of the module stays baseline x86-64. kfac.cpp calls a level
// only after __builtin_cpu_supports confirms it (runtime dispatch; no -march flags needed).
#include <algorithm>
#include <cstdlib>
#include <memory>
#include <new>
#include <vector>

#include <immintrin.h>

#include "gram_kernels.h"

#if defined(LORAINIT_X86)

namespace lorainit {

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#define LORAINIT_LEVEL 1
#include "gram_driver.inc"
#include "symm_driver.inc"
#include "gram64_driver.inc"
#include "peak_probe.inc"
#undef LORAINIT_LEVEL
void run_f32(const Problem& p, int nthreads) { run_driver<KernelF32>(p, nthreads); }
const char* name_f32() { return KernelF32::name; }
double peak_flops(i64 iters) { return peak_probe(iters); }
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace avx512 {
#define LORAINIT_LEVEL 2
#include "gram_driver.inc"
#include "symm_driver.inc"
#include "gram64_driver.inc"
#include "peak_probe.inc"
#undef LORAINIT_LEVEL
void run_f32(const Problem& p, int nthreads) { run_driver<KernelF32>(p, nthreads); }
const char* name_f32() { return KernelF32::name; }
double peak_flops(i64 iters) { return peak_probe(iters); }
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512bf16,avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace avx512bf16 {
#define LORAINIT_LEVEL 3
#include "gram_driver.inc"
#include "peak_probe.inc"
#undef LORAINIT_LEVEL
void run_bf16p(const Problem& p, int nthreads) { run_driver<KernelBF16P>(p, nthreads); }
const char* name_bf16p() { return KernelBF16P::name; }
double peak_flops(i64 iters) { return peak_probe(iters); }
}  // namespace avx512bf16
#pragma GCC pop_options

#if defined(LORAINIT_AMX)
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512bf16,avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace amx {
#define LORAINIT_LEVEL 4
#include "gram_driver.inc"
#include "peak_probe.inc"
#undef LORAINIT_LEVEL
void run_bf16(const Problem& p, int nthreads) { run_driver<KernelAMX>(p, nthreads); }
const char* name_bf16() { return KernelAMX::name; }
double peak_flops(i64 iters) { return peak_probe(iters); }
}  // namespace amx
#pragma GCC pop_options
#endif  // LORAINIT_AMX

}  // namespace lorainit

#endif  // LORAINIT_X86
