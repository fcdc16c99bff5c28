// SSD (Mamba-2) scan on the CPU: the forward, sequential over tokens, vectorised over channels.
//
// The CPU kernel of torch.ops.mambaprune_cpu.ssd_forward (registered in cpu_kernels.cpp; schema and
// fake kernel in ssd_cpp.py). Layout of mamba_ssm's mamba_chunk_scan_combined: x, z (batch, L, H, P),
// dt (batch, L, H), A (H,), B, C (batch, L, G, N), D (H, P) (the wrapper expands a per-head D),
// dt_bias (H,), gap (batch, L); any strides; float or double (the wrapper casts).
//
// One task = one sample, one head and one block of at most Vec::size() of its P channels. The decay
// is one scalar per (token, head), so a token costs one scalar exp and, per state n, one multiply and
// two fused multiply-adds on a vector of channels (the Mamba-1 kernel needs a vector exp per state):
//
//   dt = softplus?(dt + bias)    a = exp(gap * dt * A_h)
//   h_n = a * h_n + (dt x) B_n   y = sum_n C_n h_n + D x   (then y *= silu(z))
//
// The backward is not here: the op differentiates the equivalent Mamba-1 scan (scan.h's analytic
// backward) through views of these tensors (ssd_reference.as_selective_scan_args).

#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <cmath>

#include "common.h"

namespace mambaprune_cpu {

// Lanes [0, lanes) of p[i * step], zeros elsewhere; one unaligned load when the lanes are contiguous.
template <typename T>
Vectorized<T> load_lanes(const T* p, int64_t step, int64_t lanes) {
  if (step == 1) return lanes == Vectorized<T>::size() ? Vectorized<T>::loadu(p) : Vectorized<T>::loadu(p, lanes);
  return load_strided(p, step, lanes);
}

template <typename T>
struct Ssd {
  int64_t batch, length, heads, headdim, groups, dstate, heads_per_group, blocks;
  bool softplus;
  View<T> x, dt, A, B, C, D, z, bias, gap;

  Ssd(const at::Tensor& x_, const at::Tensor& dt_, const at::Tensor& A_, const at::Tensor& B_,
      const at::Tensor& C_, const std::optional<at::Tensor>& D_, const std::optional<at::Tensor>& z_,
      const std::optional<at::Tensor>& bias_, bool softplus_, const std::optional<at::Tensor>& gap_)
      : batch(x_.size(0)), length(x_.size(1)), heads(x_.size(2)), headdim(x_.size(3)), groups(B_.size(2)),
        dstate(B_.size(3)), heads_per_group(x_.size(2) / B_.size(2)), blocks(channel_blocks<T>(x_.size(3))),
        softplus(softplus_), x(x_), dt(dt_), A(A_), B(B_), C(C_), D(D_), z(z_), bias(bias_), gap(gap_) {}

  // Element [b, t, h, p] of a (batch, L, H, P) view.
  const T* at4(const View<T>& v, int64_t b, int64_t t, int64_t h, int64_t p) const {
    return v.data + b * v.strides[0] + t * v.strides[1] + h * v.strides[2] + p * v.strides[3];
  }
  // dt after the bias and the optional softplus (torch's threshold of 20).
  T step(int64_t b, int64_t t, int64_t h, T bias_h) const {
    const T value = dt.data[b * dt.strides[0] + t * dt.strides[1] + h * dt.strides[2]] + bias_h;
    return softplus && value <= T(20) ? std::log1p(std::exp(value)) : value;
  }
  T gap_at(int64_t b, int64_t t) const { return gap.present() ? gap.data[b * gap.strides[0] + t * gap.strides[1]] : T(1); }
};

template <typename T>
void ssd_forward_block(const Ssd<T>& s, T* y, int64_t b, int64_t h, int64_t j) {
  using Vec = Vectorized<T>;
  const int64_t W = Vec::size(), p0 = j * W, lanes = std::min<int64_t>(W, s.headdim - p0), N = s.dstate;
  const int64_t g = h / s.heads_per_group;
  const T A_h = s.A.data[h * s.A.strides[0]];
  const T bias_h = s.bias.present() ? s.bias.data[h * s.bias.strides[0]] : T(0);
  const Vec D_v = s.D.present() ? load_lanes(s.D.data + h * s.D.strides[0] + p0 * s.D.strides[1], s.D.strides[1], lanes)
                                : Vec(T(0));
  std::vector<Vec> state(N, Vec(T(0)));
  const int64_t B_n = s.B.strides[3], C_n = s.C.strides[3];
  T* out = y + ((b * s.length) * s.heads + h) * s.headdim + p0;  // y[b, 0, h, p0], contiguous
  const int64_t out_t = s.heads * s.headdim;
  for (int64_t t = 0; t < s.length; ++t) {
    const T dt = s.step(b, t, h, bias_h);
    const Vec decay(std::exp(dt * s.gap_at(b, t) * A_h));
    const Vec x = load_lanes(s.at4(s.x, b, t, h, p0), s.x.strides[3], lanes);
    const Vec dt_x = Vec(dt) * x;
    const T* B = s.B.data + b * s.B.strides[0] + t * s.B.strides[1] + g * s.B.strides[2];
    const T* C = s.C.data + b * s.C.strides[0] + t * s.C.strides[1] + g * s.C.strides[2];
    Vec acc0(T(0)), acc1(T(0));  // two chains of the sum over n
    int64_t n = 0;
    for (; n + 1 < N; n += 2) {
      state[n] = at::vec::fmadd(dt_x, Vec(B[n * B_n]), decay * state[n]);
      state[n + 1] = at::vec::fmadd(dt_x, Vec(B[(n + 1) * B_n]), decay * state[n + 1]);
      acc0 = at::vec::fmadd(state[n], Vec(C[n * C_n]), acc0);
      acc1 = at::vec::fmadd(state[n + 1], Vec(C[(n + 1) * C_n]), acc1);
    }
    if (n < N) {
      state[n] = at::vec::fmadd(dt_x, Vec(B[n * B_n]), decay * state[n]);
      acc0 = at::vec::fmadd(state[n], Vec(C[n * C_n]), acc0);
    }
    Vec out_v = at::vec::fmadd(D_v, x, acc0 + acc1);
    if (s.z.present()) {
      const Vec z = load_lanes(s.at4(s.z, b, t, h, p0), s.z.strides[3], lanes);
      out_v = out_v * z * sigmoid(z);
    }
    if (lanes == W) out_v.store(out + t * out_t);
    else out_v.store(out + t * out_t, lanes);
  }
}

at::Tensor ssd_forward(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                       const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                       const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                       const std::optional<at::Tensor>& gap) {
  TORCH_CHECK(x.device().is_cpu(), "mambaprune_cpu::ssd_forward: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "mambaprune_cpu::ssd_forward: float32 or float64 inputs (the Python wrapper casts), got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 4 && B.dim() == 4 && (!D.has_value() || D->dim() == 2),
              "mambaprune_cpu::ssd_forward: x (batch, L, H, P), B and C (batch, L, G, N), D (H, P)");
  at::Tensor y = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ssd_forward", [&] {
    const Ssd<scalar_t> s(x, dt, A, B, C, D, z, dt_bias, dt_softplus, gap);
    scalar_t* out = y.data_ptr<scalar_t>();
    const int64_t per_sample = s.heads * s.blocks;
    at::parallel_for(0, s.batch * per_sample, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / per_sample, rest = task % per_sample;
        ssd_forward_block(s, out, b, rest / s.blocks, rest % s.blocks);
      }
    });
  });
  return y;
}

}  // namespace mambaprune_cpu
