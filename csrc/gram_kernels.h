// Shared declarations of the fused weighted-outer-product ("Gram") kernels behind kfac_update and
// weighted_gram. No libtorch, no BLAS: raw pointers, element row strides and dtype codes.
//
// One problem is C = Vᵀ X over the K compacted tokens, where the rows of C are the features of
// V = [w ⊙ X (if Z is wanted) | G (if given)] and the columns are the features of X:
//   Z[i][j] = sum_k w_k x_k[i] x_k[j]   (n x n, upper triangle computed, then mirrored)
//   G[i][j] = sum_k g_k[i] x_k[j]       (m x n)
//   s[i]    = sum_k g_k[i]^2            (m), accumulated while the g panels are packed.
// Each block of tokens is packed once (gathered through the compacted row list, converted) and
// reused by every output tile.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

namespace lorainit {

using i64 = std::int64_t;

// dtype codes shared with lorainit_kernels/_native.py
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// ISA levels, lowest first. A level runs only when the CPU (and OS) support it.
enum Isa : int { kPortable = 0, kAVX2 = 1, kAVX512 = 2, kAVX512BF16 = 3, kAMX = 4 };
constexpr int kNumIsa = 5;

struct Operand {
  const char* base = nullptr;  // first element of row 0
  i64 row_stride = 0;          // in elements
  int dtype = kF32;
  i64 cols = 0;                // features
};

struct Problem {
  Operand x;                   // (T, n): the B operand and, for Z, the A operand
  Operand g;                   // (T, m) or base == nullptr
  const float* w = nullptr;    // per source row weight for Z (weighted_gram), or nullptr (= 1)
  const i64* rows = nullptr;   // compacted source rows, K of them
  i64 K = 0;
  float* Z = nullptr;          // n x n row-major, or nullptr when not wanted
  float* G = nullptr;          // m x n row-major, or nullptr when g is absent
  float* s = nullptr;          // m, or nullptr when g is absent
  bool accumulate = false;     // add to Z, G, s (Z symmetric) instead of overwriting them
};

inline float bf16_to_f32(std::uint16_t h) {
  std::uint32_t u = std::uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// IEEE binary16 -> binary32 without hardware support (subnormals, Inf and NaN kept).
inline float f16_to_f32_soft(std::uint16_t h) {
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  std::uint32_t exp = (h >> 10) & 0x1fu;
  std::uint32_t man = h & 0x3ffu;
  std::uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: normalize
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while ((man & 0x400u) == 0);
    u = sign | (std::uint32_t(112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Y = A W for a batch of symmetric A, reading the upper triangle only (symm_driver.inc).
struct SymmProblem {
  const float* A = nullptr;  // matrix b starts at A + b * a_mat_stride; rows lda floats apart
  i64 batch = 0, n = 0, lda = 0, a_mat_stride = 0;
  const float* W = nullptr;  // (batch, n, pw) contiguous, pw = 8 or a multiple of 16 (W padded with zeros)
  float* Y = nullptr;        // (batch, n, pw) contiguous, overwritten
  i64 pw = 0;
};

// LOBPCG's Rayleigh-Ritz Grams B = S^T S, H = S^T AS in fp64 from fp32 column parts (gram64_driver.inc).
struct Gram64Part {
  const float* ptr = nullptr;  // element (m, t, j) at ptr + m * mat_stride + t * row_stride + j
  i64 cols = 0, row_stride = 0, mat_stride = 0;
};
struct Gram64Problem {
  i64 batch = 0, n = 0, q = 0;  // q = total columns of the S parts = of the AS parts
  Gram64Part s[4], a[4];
  int ns = 0, na = 0;
  double* B = nullptr;  // (batch, q, q) contiguous, overwritten
  double* H = nullptr;  // (batch, q, q) contiguous, overwritten
};

// Per-ISA entry points (defined in kernels_portable.cpp / kernels_x86.cpp).
namespace portable {
void run_f32(const Problem& p, int nthreads); const char* name_f32();
void run_symm(const SymmProblem& p, int nthreads); const char* symm_name();
void run_gram64(const Gram64Problem& p, int nthreads); const char* gram64_name();
}
#if defined(__x86_64__) && defined(__GNUC__)
#define LORAINIT_X86 1
// peak_flops(iters): the flops of `iters` iterations of the level's peak-rate probe (peak_probe.inc).
namespace avx2 {
void run_f32(const Problem& p, int nthreads); const char* name_f32(); double peak_flops(i64 iters);
void run_symm(const SymmProblem& p, int nthreads); const char* symm_name();
void run_gram64(const Gram64Problem& p, int nthreads); const char* gram64_name();
}
namespace avx512 {
void run_f32(const Problem& p, int nthreads); const char* name_f32(); double peak_flops(i64 iters);
void run_symm(const SymmProblem& p, int nthreads); const char* symm_name();
void run_gram64(const Gram64Problem& p, int nthreads); const char* gram64_name();
}
namespace avx512bf16 {
void run_bf16p(const Problem& p, int nthreads); const char* name_bf16p(); double peak_flops(i64 iters);
}
#if !defined(__clang__) && __GNUC__ >= 11  // AMX intrinsics (and an assembler that knows them)
#define LORAINIT_AMX 1
namespace amx { void run_bf16(const Problem& p, int nthreads); const char* name_bf16(); double peak_flops(i64 iters); }
#endif
#endif

// Dispatch (kfac.cpp).
const char* isa_name(int isa);
int best_isa();                       // highest level this CPU runs
bool isa_supported(int isa);
// Whether the automatic choice runs bf16 inputs as bf16 pairs (vdpbf16ps) rather than fp32 FMA.
bool auto_bf16_pairs();
// The kernel run_problem will use for these operand dtypes at this level (-1 = best).
std::string kernel_name(int isa, int x_dtype, int g_dtype, bool weighted);
// Runs the problem; returns the kernel name used. isa = -1 picks the best level.
std::string run_problem(const Problem& p, int isa, int nthreads);
// Runs the symmetric block product at the best level <= isa (-1 = best); returns the kernel name.
std::string run_symm(const SymmProblem& p, int isa, int nthreads);
// GFLOP/s of the instruction the kernel level `isa` multiplies with (kAVX2 / kAVX512: fp32 FMA,
// kAVX512BF16: vdpbf16ps, kAMX: tdpbf16ps) on nthreads threads at once, the best of a few timed runs
// of its register-only probe; NaN for the portable level (no single instruction to probe).
double peak_gflops(int isa, int nthreads);
// Runs the fp64 Rayleigh-Ritz Gram kernel at the best level <= isa (-1 = best); returns its name.
std::string run_gram64(const Gram64Problem& p, int isa, int nthreads);

}  // namespace lorainit
