// pos_conv1d's forward on channels-first rows: x (batch, C, K) with the kept tokens contiguous per channel.
//
// This is the layout Mamba mixers hand the conv (x of in_proj's output, (batch, E, L)); the gathered
// kernel of token_ops.h wants tokens-last rows, so it paid two transposes per call, more than its
// arithmetic. Here every channel row is convolved in place, vectorised over kept tokens:
//
//   out[b, c, k] = bias[c] + sum over slot shifts s of  coef_s[b, c, k] * x[b, c, k + s]
//   coef_s[b, c, k] = sum over taps j of  hit[s, j][b, k] * weight[c, j]   (one (s, j) pair at a time)
//
// hit[s, j][b, k] is 1 when the kept token s slots away from k is the original neighbour under tap j
// (pos[k + s] == pos[k] + j - left). Positions strictly increase, so a token s slots away is at least
// |s| positions away on the same side: only taps with j - left on the side of s and |j - left| >= |s|
// can hit (for the causal conv, W = 4 and left = 3: 7 (s, j) pairs instead of 16), and shift 0 always
// hits tap `left`. The hit masks depend on (b, k) only: built once per call, shared by all channels.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "common.h"

namespace mambaprune_cpu {

// The (s, j) pairs with s != 0 that can hit, and their masks: mask[pair][b * padded + k] (zeros beyond K).
template <typename T>
struct ShiftHits {
  std::vector<int64_t> shift, tap;
  std::vector<T> mask;
};

template <typename T>
ShiftHits<T> shift_hits(const at::Tensor& pos, int64_t taps, int64_t left, int64_t padded) {
  const View<int64_t> p(pos);
  const int64_t batch = pos.size(0), K = pos.size(1);
  ShiftHits<T> hits;
  for (int64_t s = -left; s < taps - left; ++s) {
    for (int64_t j = 0; j < taps && s != 0 && -K < s && s < K; ++j) {
      const int64_t offset = j - left;
      if ((s < 0 && offset <= s) || (s > 0 && offset >= s)) {
        hits.shift.push_back(s);
        hits.tap.push_back(j);
      }
    }
  }
  hits.mask.assign(hits.shift.size() * batch * padded, T(0));
  for (size_t i = 0; i < hits.shift.size(); ++i) {
    const int64_t s = hits.shift[i];
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t* row = p.data + b * p.strides[0];
      T* m = hits.mask.data() + (i * batch + b) * padded;
      for (int64_t k = std::max<int64_t>(0, -s); k < std::min(K, K - s); ++k) {
        m[k] = T(row[(k + s) * p.strides[1]] - row[k * p.strides[1]] + left == hits.tap[i]);
      }
    }
  }
  return hits;
}

// out (batch, C, K) contiguous; x (batch, C, K) with x.stride(2) == 1; weight (C, taps) any strides.
template <typename T>
at::Tensor conv1d_rows_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& pos, int64_t left) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t batch = x.size(0), C = x.size(1), K = x.size(2), taps = weight.size(1);
  const int64_t padded = (K + V - 1) / V * V;
  // each row is copied into a zero-padded buffer so that shifted loads never leave it
  const int64_t lead = ((left + V - 1) / V) * V, trail = taps - 1 - left;
  const ShiftHits<T> hits = shift_hits<T>(pos, taps, left, padded);
  const int64_t pairs = hits.shift.size();
  const at::Tensor w = weight.contiguous();
  const T* w_p = w.data_ptr<T>();
  const at::Tensor bias_c = bias ? bias->contiguous() : at::Tensor();
  const T* bias_p = bias ? bias_c.data_ptr<T>() : nullptr;
  const View<T> xv(x);
  const int64_t x_b = xv.strides[0], x_c = xv.strides[1];
  at::Tensor out = at::empty({batch, C, K}, x.options());
  T* o = out.data_ptr<T>();
  at::parallel_for(0, batch * C, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> buffer(lead + padded + trail + V, T(0));
    std::vector<Vec> pair_weight(pairs);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / C, c = row % C;
      const T* src = xv.data + b * x_b + c * x_c;
      std::copy(src, src + K, buffer.data() + lead);
      const T* xr = buffer.data() + lead;
      const T* w_c = w_p + c * taps;
      for (int64_t i = 0; i < pairs; ++i) pair_weight[i] = Vec(w_c[hits.tap[i]]);
      const Vec centre(w_c[left]), init(bias_p ? bias_p[c] : T(0));
      const T* masks = hits.mask.data() + b * padded;
      T* orow = o + row * K;
      for (int64_t k0 = 0; k0 < K; k0 += V) {
        Vec acc = at::vec::fmadd(centre, Vec::loadu(xr + k0), init);
        for (int64_t i = 0; i < pairs; ++i) {
          const Vec hit = Vec::loadu(masks + i * batch * padded + k0);
          acc = at::vec::fmadd(hit * pair_weight[i], Vec::loadu(xr + k0 + hits.shift[i]), acc);
        }
        const int64_t lanes = std::min<int64_t>(V, K - k0);
        if (lanes == V) acc.store(orow + k0);
        else acc.store(orow + k0, lanes);
      }
    }
  });
  return out;
}

}  // namespace mambaprune_cpu
