// Runtime ISA dispatch of the fused Gram kernel (kfac_update, weighted_gram).
//
// Levels: portable (any CPU) < avx2 (AVX2+FMA+F16C) < avx512 (AVX-512F/BW/VL/DQ, fp32 FMA)
// < avx512bf16 (adds vdpbf16ps for bf16 inputs) < amx (AMX-BF16 tiles for bf16 inputs). The best
// level the CPU supports runs unless the caller asks for a lower one (lorainit_kernels/_native.py maps
// LORAINIT_NATIVE_ISA to it). Also here: the LOBPCG kernels' dispatch and peak_gflops, the timing of
// each level's peak-rate probe (peak_probe.inc).
#include <algorithm>
#include <chrono>
#include <limits>
#include <string>

#include "gram_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace lorainit {

const char* isa_name(int isa) {
  switch (isa) {
    case kPortable: return "portable";
    case kAVX2: return "avx2";
    case kAVX512: return "avx512";
    case kAVX512BF16: return "avx512bf16";
    case kAMX: return "amx";
    default: return "unknown";
  }
}

#if defined(LORAINIT_AMX)
// AMX-TILE + AMX-BF16 in CPUID, the tile state enabled by the OS (XCR0 bits 17, 18) and this
// process allowed to use it (Linux: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), asked once).
static bool amx_usable() {
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 22) & 1u) || !((d >> 24) & 1u)) return false;  // AMX-BF16, AMX-TILE
    if (!((c >> 27) & 1u)) return false;                         // OSXSAVE (CPUID.1:ECX.27 read below)
    return true;
  }() && [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1u)) return false;
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if (((lo >> 17) & 3u) != 3u) return false;
#if defined(__linux__)
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return ok;
}
#endif

bool isa_supported(int isa) {
  if (isa == kPortable) return true;
#if defined(LORAINIT_X86)
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the vector state (XCR0).
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  switch (isa) {
    case kAVX2: return avx2;
    case kAVX512: return avx512;
    case kAVX512BF16: return avx512 && __builtin_cpu_supports("avx512bf16");
#if defined(LORAINIT_AMX)
    case kAMX: return avx512 && __builtin_cpu_supports("avx512bf16") && amx_usable();
#endif
    default: return false;
  }
#else
  return false;
#endif
}

int best_isa() {
  static const int best = [] {
    for (int isa = kNumIsa - 1; isa > kPortable; --isa)
      if (isa_supported(isa)) return isa;
    return int(kPortable);
  }();
  return best;
}

bool auto_bf16_pairs() {
#if defined(LORAINIT_X86)
  // vdpbf16ps doubles the product rate of fp32 FMA where it issues as fast as an FMA (AMD EPYC:
  // the dpbf16 kernel 2.1x the fp32 one, 2026-11-23); Intel cores issue it on one port only, so
  // there it multiplies no faster than fp32 FMA and the dpbf16 kernel measured slower (Sapphire
  // Rapids, one thread, T=8192, n=m=1024: 229 vs 136 ms CPU). Unknown vendors keep fp32 FMA. (Where
  // AMX is usable, its level runs bf16 inputs before this choice arises.)
  static const bool amd = [] {
    __builtin_cpu_init();
    return bool(__builtin_cpu_is("amd"));
  }();
  return amd && isa_supported(kAVX512BF16);
#else
  return false;
#endif
}

namespace {
enum Path { kPathPortable, kPathAVX2, kPathAVX512, kPathBF16P, kPathAMX };

Path choose(int isa, int x_dtype, int g_dtype, bool weighted) {
  const int level = isa < 0 ? best_isa() : isa;
  // bf16 pairs need every operand in bf16; weights would have to be rounded to bf16 with the
  // products, so weighted problems take the fp32 path. The automatic choice (isa < 0) takes them
  // only where they are the faster kernel (auto_bf16_pairs); naming the level forces them.
  const bool all_bf16 = x_dtype == kBF16 && (g_dtype < 0 || g_dtype == kBF16) && !weighted;
  if (level >= kAMX && all_bf16) return kPathAMX;
  if (level >= kAVX512BF16 && all_bf16 && (isa >= 0 || auto_bf16_pairs())) return kPathBF16P;
  if (level >= kAVX512) return kPathAVX512;
  if (level >= kAVX2) return kPathAVX2;
  return kPathPortable;
}
}  // namespace

