// Selective scan on the CPU: forward and analytic backward, vectorised over channels.
//
// The CPU kernels of torch.ops.mambaprune_cpu.scan_forward / scan_backward (registered in
// cpu_kernels.cpp; schemas and fake kernels in scan_cpp.py). The Python wrapper casts every input
// to the compute dtype (float or double) and passes B and C grouped, (batch, G, N, L); every tensor
// may have any strides (a (batch, L, D) tensor's transposed view is read in place, one contiguous
// vector of channels per token).
//
// One task = one sample and one block of at most Vec::size() channels of one group. Its state,
// N vectors of channels, stays in L1 for the whole token loop, so each token costs N vector exps and
// fused multiply-adds and nothing else: no per-token dispatch, no (batch, D, N, L) intermediate.
//
//   forward   dt = softplus?(delta + bias)   a_n = exp(gap * dt * A_n)
//             h_n = a_n * h_n + dt * u * B_n   y = sum_n C_n h_n + D u   (then y *= silu(z))
//   backward  g_n = C_n dy + a_{n, t+1} g_{n, t+1}   (reverse scan of the state's gradient)
//
// The backward recomputes a block's states and decays into a per-task buffer (2 L N vectors), then
// walks the tokens backwards. Gradients shared by channels (B, C: summed over a group's channels;
// A, D, delta_bias: summed over the batch) are written as per-task partial sums, then added up.

#pragma once

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include "common.h"

namespace mambaprune_cpu {

// Shapes, flags and views of one call; the same for forward and backward.
template <typename T>
struct Scan {
  int64_t batch, dim, length, dstate, groups, per_group, blocks_per_group;
  bool softplus;
  View<T> u, delta, A, B, C, D, z, bias, gap;

  Scan(const at::Tensor& u_, const at::Tensor& delta_, const at::Tensor& A_, const at::Tensor& B_,
       const at::Tensor& C_, const std::optional<at::Tensor>& D_, const std::optional<at::Tensor>& z_,
       const std::optional<at::Tensor>& bias_, bool softplus_, const std::optional<at::Tensor>& gap_)
      : batch(u_.size(0)), dim(u_.size(1)), length(u_.size(2)), dstate(A_.size(1)), groups(B_.size(1)),
        per_group(dim / groups), softplus(softplus_), u(u_), delta(delta_), A(A_), B(B_), C(C_), D(D_), z(z_),
        bias(bias_), gap(gap_) {
    blocks_per_group = channel_blocks<T>(per_group);
  }

  // Block j of a group: its first channel and how many lanes it fills.
  int64_t first_channel(int64_t group, int64_t j) const { return group * per_group + j * Vectorized<T>::size(); }
  int64_t lanes(int64_t j) const { return block_lanes<T>(per_group, j); }
  // B or C of one sample and group, as a pointer and (state, token) strides: at(n, t).
  struct Projection {
    const T* data;
    int64_t n_step, t_step;
    T at(int64_t n, int64_t t) const { return data[n * n_step + t * t_step]; }
  };
  Projection projection(const View<T>& P, int64_t b, int64_t g) const {
    return {P.data + b * P.strides[0] + g * P.strides[1], P.strides[2], P.strides[3]};
  }
  T gap_at(int64_t b, int64_t t) const { return gap.present() ? gap.data[b * gap.strides[0] + t * gap.strides[1]] : T(1); }
  Vectorized<T> A_column(int64_t d0, int64_t n, int64_t lanes) const {
    return load_strided(A.data + d0 * A.strides[0] + n * A.strides[1], A.strides[0], lanes);
  }
  Vectorized<T> per_channel(const View<T>& v, int64_t d0, int64_t lanes) const {
    return v.present() ? load_strided(v.data + d0 * v.strides[0], v.strides[0], lanes) : Vectorized<T>(T(0));
  }
  // delta + bias before softplus (x0) and after (dt).
  Vectorized<T> pre_softplus(int64_t b, int64_t d0, int64_t t, int64_t lanes, const Vectorized<T>& bias_v) const {
    return load_channels(delta, b, d0, t, lanes) + bias_v;
  }
  Vectorized<T> dt_of(const Vectorized<T>& x0) const { return softplus ? mambaprune_cpu::softplus(x0) : x0; }
};

template <typename T>
void forward_block(const Scan<T>& s, T* y, int64_t b, int64_t g, int64_t j) {
  using Vec = Vectorized<T>;
  const int64_t d0 = s.first_channel(g, j), lanes = s.lanes(j), N = s.dstate;
  std::vector<Vec> A_v(N), h(N, Vec(T(0)));
  for (int64_t n = 0; n < N; ++n) A_v[n] = s.A_column(d0, n, lanes);
  const Vec D_v = s.per_channel(s.D, d0, lanes), bias_v = s.per_channel(s.bias, d0, lanes);
  std::vector<T> out(s.length * Vec::size());
  const auto B = s.projection(s.B, b, g), C = s.projection(s.C, b, g);
  for (int64_t t = 0; t < s.length; ++t) {
    const Vec dt = s.dt_of(s.pre_softplus(b, d0, t, lanes, bias_v));
    const Vec u = load_channels(s.u, b, d0, t, lanes);
    const Vec decay_dt = s.gap.present() ? dt * Vec(s.gap_at(b, t)) : dt;
    const Vec dt_u = dt * u;
    Vec acc0(T(0)), acc1(T(0));  // two chains of the sum over n
    for (int64_t n = 0; n < N; ++n) {
      h[n] = at::vec::fmadd((decay_dt * A_v[n]).exp(), h[n], dt_u * Vec(B.at(n, t)));
      if (n % 2 == 0) acc0 = at::vec::fmadd(h[n], Vec(C.at(n, t)), acc0);
      else acc1 = at::vec::fmadd(h[n], Vec(C.at(n, t)), acc1);
    }
    Vec out_t = at::vec::fmadd(D_v, u, acc0 + acc1);
    if (s.z.present()) {
      const Vec z = load_channels(s.z, b, d0, t, lanes);
      out_t = out_t * z * sigmoid(z);
    }
    out_t.store(out.data() + t * Vec::size());
  }
  write_rows(y, b * s.dim + d0, s.length, lanes, out);
}

template <typename T>
at::Tensor forward_impl(const Scan<T>& s, const at::Tensor& u) {
  at::Tensor y = at::empty({s.batch, s.dim, s.length}, u.options());
  T* out = y.data_ptr<T>();
  const int64_t per_sample = s.groups * s.blocks_per_group;
  at::parallel_for(0, s.batch * per_sample, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / per_sample, rest = task % per_sample;
      forward_block(s, out, b, rest / s.blocks_per_group, rest % s.blocks_per_group);
    }
  });
  return y;
}

