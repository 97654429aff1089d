// benchmarks/cpu_ffi_gemm.py: an XLA FFI CPU handler that runs one float32 GEMM through a CBLAS sgemm
// (NumPy's bundled OpenBLAS, ILP64), to measure what XLA:CPU's dot emitter leaves.
#include <cstdint>
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

typedef void (*sgemm_t)(int, int, int, int64_t, int64_t, int64_t, float, const float*, int64_t,
                        const float*, int64_t, float, float*, int64_t);
static sgemm_t g_sgemm = nullptr;

extern "C" int ln_set_sgemm(void* fn) {
  g_sgemm = reinterpret_cast<sgemm_t>(fn);
  return 0;
}

// c = op(a) @ op(b), row-major; op transposes when ta / tb
static ffi::Error Gemm(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                       ffi::ResultBuffer<ffi::F32> c, bool ta, bool tb) {
  if (g_sgemm == nullptr) return ffi::Error(ffi::ErrorCode::kFailedPrecondition, "no sgemm set");
  auto ad = a.dimensions();
  auto bd = b.dimensions();
  const int64_t m = ta ? ad[1] : ad[0], k = ta ? ad[0] : ad[1], n = tb ? bd[0] : bd[1];
  g_sgemm(101, ta ? 112 : 111, tb ? 112 : 111, m, n, k, 1.0f, a.typed_data(), ad[1],
          b.typed_data(), bd[1], 0.0f, c->typed_data(), n);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(LnGemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("ta")
                                  .Attr<bool>("tb"));
