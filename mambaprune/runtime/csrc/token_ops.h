// Depthwise convolutions over kept tokens at their original positions: pos_conv1d and pos_conv2d.
//
// The CPU kernels of torch.ops.mambaprune_cpu.pos_conv{1,2}d_{forward,backward} (registered in
// cpu_kernels.cpp; schemas and fake kernels in token_ops_cpp.py). Both ops are one "gathered"
// depthwise conv: under tap j, kept token k of sample b reads the kept token in slot nb[b, k, j], or
// nothing when that neighbour was pruned (it contributes zero). The neighbour table is built from
// pos once per call; the conv is then vectorised over channels, one task per (sample, tile of kept
// tokens), with no (batch, C, H * W) grid and no per-tap torch ops. Forward and backward share it
// (the backward's gradient of x is a gather through the transposed table: no scatter, no races).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "common.h"
#include "conv1d_rows.h"

namespace mambaprune_cpu {

// table[(b * K + k) * taps + j]: the slot read by tap j of kept token k of sample b, or -1.
struct Neighbours {
  int64_t batch, tokens, taps;
  std::vector<int64_t> table;

  const int64_t* row(int64_t b, int64_t k) const { return table.data() + (b * tokens + k) * taps; }

  // The readers of each slot: transposed[b, s, j] = the kept token k with table[b, k, j] == s, or -1
  // (unique: token k reads under tap j the one original position pos[k] + j - left, resp. its cell).
  Neighbours transposed() const {
    Neighbours out{batch, tokens, taps, std::vector<int64_t>(table.size(), -1)};
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t k = 0; k < tokens; ++k) {
        for (int64_t j = 0; j < taps; ++j) {
          const int64_t s = row(b, k)[j];
          if (s >= 0) out.table[(b * tokens + s) * taps + j] = k;
        }
      }
    }
    return out;
  }
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

// Kept tokens per task. Every array is tokens-last (rows of C contiguous channels): a kept token's
// neighbours are whole rows, read with plain vector loads and no per-lane strides.
constexpr int64_t kTokensPerTask = 32;

// A (batch, C, K) or (batch, K, C) tensor as a contiguous tokens-last (batch, K, C) one (no copy when
// it already is: a transposed view of a (batch, K, C) tensor, as the models pass it).
inline at::Tensor tokens_last_rows(const at::Tensor& t, bool channels_first) {
  return channels_first ? t.transpose(1, 2).contiguous() : t.contiguous();
}

// weight (C, taps) view -> (taps, C) contiguous: tap j's weights are one row.
template <typename T>
std::vector<T> taps_major(const at::Tensor& weight) {
  const View<T> w(weight);
  const int64_t C = weight.size(0), taps = weight.size(1);
  std::vector<T> out(taps * C);
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t j = 0; j < taps; ++j) out[j * C + c] = w.data[c * w.strides[0] + j * w.strides[1]];
  }
  return out;
}

// out[c] = init[c] (or 0) + sum over taps j with a kept neighbour of w[j, c] * rows[slot[j], c].
// One vector of channels at a time, summed over (up to kTapGroup) taps in a register: out is written
// once per group of taps (once for every Mamba conv; a 7x7 kernel has 49 taps).
constexpr int64_t kTapGroup = 64;

template <typename T>
void gather_taps(const T* rows, int64_t C, const int64_t* slot, int64_t taps, const T* w, const T* init, T* out) {
  using Vec = Vectorized<T>;
  const T* src[kTapGroup];
  const T* w_j[kTapGroup];
  int64_t j = 0;
  do {
    int64_t hits = 0;
    for (; j < taps && hits < kTapGroup; ++j) {
      if (slot[j] < 0) continue;
      src[hits] = rows + slot[j] * C;
      w_j[hits++] = w + j * C;
    }
    for (int64_t c = 0; c < C; c += Vec::size()) {
      const int64_t lanes = std::min<int64_t>(Vec::size(), C - c);
      Vec acc = init ? Vec::loadu(init + c, lanes) : Vec(T(0));
      for (int64_t h = 0; h < hits; ++h) {
        acc = at::vec::fmadd(Vec::loadu(w_j[h] + c, lanes), Vec::loadu(src[h] + c, lanes), acc);
      }
      acc.store(out + c, lanes);
    }
    init = out;  // a later group adds to what this one wrote
  } while (j < taps);
}

