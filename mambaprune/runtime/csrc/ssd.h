// SSD (Mamba-2) scan on the CPU: forward and analytic backward, sequential over tokens, vectorised over channels.
//
// The CPU kernel of torch.ops.mambaprune_cpu.ssd_forward / ssd_backward (registered in cpu_kernels.cpp; schema and
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
// The analytic backward (below) recomputes each block's states and walks the tokens backwards.

#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>

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
  T gap_at(int64_t b, int64_t t) const {
    return gap.present() ? gap.data[b * gap.strides[0] + t * gap.strides[1]] : T(1);
  }
  // D's lanes [p0, p0 + lanes) of head h, zeros without D.
  Vectorized<T> D_lanes(int64_t h, int64_t p0, int64_t lanes) const {
    if (!D.present()) return Vectorized<T>(T(0));
    return load_lanes(D.data + h * D.strides[0] + p0 * D.strides[1], D.strides[1], lanes);
  }
};

template <typename T>
void ssd_forward_block(const Ssd<T>& s, T* y, int64_t b, int64_t h, int64_t j) {
  using Vec = Vectorized<T>;
  const int64_t W = Vec::size(), p0 = j * W, lanes = std::min<int64_t>(W, s.headdim - p0), N = s.dstate;
  const int64_t g = h / s.heads_per_group;
  const T A_h = s.A.data[h * s.A.strides[0]];
  const T bias_h = s.bias.present() ? s.bias.data[h * s.bias.strides[0]] : T(0);
  const Vec D_v = s.D_lanes(h, p0, lanes);
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
              "mambaprune_cpu::ssd_forward: float32 or float64 inputs (the Python wrapper casts), got ",
              x.scalar_type());
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


// ------------------------------------------------------------------------------------------ backward
//
// One task = one sample and one head, its channel blocks one after the other: the per-token scalars
// that every channel of the head shares (the gradients of dt and of the decay) are then complete in
// the task. Per block the forward is recomputed into a token-major tape (states, L * N vectors), then
// the tokens are walked backwards with g_n = dL/dh_n:
//
//   g_n += C_n dy        dC_n += dy . h_n      dB_n += g_n . (dt x)      q += B_n g_n
//   da  += g_n . h_{n, t-1}                    g_n *= a                  (then on to t - 1)
//   dx = D dy + dt q     d dt = q . x + da a gap A      dA += da a gap dt
//
// ("." sums over channels). B and C are shared by the heads of a group: each task writes its head's
// partial sums, (batch, H, L, N), which are added up per group at the end; A, D and dt_bias are
// shared by the samples: per-sample partials, summed at the end.

template <typename T>
struct SsdGrads {
  T *x, *dt, *z, *A, *D, *bias, *B, *C;  // x, z (batch, L, H, P); dt (batch, L, H); A, bias (batch, H);
                                         // D (batch, H, P); B, C (batch, H, L, N)
};