// Outputs of the backward; shared ones (A, D, bias: per sample; B, C: per chunk of blocks) are partial sums.
template <typename T>
struct Grads {
  T *u, *delta, *z, *A, *D, *bias, *B, *C;
  int64_t chunks;
};

// Per-task working memory of the backward: one block's recomputed forward, token-major.
template <typename T>
struct BlockTape {
  std::vector<Vectorized<T>> states, decays, dts, pre_gate;
  std::vector<T> grad_u, grad_delta, grad_z;

  BlockTape(int64_t length, int64_t dstate)
      : states(length * dstate), decays(length * dstate), dts(length), pre_gate(length),
        grad_u(length * Vectorized<T>::size()), grad_delta(length * Vectorized<T>::size()),
        grad_z(length * Vectorized<T>::size()) {}
};

template <typename T>
void record_forward(const Scan<T>& s, BlockTape<T>& tape, int64_t b, int64_t g, int64_t d0, int64_t lanes,
                    const std::vector<Vectorized<T>>& A_v, const Vectorized<T>& D_v, const Vectorized<T>& bias_v) {
  using Vec = Vectorized<T>;
  const int64_t N = s.dstate;
  std::vector<Vec> h(N, Vec(T(0)));
  const auto B = s.projection(s.B, b, g), C = s.projection(s.C, b, g);
  for (int64_t t = 0; t < s.length; ++t) {
    const Vec dt = s.dt_of(s.pre_softplus(b, d0, t, lanes, bias_v));
    const Vec u = load_channels(s.u, b, d0, t, lanes);
    const Vec decay_dt = dt * Vec(s.gap_at(b, t));
    const Vec dt_u = dt * u;
    Vec acc(T(0));
    for (int64_t n = 0; n < N; ++n) {
      const Vec a = (decay_dt * A_v[n]).exp();
      h[n] = at::vec::fmadd(a, h[n], dt_u * Vec(B.at(n, t)));
      acc = at::vec::fmadd(h[n], Vec(C.at(n, t)), acc);
      tape.states[t * N + n] = h[n];
      tape.decays[t * N + n] = a;
    }
    tape.dts[t] = dt;
    tape.pre_gate[t] = at::vec::fmadd(D_v, u, acc);
  }
}

