// Depthwise convolutions over kept tokens at their original positions: pos_conv1d and pos_conv2d.
//
// The CPU kernels of torch.ops.mambaprune_cpu.pos_conv{1,2}d_{forward,backward} (registered in
// cpu_kernels.cpp; schemas and fake kernels in token_ops_cpp.py). Both ops are one "gathered"
// depthwise conv: under tap j, kept token k of sample b reads the kept token in slot nb[b, k, j], or
// nothing when that neighbour was pruned (it contributes zero). The neighbour table is built from
// pos once per call; the conv is then vectorised over channels, one task per (sample, block of
// channels), with no (batch, C, H * W) grid and no per-tap torch ops. Forward and backward share it.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "common.h"

namespace mambaprune_cpu {

// table[(b * K + k) * taps + j]: the slot read by tap j of kept token k of sample b, or -1.
struct Neighbours {
  int64_t batch, tokens, taps;
  std::vector<int64_t> table;

  const int64_t* row(int64_t b, int64_t k) const { return table.data() + (b * tokens + k) * taps; }
};

// pos_conv1d: tap j of token k reads original position pos[k] + j - left. Positions strictly
// increase, so that token (if kept) sits at most |j - left| slots away, on the same side.
inline Neighbours conv1d_neighbours(const at::Tensor& pos, int64_t taps, int64_t left) {
  const View<int64_t> p(pos);
  Neighbours nb{pos.size(0), pos.size(1), taps, {}};
  nb.table.assign(nb.batch * nb.tokens * taps, -1);
  at::parallel_for(0, nb.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t* row = p.data + b * p.strides[0];
      const int64_t step = p.strides[1];
      for (int64_t k = 0; k < nb.tokens; ++k) {
        for (int64_t shift = -left; shift < taps - left; ++shift) {
          const int64_t other = k + shift;
          if (other < 0 || other >= nb.tokens) continue;
          const int64_t tap = row[other * step] - row[k * step] + left;
          if (tap >= 0 && tap < taps) nb.table[(b * nb.tokens + k) * taps + tap] = other;
        }
      }
    }
  });
  return nb;
}

// pos_conv2d: tap (i, j) of the token in cell (r, c) = divmod(pos[k], width) reads cell
// (r + i - padding, c + j - padding) of the height x width grid, if it is inside and kept.
inline Neighbours conv2d_neighbours(const at::Tensor& pos, int64_t height, int64_t width, int64_t kh, int64_t kw,
                                    int64_t padding) {
  const View<int64_t> p(pos);
  Neighbours nb{pos.size(0), pos.size(1), kh * kw, {}};
  nb.table.assign(nb.batch * nb.tokens * nb.taps, -1);
  at::parallel_for(0, nb.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> slot_of(height * width);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t* row = p.data + b * p.strides[0];
      const int64_t step = p.strides[1];
      std::fill(slot_of.begin(), slot_of.end(), -1);
      for (int64_t k = 0; k < nb.tokens; ++k) {
        const int64_t cell = row[k * step];
        TORCH_CHECK(cell >= 0 && cell < height * width, "pos_conv2d: pos must hold grid cells in [0, ",
                    height * width, "); got ", cell);
        slot_of[cell] = k;
      }
      for (int64_t k = 0; k < nb.tokens; ++k) {
        const int64_t r = row[k * step] / width, c = row[k * step] % width;
        int64_t* out = nb.table.data() + (b * nb.tokens + k) * nb.taps;
        for (int64_t i = 0; i < kh; ++i) {
          for (int64_t j = 0; j < kw; ++j) {
            const int64_t rr = r + i - padding, cc = c + j - padding;
            if (rr >= 0 && rr < height && cc >= 0 && cc < width) out[i * kw + j] = slot_of[rr * width + cc];
          }
        }
      }
    }
  });
  return nb;
}

// x: (batch, C, K) view (any strides); weight: (C, taps) view. One channel block's tap weights.
template <typename T>
std::vector<Vectorized<T>> tap_weights(const View<T>& w, int64_t c0, int64_t lanes, int64_t taps) {
  std::vector<Vectorized<T>> out(taps);
  for (int64_t j = 0; j < taps; ++j) out[j] = load_strided(w.data + c0 * w.strides[0] + j * w.strides[1], w.strides[0], lanes);
  return out;
}

// out[b, c, k] = bias[c] + sum_j weight[c, j] * x[b, c, nb[b, k, j]]; out is (batch, C, K) contiguous,
// or (batch, K, C) contiguous when tokens_last (then returned in that shape).
template <typename T>
at::Tensor gathered_conv_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const Neighbours& nb, bool tokens_last) {
  const int64_t batch = x.size(0), C = x.size(1), K = x.size(2), taps = nb.taps;
  at::Tensor out = tokens_last ? at::empty({batch, K, C}, x.options()) : at::empty({batch, C, K}, x.options());
  const int64_t o_c = tokens_last ? 1 : K, o_k = tokens_last ? C : 1;
  const View<T> xv(x), wv(weight), bv(bias);
  T* o = out.data_ptr<T>();
  const int64_t blocks = channel_blocks<T>(C);
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, c0 = (task % blocks) * Vectorized<T>::size();
      const int64_t lanes = block_lanes<T>(C, task % blocks);
      const auto w = tap_weights(wv, c0, lanes, taps);
      const Vectorized<T> b_v = bv.present() ? load_strided(bv.data + c0 * bv.strides[0], bv.strides[0], lanes)
                                             : Vectorized<T>(T(0));
      for (int64_t k = 0; k < K; ++k) {
        Vectorized<T> acc = b_v;
        const int64_t* row = nb.row(b, k);
        for (int64_t j = 0; j < taps; ++j) {
          if (row[j] >= 0) acc = at::vec::fmadd(w[j], load_channels(xv, b, c0, row[j], lanes), acc);
        }
        store_strided(acc, o + b * C * K + c0 * o_c + k * o_k, o_c, lanes);
      }
    }
  });
  return out;
}