std::string kernel_name(int isa, int x_dtype, int g_dtype, bool weighted) {
  switch (choose(isa, x_dtype, g_dtype, weighted)) {
#if defined(LORAINIT_X86)
#if defined(LORAINIT_AMX)
    case kPathAMX: return amx::name_bf16();
#endif
    case kPathBF16P: return avx512bf16::name_bf16p();
    case kPathAVX512: return avx512::name_f32();
    case kPathAVX2: return avx2::name_f32();
#endif
    default: return portable::name_f32();
  }
}

std::string run_problem(const Problem& p, int isa, int nthreads) {
  const int g_dtype = p.G ? p.g.dtype : -1;
  switch (choose(isa, p.x.dtype, g_dtype, p.w != nullptr)) {
#if defined(LORAINIT_X86)
#if defined(LORAINIT_AMX)
    case kPathAMX:
      // a level is chosen only where isa_supported said yes, which also obtained the tile permission;
      // asking again (cached) keeps a direct caller of run_problem from a SIGILL
      if (!isa_supported(kAMX)) {
        avx512::run_f32(p, nthreads);
        return avx512::name_f32();
      }
      amx::run_bf16(p, nthreads);
      return amx::name_bf16();
#endif
    case kPathBF16P: avx512bf16::run_bf16p(p, nthreads); return avx512bf16::name_bf16p();
    case kPathAVX512: avx512::run_f32(p, nthreads); return avx512::name_f32();
    case kPathAVX2: avx2::run_f32(p, nthreads); return avx2::name_f32();
#endif
    default: portable::run_f32(p, nthreads); return portable::name_f32();
  }
}

double peak_gflops(int isa, int nthreads) {
  double (*probe)(i64) = nullptr;
  i64 iters = 0;  // ~5-10 GFLOP per thread: tens of ms at these rates, so that thread start-up does not count
#if defined(LORAINIT_X86)
  switch (isa) {
    case kAVX2: probe = avx2::peak_flops; iters = i64(1) << 25; break;
    case kAVX512: probe = avx512::peak_flops; iters = i64(1) << 23; break;
    case kAVX512BF16: probe = avx512bf16::peak_flops; iters = i64(1) << 22; break;
#if defined(LORAINIT_AMX)
    case kAMX: probe = amx::peak_flops; iters = i64(1) << 20; break;
#endif
    default: break;
  }
#endif
  if (probe == nullptr || !isa_supported(isa)) return std::numeric_limits<double>::quiet_NaN();
  const int nt = std::max(1, nthreads);
  double best = 0.0;
  for (int rep = 0; rep < 4; ++rep) {  // the first run wakes the threads and the clock: not counted
    double flops = 0.0;
    const auto t0 = std::chrono::steady_clock::now();
#if defined(LORAINIT_HAVE_OPENMP)
#pragma omp parallel num_threads(nt) reduction(+ : flops)
#endif
    flops += probe(iters);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (rep > 0) best = std::max(best, flops / secs / 1e9);
  }
  return best;
}

// The LOBPCG kernels (fp32/fp64 only: the bf16 level runs the AVX-512 ones).
namespace {
struct LinalgKernels {
  void (*symm)(const SymmProblem&, int);
  const char* (*symm_name)();
  void (*gram64)(const Gram64Problem&, int);
  const char* (*gram64_name)();
};

const LinalgKernels& linalg_kernels(int isa) {
  static const LinalgKernels portable_k{portable::run_symm, portable::symm_name, portable::run_gram64,
                                        portable::gram64_name};
#if defined(LORAINIT_X86)
  static const LinalgKernels avx2_k{avx2::run_symm, avx2::symm_name, avx2::run_gram64, avx2::gram64_name};
  static const LinalgKernels avx512_k{avx512::run_symm, avx512::symm_name, avx512::run_gram64, avx512::gram64_name};
  const int level = isa < 0 ? best_isa() : isa;
  if (level >= kAVX512) return avx512_k;
  if (level >= kAVX2) return avx2_k;
#else
  (void)isa;
#endif
  return portable_k;
}
}  // namespace

std::string run_symm(const SymmProblem& p, int isa, int nthreads) {
  const LinalgKernels& k = linalg_kernels(isa);
  k.symm(p, nthreads);
  return k.symm_name();
}

std::string run_gram64(const Gram64Problem& p, int isa, int nthreads) {
  const LinalgKernels& k = linalg_kernels(isa);
  k.gram64(p, nthreads);
  return k.gram64_name();
}

}  // namespace lorainit
