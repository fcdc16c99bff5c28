// The mambaprune:: ops for a process without Python: schemas and CPU kernels in C++.
//
// In Python, `import mambaprune.runtime.op_library` defines the ops (mambaprune/runtime/*.py) and an
// AOTInductor package calls them through the dispatcher. A C++ program has no Python, so this library
// defines the same schemas (they must match the Python ones exactly: the package names ops by schema)
// with CPU kernels built from the project's own kernel headers (mambaprune/runtime/csrc), float32 and
// float64. Linking it (or dlopen) registers the ops before the package is loaded.

#include <ATen/ATen.h>
#include <torch/library.h>

#include "scan.h"
#include "token_ops.h"

namespace {

at::ScalarType compute_dtype(std::initializer_list<std::optional<at::Tensor>> tensors) {
  for (const auto& t : tensors) {
    if (t.has_value() && t->scalar_type() == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

std::optional<at::Tensor> cast(const std::optional<at::Tensor>& t, at::ScalarType dtype) {
  if (!t.has_value() || t->scalar_type() == dtype) return t;
  return t->to(dtype);
}

at::Tensor grouped(const at::Tensor& t) { return t.dim() == 3 ? t.unsqueeze(1) : t; }

// mambaprune::selective_scan (runtime/selective_scan.py): B and C grouped, inputs cast to the compute dtype.
at::Tensor selective_scan(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                          const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                          const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                          const std::optional<at::Tensor>& gap) {
  const auto dtype = compute_dtype({u, delta, A, B, C, D, z, delta_bias});
  at::Tensor y = mambaprune_cpu::scan_forward(
      *cast(u, dtype), *cast(delta, dtype), *cast(A, dtype), *cast(grouped(B), dtype), *cast(grouped(C), dtype),
      cast(D, dtype), cast(z, dtype), cast(delta_bias, dtype), delta_softplus, cast(gap, dtype));
  return y.scalar_type() == u.scalar_type() ? y : y.to(u.scalar_type());
}

// mambaprune::path_order (runtime/token_ops.py): the order in which a scan path visits the kept tokens.
at::Tensor path_order(const at::Tensor& path, const at::Tensor& pos) {
  return path.argsort().index({pos}).argsort(int64_t{1}, /*descending=*/false);
}

}  // namespace

TORCH_LIBRARY(mambaprune, m) {
  m.def("selective_scan(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D=None, Tensor? z=None, "
        "Tensor? delta_bias=None, bool delta_softplus=False, Tensor? gap=None) -> Tensor");
  m.def("pos_conv1d(Tensor x, Tensor weight, Tensor? bias, Tensor pos, int left) -> Tensor");
  m.def("pos_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor pos, int height, int width, int padding) -> Tensor");
  m.def("path_order(Tensor path, Tensor pos) -> Tensor");
}

TORCH_LIBRARY_IMPL(mambaprune, CPU, m) {
  m.impl("selective_scan", &selective_scan);
  m.impl("pos_conv1d", &mambaprune_cpu::pos_conv1d_forward);
  m.impl("pos_conv2d", &mambaprune_cpu::pos_conv2d_forward);
  m.impl("path_order", &path_order);
}