// acc[c] += a[c] * b[c] (or += a[c] when b is null).
template <typename T>
void accumulate(T* acc, const T* a, const T* b, int64_t C) {
  using Vec = Vectorized<T>;
  for (int64_t c = 0; c < C; c += Vec::size()) {
    const int64_t lanes = std::min<int64_t>(Vec::size(), C - c);
    const Vec sum = b ? at::vec::fmadd(Vec::loadu(a + c, lanes), Vec::loadu(b + c, lanes), Vec::loadu(acc + c, lanes))
                      : Vec::loadu(acc + c, lanes) + Vec::loadu(a + c, lanes);
    sum.store(acc + c, lanes);
  }
}

// A tile of rows [k0, k1) x C -> out (batch, K, C) when tokens_last, else columns of (batch, C, K).
template <typename T>
void write_tile(T* out, int64_t b, int64_t k0, int64_t k1, int64_t C, int64_t K, bool tokens_last, const T* tile) {
  if (tokens_last) {
    std::copy(tile, tile + (k1 - k0) * C, out + (b * K + k0) * C);
  } else {
    at::vec::transpose_mxn<T>(tile, C, out + b * C * K + k0, K, k1 - k0, C);
  }
}

// For every task (sample b, kept tokens [k0, k1)): f(b, k0, k1, task), with a (kTokensPerTask, C) tile.
template <typename T, typename F>
void for_each_tile(int64_t batch, int64_t K, int64_t C, F&& f) {
  const int64_t per_sample = (K + kTokensPerTask - 1) / kTokensPerTask;
  at::parallel_for(0, batch * per_sample, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> tile(kTokensPerTask * C);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / per_sample, k0 = (task % per_sample) * kTokensPerTask;
      f(b, k0, std::min(K, k0 + kTokensPerTask), task, tile.data());
    }
  });
}

// out[b, k, c] = bias[c] + sum_j weight[c, j] * x[b, nb[b, k, j], c]; x: contiguous (batch, K, C).
// The result is (batch, K, C) when tokens_last, else (batch, C, K), contiguous either way.
template <typename T>
at::Tensor gathered_conv_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const Neighbours& nb, bool tokens_last) {
  const int64_t batch = x.size(0), K = x.size(1), C = x.size(2);
  at::Tensor out = tokens_last ? at::empty({batch, K, C}, x.options()) : at::empty({batch, C, K}, x.options());
  const std::vector<T> w = taps_major<T>(weight);
  const at::Tensor b_row = bias ? bias->contiguous() : at::Tensor();
  const T *rows = x.data_ptr<T>(), *init = bias ? b_row.data_ptr<T>() : nullptr;
  T* o = out.data_ptr<T>();
  for_each_tile<T>(batch, K, C, [&](int64_t b, int64_t k0, int64_t k1, int64_t, T* tile) {
    for (int64_t k = k0; k < k1; ++k) {
      gather_taps(rows + b * K * C, C, nb.row(b, k), nb.taps, w.data(), init, tile + (k - k0) * C);
    }
    write_tile(o, b, k0, k1, C, K, tokens_last, tile);
  });
  return out;
}