// Gradients of sum(grad_out * out): {x (shaped like out), weight (C, taps), bias (C,)}.
template <typename T>
std::vector<at::Tensor> gathered_conv_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                               const at::Tensor& weight, const Neighbours& nb, bool tokens_last) {
  using Vec = Vectorized<T>;
  const int64_t batch = x.size(0), C = x.size(1), K = x.size(2), taps = nb.taps;
  at::Tensor gx = tokens_last ? at::empty({batch, K, C}, x.options()) : at::empty({batch, C, K}, x.options());
  at::Tensor gw = at::empty({batch, C, taps}, x.options()), gb = at::empty({batch, C}, x.options());
  const int64_t o_c = tokens_last ? 1 : K, o_k = tokens_last ? C : 1;
  const View<T> gv(grad_out), xv(x), wv(weight);
  T *gx_p = gx.data_ptr<T>(), *gw_p = gw.data_ptr<T>(), *gb_p = gb.data_ptr<T>();
  const int64_t blocks = channel_blocks<T>(C);
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, c0 = (task % blocks) * Vec::size(), lanes = block_lanes<T>(C, task % blocks);
      const auto w = tap_weights(wv, c0, lanes, taps);
      std::vector<Vec> grad_x(K, Vec(T(0))), grad_w(taps, Vec(T(0)));
      Vec grad_b(T(0));
      for (int64_t k = 0; k < K; ++k) {
        const Vec gy = load_channels(gv, b, c0, k, lanes);
        grad_b = grad_b + gy;
        const int64_t* row = nb.row(b, k);
        for (int64_t j = 0; j < taps; ++j) {
          if (row[j] < 0) continue;
          grad_x[row[j]] = at::vec::fmadd(w[j], gy, grad_x[row[j]]);
          grad_w[j] = at::vec::fmadd(gy, load_channels(xv, b, c0, row[j], lanes), grad_w[j]);
        }
      }
      for (int64_t k = 0; k < K; ++k) store_strided(grad_x[k], gx_p + b * C * K + c0 * o_c + k * o_k, o_c, lanes);
      for (int64_t j = 0; j < taps; ++j) store_strided(grad_w[j], gw_p + (b * C + c0) * taps + j, taps, lanes);
      store_strided(grad_b, gb_p + b * C + c0, int64_t(1), lanes);
    }
  });
  return {gx, gw.sum(0), gb.sum(0)};  // weight and bias: partial sums per sample, added up
}

inline void check_conv_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": float32 or float64 x only (other dtypes take the composite), got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && (!bias || bias->scalar_type() == x.scalar_type()), op,
              ": x, weight and bias must share one dtype");
}

// Dispatch on the dtype: f<float> or f<double>.
template <typename F>
auto by_dtype(const at::Tensor& x, F&& f) {
  return x.scalar_type() == at::kDouble ? f(double()) : f(float());
}

// x: (batch, C, K), weight: (C, 1, W), pos: (batch, K) strictly increasing. Returns (batch, C, K).
inline at::Tensor pos_conv1d_forward(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, const at::Tensor& pos, int64_t left) {
  check_conv_inputs("pos_conv1d", x, weight, bias);
  const auto nb = conv1d_neighbours(pos, weight.size(-1), left);
  const at::Tensor w = weight.reshape({weight.size(0), -1});
  return by_dtype(x, [&](auto t) { return gathered_conv_forward<decltype(t)>(x, w, bias, nb, false); });
}

inline std::vector<at::Tensor> pos_conv1d_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                   const at::Tensor& weight, const at::Tensor& pos, int64_t left) {
  check_conv_inputs("pos_conv1d", x, weight, std::nullopt);
  const auto nb = conv1d_neighbours(pos, weight.size(-1), left);
  const at::Tensor w = weight.reshape({weight.size(0), -1});
  auto grads = by_dtype(x, [&](auto t) { return gathered_conv_backward<decltype(t)>(grad_out, x, w, nb, false); });
  grads[1] = grads[1].reshape(weight.sizes());
  return grads;
}

// x: (batch, K, C) tokens-last, weight: (C, 1, kh, kw), pos: (batch, K) cells. Returns (batch, K, C).
inline at::Tensor pos_conv2d_forward(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, const at::Tensor& pos, int64_t height,
                                     int64_t width, int64_t padding) {
  check_conv_inputs("pos_conv2d", x, weight, bias);
  const auto nb = conv2d_neighbours(pos, height, width, weight.size(-2), weight.size(-1), padding);
  const at::Tensor w = weight.reshape({weight.size(0), -1}), xt = x.transpose(1, 2);
  return by_dtype(x, [&](auto t) { return gathered_conv_forward<decltype(t)>(xt, w, bias, nb, true); });
}

inline std::vector<at::Tensor> pos_conv2d_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                   const at::Tensor& weight, const at::Tensor& pos, int64_t height,
                                                   int64_t width, int64_t padding) {
  check_conv_inputs("pos_conv2d", x, weight, std::nullopt);
  const auto nb = conv2d_neighbours(pos, height, width, weight.size(-2), weight.size(-1), padding);
  const at::Tensor w = weight.reshape({weight.size(0), -1});
  auto grads = by_dtype(x, [&](auto t) {
    return gathered_conv_backward<decltype(t)>(grad_out.transpose(1, 2), x.transpose(1, 2), w, nb, true);
  });
  grads[1] = grads[1].reshape(weight.sizes());
  return grads;
}

}  // namespace mambaprune_cpu