template <typename T>
void ssd_backward_head(const Ssd<T>& s, const View<T>& grad_out, const SsdGrads<T>& out, int64_t b, int64_t h) {
  using Vec = Vectorized<T>;
  const int64_t W = Vec::size(), N = s.dstate, L = s.length, P = s.headdim, H = s.heads;
  const int64_t g = h / s.heads_per_group;
  const T A_h = s.A.data[h * s.A.strides[0]];
  const T bias_h = s.bias.present() ? s.bias.data[h * s.bias.strides[0]] : T(0);
  const int64_t B_n = s.B.strides[3], C_n = s.C.strides[3];
  std::vector<T> dts(L), decays(L), gaps(L), grad_decay(L, T(0)), grad_step(L, T(0));
  for (int64_t t = 0; t < L; ++t) {
    dts[t] = s.step(b, t, h, bias_h);
    gaps[t] = s.gap_at(b, t);
    decays[t] = std::exp(dts[t] * gaps[t] * A_h);
  }
  std::vector<Vec> states(L * N), pre_gate(L), grad_h(N);
  std::vector<Vec> grad_B_lanes(L * N, Vec(T(0))), grad_C_lanes(L * N, Vec(T(0)));  // summed over the blocks
  for (int64_t j = 0; j < s.blocks; ++j) {
    const int64_t p0 = j * W, lanes = std::min<int64_t>(W, P - p0);
    const Vec D_v = s.D_lanes(h, p0, lanes);
    // The forward of this block, recorded.
    std::fill(grad_h.begin(), grad_h.end(), Vec(T(0)));  // as the zero state h_{-1}
    const Vec* previous = grad_h.data();
    for (int64_t t = 0; t < L; ++t) {
      const Vec x = load_lanes(s.at4(s.x, b, t, h, p0), s.x.strides[3], lanes), dt_x = Vec(dts[t]) * x;
      const Vec decay(decays[t]);
      const T* B = s.B.data + b * s.B.strides[0] + t * s.B.strides[1] + g * s.B.strides[2];
      const T* C = s.C.data + b * s.C.strides[0] + t * s.C.strides[1] + g * s.C.strides[2];
      Vec* state = states.data() + t * N;
      Vec acc(T(0));
      for (int64_t n = 0; n < N; ++n) {
        state[n] = at::vec::fmadd(dt_x, Vec(B[n * B_n]), decay * previous[n]);
        acc = at::vec::fmadd(state[n], Vec(C[n * C_n]), acc);
      }
      pre_gate[t] = at::vec::fmadd(D_v, x, acc);
      previous = state;
    }
    // The reverse walk.
    std::fill(grad_h.begin(), grad_h.end(), Vec(T(0)));
    Vec grad_D(T(0));
    for (int64_t t = L - 1; t >= 0; --t) {
      const int64_t row = (b * L + t) * H + h;  // (batch, L, H) index
      Vec gy = load_lanes(grad_out.data + b * grad_out.strides[0] + t * grad_out.strides[1] + h * grad_out.strides[2]
                              + p0 * grad_out.strides[3], grad_out.strides[3], lanes);
      const Vec x = load_lanes(s.at4(s.x, b, t, h, p0), s.x.strides[3], lanes), dt_x = Vec(dts[t]) * x;
      if (s.z.present()) {
        const Vec z = load_lanes(s.at4(s.z, b, t, h, p0), s.z.strides[3], lanes), sig = sigmoid(z);
        const Vec grad_z = gy * pre_gate[t] * sig * (Vec(T(1)) + z * (Vec(T(1)) - sig));
        grad_z.store(out.z + row * P + p0, lanes);
        gy = gy * z * sig;
      }
      grad_D = at::vec::fmadd(gy, x, grad_D);
      const T* B = s.B.data + b * s.B.strides[0] + t * s.B.strides[1] + g * s.B.strides[2];
      const T* C = s.C.data + b * s.C.strides[0] + t * s.C.strides[1] + g * s.C.strides[2];
      const Vec* state = states.data() + t * N;
      const Vec decay(decays[t]);
      Vec q(T(0)), grad_a(T(0));
      for (int64_t n = 0; n < N; ++n) {
        grad_h[n] = at::vec::fmadd(gy, Vec(C[n * C_n]), grad_h[n]);  // now dL/dh_t
        grad_C_lanes[t * N + n] = at::vec::fmadd(gy, state[n], grad_C_lanes[t * N + n]);
        grad_B_lanes[t * N + n] = at::vec::fmadd(grad_h[n], dt_x, grad_B_lanes[t * N + n]);
        q = at::vec::fmadd(grad_h[n], Vec(B[n * B_n]), q);
        if (t > 0) grad_a = at::vec::fmadd(grad_h[n], state[n - N], grad_a);
        grad_h[n] = grad_h[n] * decay;
      }
      (at::vec::fmadd(gy, D_v, q * Vec(dts[t]))).store(out.x + row * P + p0, lanes);
      grad_step[t] += reduce_lanes(q * x);
      grad_decay[t] += reduce_lanes(grad_a);
    }
    grad_D.store(out.D + (b * H + h) * P + p0, lanes);
  }
  T grad_A = T(0), grad_bias = T(0);
  for (int64_t t = 0; t < L; ++t) {
    const T grad_exponent = grad_decay[t] * decays[t];  // dL/d(gap dt A)
    grad_A += grad_exponent * gaps[t] * dts[t];
    T grad_dt = grad_step[t] + grad_exponent * gaps[t] * A_h;
    if (s.softplus) {
      const T pre = s.dt.data[b * s.dt.strides[0] + t * s.dt.strides[1] + h * s.dt.strides[2]] + bias_h;
      if (pre <= T(20)) grad_dt *= T(1) / (T(1) + std::exp(-pre));
    }
    grad_bias += grad_dt;
    out.dt[(b * L + t) * H + h] = grad_dt;
  }
  out.A[b * H + h] = grad_A;
  out.bias[b * H + h] = grad_bias;
  T* grad_B = out.B + (b * H + h) * L * N;
  T* grad_C = out.C + (b * H + h) * L * N;
  for (int64_t i = 0; i < L * N; ++i) {
    grad_B[i] = reduce_lanes(grad_B_lanes[i]);
    grad_C[i] = reduce_lanes(grad_C_lanes[i]);
  }
}

