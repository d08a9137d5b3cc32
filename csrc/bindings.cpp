// Thin pybind11 bindings of the CPU kernels (module lorainit_kernels._C).
//
// The Python side (lorainit_kernels/_native.py) allocates every tensor and passes raw addresses,
// sizes, row strides (in elements) and dtype codes; nothing here links libtorch. Arguments are
// checked before the GIL is released, so a bad call raises ValueError instead of crashing.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <tuple>
#include <utility>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "gram_kernels.h"

#if defined(LORAINIT_HAVE_OPENMP)
#include <omp.h>
#endif

namespace py = pybind11;
using lorainit::i64;

namespace {

template <class... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

#define LORAINIT_CHECK(cond, ...)                                          \
  do {                                                                     \
    if (!(cond)) throw std::invalid_argument(cat(__VA_ARGS__));            \
  } while (0)

int elem_size(int dtype) { return dtype == lorainit::kF32 ? 4 : 2; }

const char* dtype_name(int dtype) {
  switch (dtype) {
    case lorainit::kF32: return "float32";
    case lorainit::kBF16: return "bfloat16";
    case lorainit::kF16: return "float16";
    default: return "?";
  }
}

void check_dtype(const char* op, const char* name, int dtype) {
  LORAINIT_CHECK(dtype == lorainit::kF32 || dtype == lorainit::kBF16 || dtype == lorainit::kF16, op, ": ", name,
                 "_dtype must be 0 (float32), 1 (bfloat16) or 2 (float16), got ", dtype);
}

// A (rows, cols) input with element row stride: non-null and element-aligned when non-empty.
void check_matrix(const char* op, const char* name, std::uintptr_t ptr, i64 rows, i64 cols, i64 row_stride, int dtype) {
  LORAINIT_CHECK(rows >= 0 && cols >= 0, op, ": ", name, " has negative shape (", rows, ", ", cols, ")");
  LORAINIT_CHECK(row_stride >= 0, op, ": ", name, " row stride must be >= 0, got ", row_stride);
  if (rows > 0 && cols > 0) {
    LORAINIT_CHECK(ptr != 0, op, ": ", name, " of shape (", rows, ", ", cols, ") has a null data pointer");
    LORAINIT_CHECK(ptr % std::uintptr_t(elem_size(dtype)) == 0, op, ": ", name, " data pointer ", ptr,
                   " is not aligned to its ", dtype_name(dtype), " elements");
  }
}

void check_output(const char* op, const char* name, std::uintptr_t ptr, i64 numel) {
  if (numel > 0) {
    LORAINIT_CHECK(ptr != 0, op, ": output ", name, " (", numel, " floats) has a null data pointer");
    LORAINIT_CHECK(ptr % 4 == 0, op, ": output ", name, " data pointer is not 4-byte aligned");
  }
}

int check_isa(const char* op, int isa) {
  LORAINIT_CHECK(isa >= -1 && isa < lorainit::kNumIsa, op, ": isa must be -1 (best) or 0..",
                 lorainit::kNumIsa - 1, ", got ", isa);
  LORAINIT_CHECK(isa < 0 || lorainit::isa_supported(isa), op, ": isa ", lorainit::isa_name(isa),
                 " is not supported by this CPU (best: ", lorainit::isa_name(lorainit::best_isa()), ")");
  return isa;
}

int max_threads() {
#if defined(LORAINIT_HAVE_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

int resolve_threads(const char* op, int num_threads) {
  LORAINIT_CHECK(num_threads >= 0, op, ": num_threads must be >= 0 (0 = OpenMP default), got ", num_threads);
  return num_threads == 0 ? max_threads() : num_threads;
}

std::vector<i64> compact_rows(const std::uint8_t* mask, i64 T) {
  std::vector<i64> rows;
  rows.reserve(size_t(T));
  for (i64 t = 0; t < T; ++t)
    if (mask == nullptr || mask[t]) rows.push_back(t);
  return rows;
}

std::string kfac_update(std::uintptr_t x_ptr, i64 x_row_stride, int x_dtype, i64 T, i64 n, std::uintptr_t g_ptr,
                        i64 g_row_stride, int g_dtype, i64 m, std::uintptr_t mask_ptr, bool with_input_cov,
                        std::uintptr_t z_ptr, std::uintptr_t gs_ptr, std::uintptr_t ss_ptr, int isa,
                        int num_threads, bool accumulate) {
  const char* op = "_C.kfac_update";
  check_dtype(op, "x", x_dtype);
  check_matrix(op, "x", x_ptr, T, n, x_row_stride, x_dtype);
  const bool has_g = g_dtype >= 0;
  if (has_g) {
    check_dtype(op, "g", g_dtype);
    check_matrix(op, "g", g_ptr, T, m, g_row_stride, g_dtype);
    check_output(op, "Gs", gs_ptr, m * n);
    check_output(op, "ss", ss_ptr, m);
  } else {
    LORAINIT_CHECK(m == 0 && g_ptr == 0, op, ": g_dtype=-1 means no g, but m=", m, " and g_ptr=", g_ptr);
  }
  if (with_input_cov) check_output(op, "Zs", z_ptr, n * n);
  isa = check_isa(op, isa);
  const int nt = resolve_threads(op, num_threads);

  lorainit::Problem p;
  p.x = {reinterpret_cast<const char*>(x_ptr), x_row_stride, x_dtype, n};
  if (has_g) p.g = {reinterpret_cast<const char*>(g_ptr), g_row_stride, g_dtype, m};
  p.Z = with_input_cov ? reinterpret_cast<float*>(z_ptr) : nullptr;
  p.G = has_g ? reinterpret_cast<float*>(gs_ptr) : nullptr;
  p.s = has_g ? reinterpret_cast<float*>(ss_ptr) : nullptr;
  p.accumulate = accumulate;
  if (!p.Z && !p.G) return "none";
  py::gil_scoped_release release;
  const std::vector<i64> rows = compact_rows(reinterpret_cast<const std::uint8_t*>(mask_ptr), T);
  p.rows = rows.data();
  p.K = i64(rows.size());
  return lorainit::run_problem(p, isa, nt);
}

std::string weighted_gram(std::uintptr_t v_ptr, i64 v_row_stride, int v_dtype, i64 T, i64 d, std::uintptr_t w_ptr,
                          std::uintptr_t out_ptr, int isa, int num_threads, bool accumulate) {
  const char* op = "_C.weighted_gram";
  check_dtype(op, "v", v_dtype);
  check_matrix(op, "v", v_ptr, T, d, v_row_stride, v_dtype);
  if (w_ptr != 0) LORAINIT_CHECK(w_ptr % 4 == 0, op, ": weights data pointer is not 4-byte aligned");
  check_output(op, "out", out_ptr, d * d);
  isa = check_isa(op, isa);
  const int nt = resolve_threads(op, num_threads);

  lorainit::Problem p;
  p.x = {reinterpret_cast<const char*>(v_ptr), v_row_stride, v_dtype, d};
  p.w = reinterpret_cast<const float*>(w_ptr);
  p.Z = reinterpret_cast<float*>(out_ptr);
  p.accumulate = accumulate;
  py::gil_scoped_release release;
  std::vector<i64> rows = compact_rows(nullptr, T);
  p.rows = rows.data();
  p.K = T;
  return lorainit::run_problem(p, isa, nt);
}

std::string sym_matmul(std::uintptr_t a_ptr, i64 batch, i64 n, i64 lda, i64 a_mat_stride, std::uintptr_t w_ptr,
                       i64 pw, std::uintptr_t y_ptr, int isa, int num_threads) {
  const char* op = "_C.sym_matmul";
  LORAINIT_CHECK(batch >= 0 && n >= 0 && pw >= 0, op, ": negative size (batch=", batch, ", n=", n, ", pw=", pw, ")");
  LORAINIT_CHECK(pw == 8 || pw % 16 == 0, op, ": pw must be 8 or a multiple of 16 (pad W), got ", pw);
  LORAINIT_CHECK(lda >= n, op, ": lda=", lda, " < n=", n);
  LORAINIT_CHECK(batch <= 1 || a_mat_stride >= 0, op, ": a_mat_stride must be >= 0, got ", a_mat_stride);
  if (batch > 0 && n > 0) check_matrix(op, "A", a_ptr, n, n, lda, lorainit::kF32);
  if (batch > 0 && n > 0 && pw > 0) {
    check_matrix(op, "W", w_ptr, batch * n, pw, pw, lorainit::kF32);
    check_output(op, "Y", y_ptr, batch * n * pw);
  }
  isa = check_isa(op, isa);
  const int nt = resolve_threads(op, num_threads);
  lorainit::SymmProblem p;
  p.A = reinterpret_cast<const float*>(a_ptr);
  p.batch = batch;
  p.n = n;
  p.lda = lda;
  p.a_mat_stride = a_mat_stride;
  p.W = reinterpret_cast<const float*>(w_ptr);
  p.Y = reinterpret_cast<float*>(y_ptr);
  p.pw = pw;
  py::gil_scoped_release release;
  return lorainit::run_symm(p, isa, nt);
}

using PartTuple = std::tuple<std::uintptr_t, i64, i64, i64>;  // (ptr, cols, row_stride, mat_stride)

std::string rr_grams(const std::vector<PartTuple>& s_parts, const std::vector<PartTuple>& a_parts, i64 batch, i64 n,
                     i64 q, std::uintptr_t b_ptr, std::uintptr_t h_ptr, int isa, int num_threads) {
  const char* op = "_C.rr_grams";
  LORAINIT_CHECK(batch >= 0 && n >= 0 && q >= 0, op, ": negative size (batch=", batch, ", n=", n, ", q=", q, ")");
  LORAINIT_CHECK(!s_parts.empty() && s_parts.size() <= 4 && !a_parts.empty() && a_parts.size() <= 4, op,
                 ": 1 to 4 column parts each for S and AS, got ", s_parts.size(), " and ", a_parts.size());
  lorainit::Gram64Problem p;
  p.batch = batch;
  p.n = n;
  p.q = q;
  auto fill = [&](const std::vector<PartTuple>& parts, lorainit::Gram64Part* out, const char* name) {
    i64 total = 0;
    for (size_t k = 0; k < parts.size(); ++k) {
      const auto& [ptr, cols, row_stride, mat_stride] = parts[k];
      LORAINIT_CHECK(cols >= 0 && row_stride >= cols && mat_stride >= 0, op, ": ", name, " part ", k, " has cols=", cols,
                     ", row_stride=", row_stride, ", mat_stride=", mat_stride);
      if (batch > 0 && n > 0 && cols > 0) check_matrix(op, name, ptr, n, cols, row_stride, lorainit::kF32);
      out[k] = {reinterpret_cast<const float*>(ptr), cols, row_stride, mat_stride};
      total += cols;
    }
    LORAINIT_CHECK(total == q, op, ": the ", name, " parts have ", total, " columns in all, q=", q);
    return int(parts.size());
  };
  p.ns = fill(s_parts, p.s, "S");
  p.na = fill(a_parts, p.a, "AS");
  if (batch > 0 && q > 0) {
    for (const auto& [ptr, name] : {std::pair<std::uintptr_t, const char*>{b_ptr, "B"}, {h_ptr, "H"}}) {
      LORAINIT_CHECK(ptr != 0 && ptr % 8 == 0, op, ": output ", name, " must be a non-null, 8-byte aligned float64 buffer");
    }
  }
  p.B = reinterpret_cast<double*>(b_ptr);
  p.H = reinterpret_cast<double*>(h_ptr);
  isa = check_isa(op, isa);
  const int nt = resolve_threads(op, num_threads);
  py::gil_scoped_release release;
  return lorainit::run_gram64(p, isa, nt);
}

py::dict cpu_features() {
  py::dict f;
#if defined(LORAINIT_X86)
  __builtin_cpu_init();
  f["avx2"] = bool(__builtin_cpu_supports("avx2"));
  f["fma"] = bool(__builtin_cpu_supports("fma"));
  f["f16c"] = bool(__builtin_cpu_supports("f16c"));
  f["avx512f"] = bool(__builtin_cpu_supports("avx512f"));
  f["avx512bw"] = bool(__builtin_cpu_supports("avx512bw"));
  f["avx512vl"] = bool(__builtin_cpu_supports("avx512vl"));
  f["avx512dq"] = bool(__builtin_cpu_supports("avx512dq"));
  f["avx512bf16"] = bool(__builtin_cpu_supports("avx512bf16"));
  f["amx"] = lorainit::isa_supported(lorainit::kAMX);
  f["vendor"] = __builtin_cpu_is("intel") ? "intel" : __builtin_cpu_is("amd") ? "amd" : "other";
#endif
  f["auto_bf16_pairs"] = lorainit::auto_bf16_pairs();
#if defined(LORAINIT_HAVE_OPENMP)
  f["openmp"] = true;
#else
  f["openmp"] = false;
#endif
  f["max_threads"] = max_threads();
  f["best_isa"] = lorainit::isa_name(lorainit::best_isa());
  return f;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lorainit C++ CPU kernels (no libtorch: raw pointers and strides)";
  m.def("version", []() { return 4; });

  m.attr("ISA_NAMES") = py::make_tuple("portable", "avx2", "avx512", "avx512bf16", "amx");
  m.attr("DTYPE_CODES") = py::dict(py::arg("float32") = 0, py::arg("bfloat16") = 1, py::arg("float16") = 2);

  m.def("kfac_update", &kfac_update,
        "Zs = sum x x^T (n, n), Gs = sum g x^T (m, n), ss = sum g*g (m) over the tokens whose mask byte is\n"
        "nonzero (all when mask_ptr = 0), fp32 accumulation, one pass over x. Inputs are (T, n) / (T, m)\n"
        "with unit column stride and the given element row strides; g_dtype = -1 means no g. Outputs are\n"
        "preallocated contiguous fp32 buffers, fully overwritten, or with accumulate=True added to (Zs must\n"
        "then be symmetric: its lower triangle is re-mirrored). isa = -1 picks the best level this CPU\n"
        "runs (see isa_levels()). Releases the GIL. Returns the name of the kernel that ran.",
        py::arg("x_ptr"), py::arg("x_row_stride"), py::arg("x_dtype"), py::arg("T"), py::arg("n"), py::arg("g_ptr"),
        py::arg("g_row_stride"), py::arg("g_dtype"), py::arg("m"), py::arg("mask_ptr"), py::arg("with_input_cov"),
        py::arg("z_ptr"), py::arg("gs_ptr"), py::arg("ss_ptr"), py::arg("isa") = -1, py::arg("num_threads") = 0,
        py::arg("accumulate") = false);
  m.def("weighted_gram", &weighted_gram,
        "out = sum_t w_t v_t v_t^T (d, d), symmetric, fp32 accumulation; w_ptr = 0 means all weights 1,\n"
        "else T contiguous fp32 weights (any sign). accumulate=True adds to out (symmetric) instead of\n"
        "overwriting it. Releases the GIL. Returns the kernel name.",
        py::arg("v_ptr"), py::arg("v_row_stride"), py::arg("v_dtype"), py::arg("T"), py::arg("d"), py::arg("w_ptr"),
        py::arg("out_ptr"), py::arg("isa") = -1, py::arg("num_threads") = 0, py::arg("accumulate") = false);
  m.def("sym_matmul", &sym_matmul,
        "Y = A W for a batch of symmetric fp32 matrices, reading only the upper triangle of each A (the\n"
        "strictly lower triangle is never read). A: matrix b at a_ptr + 4 * b * a_mat_stride, rows lda floats\n"
        "apart; W, Y: (batch, n, pw) contiguous fp32 with pw = 8 or a multiple of 16 (pad W with zeros); Y is\n"
        "overwritten. Releases the GIL. Returns the kernel name.",
        py::arg("a_ptr"), py::arg("batch"), py::arg("n"), py::arg("lda"), py::arg("a_mat_stride"), py::arg("w_ptr"),
        py::arg("pw"), py::arg("y_ptr"), py::arg("isa") = -1, py::arg("num_threads") = 0);
  m.def("rr_grams", &rr_grams,
        "B = S^T S and H = S^T AS (q x q each, float64 accumulation, upper triangles mirrored) for a batch of\n"
        "fp32 blocks S, AS (n, q) given as 1 to 4 column parts (ptr, cols, row_stride, mat_stride) each;\n"
        "B, H: (batch, q, q) contiguous float64 outputs. Releases the GIL. Returns the kernel name.",
        py::arg("s_parts"), py::arg("a_parts"), py::arg("batch"), py::arg("n"), py::arg("q"), py::arg("b_ptr"),
        py::arg("h_ptr"), py::arg("isa") = -1, py::arg("num_threads") = 0);
  m.def("cpu_features", &cpu_features, "CPU features the dispatcher looks at, OpenMP and the best ISA level.");
  m.def("isa_levels", []() {
    py::list out;
    for (int i = 0; i < lorainit::kNumIsa; ++i)
      if (lorainit::isa_supported(i)) out.append(lorainit::isa_name(i));
    return out;
  }, "Names of the ISA levels this CPU runs, lowest first.");
  m.def("peak_gflops", [](int isa, int num_threads) {
    const char* op = "_C.peak_gflops";
    LORAINIT_CHECK(isa >= 0 && isa < lorainit::kNumIsa, op, ": isa must name a level (0..", lorainit::kNumIsa - 1,
                   "), got ", isa);
    LORAINIT_CHECK(lorainit::isa_supported(isa), op, ": this CPU cannot run the ", lorainit::isa_name(isa), " level");
    const int nt = resolve_threads(op, num_threads);
    py::gil_scoped_release release;
    return lorainit::peak_gflops(isa, nt);
  }, "GFLOP/s of the instruction the level's Gram kernel multiplies with (avx2/avx512: fp32 FMA, avx512bf16:\n"
     "vdpbf16ps, amx: tdpbf16ps) on num_threads threads, from a register-only probe; NaN for portable.",
        py::arg("isa"), py::arg("num_threads") = 0);
  m.def("kernel_name", [](int x_dtype, int g_dtype, bool weighted, int isa) {
    check_dtype("_C.kernel_name", "x", x_dtype);
    if (g_dtype >= 0) check_dtype("_C.kernel_name", "g", g_dtype);
    return lorainit::kernel_name(check_isa("_C.kernel_name", isa), x_dtype, g_dtype, weighted);
  }, "The kernel kfac_update/weighted_gram would run for these dtype codes (g_dtype=-1: no g).",
        py::arg("x_dtype"), py::arg("g_dtype") = -1, py::arg("weighted") = false, py::arg("isa") = -1);
}