// Reverse walk over one block; adds its share to the per-chunk B/C sums (vector lanes, reduced later).
template <typename T>
void backward_block(const Scan<T>& s, const View<T>& grad_out, const Grads<T>& out, BlockTape<T>& tape,
                    std::vector<Vectorized<T>>& grad_B_lanes, std::vector<Vectorized<T>>& grad_C_lanes,
                    int64_t b, int64_t g, int64_t j) {
  using Vec = Vectorized<T>;
  const int64_t d0 = s.first_channel(g, j), lanes = s.lanes(j), N = s.dstate, W = Vec::size();
  std::vector<Vec> A_v(N), grad_h(N, Vec(T(0))), grad_A(N, Vec(T(0)));
  for (int64_t n = 0; n < N; ++n) A_v[n] = s.A_column(d0, n, lanes);
  const Vec D_v = s.per_channel(s.D, d0, lanes), bias_v = s.per_channel(s.bias, d0, lanes);
  record_forward(s, tape, b, g, d0, lanes, A_v, D_v, bias_v);
  Vec grad_D(T(0)), grad_bias(T(0));
  const Vec one(T(1));
  const auto B = s.projection(s.B, b, g), C = s.projection(s.C, b, g);
  for (int64_t t = s.length - 1; t >= 0; --t) {
    Vec gy = load_channels(grad_out, b, d0, t, lanes);
    const Vec u = load_channels(s.u, b, d0, t, lanes), dt = tape.dts[t];
    if (s.z.present()) {
      const Vec z = load_channels(s.z, b, d0, t, lanes), sig = sigmoid(z);
      (gy * tape.pre_gate[t] * sig * (one + z * (one - sig))).store(tape.grad_z.data() + t * W);
      gy = gy * z * sig;
    }
    grad_D = at::vec::fmadd(gy, u, grad_D);
    const T gap = s.gap_at(b, t);
    const Vec decay_dt = dt * Vec(gap), dt_u = dt * u;
    Vec q(T(0)), grad_exponent_A(T(0));
    for (int64_t n = 0; n < N; ++n) {
      const int64_t at_tn = t * N + n;
      grad_h[n] = at::vec::fmadd(gy, Vec(C.at(n, t)), grad_h[n]);  // now d loss / d h_t
      grad_C_lanes[at_tn] = at::vec::fmadd(gy, tape.states[at_tn], grad_C_lanes[at_tn]);
      grad_B_lanes[at_tn] = at::vec::fmadd(grad_h[n], dt_u, grad_B_lanes[at_tn]);
      q = at::vec::fmadd(grad_h[n], Vec(B.at(n, t)), q);
      if (t > 0) {
        const Vec grad_exponent = grad_h[n] * tape.states[at_tn - N] * tape.decays[at_tn];
        grad_exponent_A = at::vec::fmadd(grad_exponent, A_v[n], grad_exponent_A);
        grad_A[n] = at::vec::fmadd(grad_exponent, decay_dt, grad_A[n]);
        grad_h[n] = grad_h[n] * tape.decays[at_tn];
      }
    }
    (gy * D_v + q * dt).store(tape.grad_u.data() + t * W);
    Vec grad_dt = at::vec::fmadd(grad_exponent_A, Vec(gap), q * u);
    if (s.softplus) {
      const Vec x0 = s.pre_softplus(b, d0, t, lanes, bias_v);
      grad_dt = Vec::blendv(grad_dt * sigmoid(x0), grad_dt, x0 > Vec(T(20)));
    }
    grad_bias = grad_bias + grad_dt;
    grad_dt.store(tape.grad_delta.data() + t * W);
  }
  write_rows(out.u, b * s.dim + d0, s.length, lanes, tape.grad_u);
  write_rows(out.delta, b * s.dim + d0, s.length, lanes, tape.grad_delta);
  if (s.z.present()) write_rows(out.z, b * s.dim + d0, s.length, lanes, tape.grad_z);
  alignas(64) T lane_values[Vectorized<T>::size()];
  for (int64_t n = 0; n < N; ++n) {
    grad_A[n].store(lane_values);
    for (int64_t i = 0; i < lanes; ++i) out.A[(b * s.dim + d0 + i) * N + n] = lane_values[i];
  }
  grad_D.store(lane_values);
  for (int64_t i = 0; i < lanes; ++i) out.D[b * s.dim + d0 + i] = lane_values[i];
  grad_bias.store(lane_values);
  for (int64_t i = 0; i < lanes; ++i) out.bias[b * s.dim + d0 + i] = lane_values[i];
}