// Gradients {x, dt, z (empty without z), A, D (H, P; zeros without D), dt_bias, B, C}.
std::vector<at::Tensor> ssd_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& dt,
                                     const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                     const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                     const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                                     const std::optional<at::Tensor>& gap) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) &&
              grad_out.scalar_type() == x.scalar_type(),
              "mambaprune_cpu::ssd_backward: float32 or float64 CPU tensors");
  TORCH_CHECK(x.dim() == 4 && B.dim() == 4 && grad_out.sizes() == x.sizes() && (!D.has_value() || D->dim() == 2),
              "mambaprune_cpu::ssd_backward: x and grad_out (batch, L, H, P), B and C (batch, L, G, N), D (H, P)");
  const int64_t batch = x.size(0), L = x.size(1), H = x.size(2), P = x.size(3), G = B.size(2), N = B.size(3);
  const auto options = x.options();
  at::Tensor gx = at::empty({batch, L, H, P}, options), gdt = at::empty({batch, L, H}, options);
  at::Tensor gz = z.has_value() ? at::empty({batch, L, H, P}, options) : at::empty({0}, options);
  at::Tensor gA = at::empty({batch, H}, options), gbias = at::empty({batch, H}, options);
  at::Tensor gD = at::empty({batch, H, P}, options);
  at::Tensor gB = at::empty({batch, H, L, N}, options), gC = at::empty({batch, H, L, N}, options);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ssd_backward", [&] {
    const Ssd<scalar_t> s(x, dt, A, B, C, D, z, dt_bias, dt_softplus, gap);
    const View<scalar_t> grad_view(grad_out);
    const SsdGrads<scalar_t> out{gx.data_ptr<scalar_t>(), gdt.data_ptr<scalar_t>(),
                                 z.has_value() ? gz.data_ptr<scalar_t>() : nullptr, gA.data_ptr<scalar_t>(),
                                 gD.data_ptr<scalar_t>(), gbias.data_ptr<scalar_t>(), gB.data_ptr<scalar_t>(),
                                 gC.data_ptr<scalar_t>()};
    at::parallel_for(0, batch * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) ssd_backward_head(s, grad_view, out, task / H, task % H);
    });
  });
  // Partial sums -> the gradients' shapes: B and C summed over the heads of each group, (batch, L, G, N).
  auto per_group = [&](const at::Tensor& t) {
    return t.view({batch, G, H / G, L, N}).sum(2).permute({0, 2, 1, 3}).contiguous();
  };
  return {gx, gdt, gz, gA.sum(0), gD.sum(0), gbias.sum(0), per_group(gB), per_group(gC)};
}

}  // namespace mambaprune_cpu