// Gradients of sum(grad_out * out) for contiguous (batch, K, C) x and grad_out: {x (shaped like out),
// weight (C, taps), bias (C,)}. The gradient of x is a gather too: the readers of a slot under each
// tap form the transposed table, so tiles never write each other's rows.
template <typename T>
std::vector<at::Tensor> gathered_conv_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                               const at::Tensor& weight, const Neighbours& nb, bool tokens_last) {
  const int64_t batch = x.size(0), K = x.size(1), C = x.size(2), taps = nb.taps;
  const int64_t tasks = batch * ((K + kTokensPerTask - 1) / kTokensPerTask);
  at::Tensor gx = tokens_last ? at::empty({batch, K, C}, x.options()) : at::empty({batch, C, K}, x.options());
  at::Tensor gw = at::zeros({tasks, taps, C}, x.options()), gb = at::zeros({tasks, C}, x.options());
  const std::vector<T> w = taps_major<T>(weight);
  const Neighbours readers = nb.transposed();
  const T *rows = x.data_ptr<T>(), *grad_rows = grad_out.data_ptr<T>();
  T *gx_p = gx.data_ptr<T>(), *gw_p = gw.data_ptr<T>(), *gb_p = gb.data_ptr<T>();
  for_each_tile<T>(batch, K, C, [&](int64_t b, int64_t k0, int64_t k1, int64_t task, T* tile) {
    const T *x_b = rows + b * K * C, *g_b = grad_rows + b * K * C;
    T *gw_task = gw_p + task * taps * C, *gb_task = gb_p + task * C;
    for (int64_t k = k0; k < k1; ++k) {
      gather_taps(g_b, C, readers.row(b, k), taps, w.data(), static_cast<const T*>(nullptr), tile + (k - k0) * C);
      const int64_t* slot = nb.row(b, k);
      accumulate(gb_task, g_b + k * C, static_cast<const T*>(nullptr), C);
      for (int64_t j = 0; j < taps; ++j) {
        if (slot[j] >= 0) accumulate(gw_task + j * C, g_b + k * C, x_b + slot[j] * C, C);
      }
    }
    write_tile(gx_p, b, k0, k1, C, K, tokens_last, tile);
  });
  // per-task partial sums of weight (taps, C) and bias, added up
  return {gx, gw.sum(0).t().contiguous(), gb.sum(0)};
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
  const at::Tensor w = weight.reshape({weight.size(0), -1});
  if (x.stride(2) == 1) {  // channel rows contiguous (what the mixers pass): no transposes
    return by_dtype(x, [&](auto t) { return conv1d_rows_forward<decltype(t)>(x, w, bias, pos, left); });
  }
  const auto nb = conv1d_neighbours(pos, weight.size(-1), left);
  const at::Tensor rows = tokens_last_rows(x, true);
  return by_dtype(x, [&](auto t) { return gathered_conv_forward<decltype(t)>(rows, w, bias, nb, false); });
}

inline std::vector<at::Tensor> pos_conv1d_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                   const at::Tensor& weight, const at::Tensor& pos, int64_t left) {
  check_conv_inputs("pos_conv1d", x, weight, std::nullopt);
  const auto nb = conv1d_neighbours(pos, weight.size(-1), left);
  const at::Tensor w = weight.reshape({weight.size(0), -1});
  const at::Tensor rows = tokens_last_rows(x, true), grad_rows = tokens_last_rows(grad_out, true);
  auto grads = by_dtype(x, [&](auto t) { return gathered_conv_backward<decltype(t)>(grad_rows, rows, w, nb, false); });
  grads[1] = grads[1].reshape(weight.sizes());
  return grads;
}

// x: (batch, K, C) tokens-last, weight: (C, 1, kh, kw), pos: (batch, K) cells. Returns (batch, K, C).
inline at::Tensor pos_conv2d_forward(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, const at::Tensor& pos, int64_t height,
                                     int64_t width, int64_t padding) {
  check_conv_inputs("pos_conv2d", x, weight, bias);
  const auto nb = conv2d_neighbours(pos, height, width, weight.size(-2), weight.size(-1), padding);
  const at::Tensor w = weight.reshape({weight.size(0), -1}), rows = tokens_last_rows(x, false);
  return by_dtype(x, [&](auto t) { return gathered_conv_forward<decltype(t)>(rows, w, bias, nb, true); });
}

inline std::vector<at::Tensor> pos_conv2d_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                   const at::Tensor& weight, const at::Tensor& pos, int64_t height,
                                                   int64_t width, int64_t padding) {
  check_conv_inputs("pos_conv2d", x, weight, std::nullopt);
  const auto nb = conv2d_neighbours(pos, height, width, weight.size(-2), weight.size(-1), padding);
  const at::Tensor w = weight.reshape({weight.size(0), -1});
  auto grads = by_dtype(x, [&](auto t) {
    return gathered_conv_backward<decltype(t)>(tokens_last_rows(grad_out, false), tokens_last_rows(x, false), w, nb,
                                               true);
  });
  grads[1] = grads[1].reshape(weight.sizes());
  return grads;
}

}  // namespace mambaprune_cpu