// Blocks [first, last) of group g of sample b, then their B/C sums into chunk c's partial rows.
template <typename T>
void backward_chunk(const Scan<T>& s, const View<T>& grad_out, const Grads<T>& out, int64_t b, int64_t g,
                    int64_t c, int64_t first, int64_t last) {
  using Vec = Vectorized<T>;
  const int64_t N = s.dstate, L = s.length;
  BlockTape<T> tape(L, N);
  std::vector<Vec> grad_B_lanes(L * N, Vec(T(0))), grad_C_lanes(L * N, Vec(T(0)));
  for (int64_t j = first; j < last; ++j) backward_block(s, grad_out, out, tape, grad_B_lanes, grad_C_lanes, b, g, j);
  const int64_t row = ((c * s.batch + b) * s.groups + g) * N * L;  // (chunks, batch, G, N, L)
  for (int64_t t = 0; t < L; ++t) {
    for (int64_t n = 0; n < N; ++n) {
      out.B[row + n * L + t] = reduce_lanes(grad_B_lanes[t * N + n]);
      out.C[row + n * L + t] = reduce_lanes(grad_C_lanes[t * N + n]);
    }
  }
}

template <typename T>
std::vector<at::Tensor> backward_impl(const Scan<T>& s, const at::Tensor& grad_out, const at::Tensor& u) {
  const auto options = u.options();
  // Tasks: (sample, group, chunk of blocks), at least a few per thread; each chunk sums its own B/C.
  const int64_t tasks_wanted = 4 * at::get_num_threads();
  const int64_t chunks = std::clamp<int64_t>(
      (tasks_wanted + s.batch * s.groups - 1) / std::max<int64_t>(1, s.batch * s.groups), 1,
      std::max<int64_t>(1, s.blocks_per_group));
  const int64_t per_chunk = (s.blocks_per_group + chunks - 1) / chunks;
  at::Tensor gu = at::empty({s.batch, s.dim, s.length}, options), gdelta = at::empty_like(gu);
  at::Tensor gz = s.z.present() ? at::empty_like(gu) : at::empty({0}, options);
  at::Tensor gA = at::empty({s.batch, s.dim, s.dstate}, options);
  at::Tensor gD = at::empty({s.batch, s.dim}, options), gbias = at::empty_like(gD);
  at::Tensor gB = at::zeros({chunks, s.batch, s.groups, s.dstate, s.length}, options), gC = at::zeros_like(gB);
  const Grads<T> out{gu.data_ptr<T>(), gdelta.data_ptr<T>(), gz.data_ptr<T>(), gA.data_ptr<T>(),
                     gD.data_ptr<T>(), gbias.data_ptr<T>(), gB.data_ptr<T>(), gC.data_ptr<T>(), chunks};
  const View<T> grad_view(grad_out);
  const int64_t per_sample = s.groups * chunks;
  at::parallel_for(0, s.batch * per_sample, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / per_sample, g = (task % per_sample) / chunks, c = task % chunks;
      const int64_t first = std::min(c * per_chunk, s.blocks_per_group);
      const int64_t last = std::min(first + per_chunk, s.blocks_per_group);
      backward_chunk(s, grad_view, out, b, g, c, first, last);
    }
  });
  // Partial sums -> the gradients' shapes: A (D, N), D and delta_bias (D,), B and C (batch, G, N, L).
  return {gu, gdelta, gz, gA.sum(0), gD.sum(0), gbias.sum(0), gB.sum(0), gC.sum(0)};
}

void check_scan_inputs(const at::Tensor& u, const at::Tensor& B) {
  TORCH_CHECK(u.device().is_cpu(), "mambaprune_cpu::scan: CPU tensors only");
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble,
              "mambaprune_cpu::scan: float32 or float64 inputs (the Python wrapper casts), got ", u.scalar_type());
  TORCH_CHECK(B.dim() == 4, "mambaprune_cpu::scan: B and C must be grouped (batch, G, N, L)");
}

at::Tensor scan_forward(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                        const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                        const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                        const std::optional<at::Tensor>& gap) {
  check_scan_inputs(u, B);
  if (u.scalar_type() == at::kDouble) {
    return forward_impl(Scan<double>(u, delta, A, B, C, D, z, delta_bias, delta_softplus, gap), u);
  }
  return forward_impl(Scan<float>(u, delta, A, B, C, D, z, delta_bias, delta_softplus, gap), u);
}

std::vector<at::Tensor> scan_backward(const at::Tensor& grad_out, const at::Tensor& u, const at::Tensor& delta,
                                      const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                      const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                      const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                                      const std::optional<at::Tensor>& gap) {
  check_scan_inputs(u, B);
  if (u.scalar_type() == at::kDouble) {
    return backward_impl(Scan<double>(u, delta, A, B, C, D, z, delta_bias, delta_softplus, gap), grad_out, u);
  }
  return backward_impl(Scan<float>(u, delta, A, B, C, D, z, delta_bias, delta_softplus, gap), grad_out, u);
}

}  // namespace mambaprune_cpu
