// Helpers shared by the CPU kernels: strided tensor views read and written one vector of channels
// at a time, and the vectorised activations the kernels need (ATen's at::vec, Sleef exp/log1p).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace mambaprune_cpu {

using at::vec::Vectorized;

// A tensor's data pointer and strides (any layout, never copied).
template <typename T>
struct View {
  const T* data = nullptr;
  std::vector<int64_t> strides;

  View() = default;
  explicit View(const at::Tensor& t) : data(t.data_ptr<T>()), strides(t.strides().begin(), t.strides().end()) {}
  explicit View(const std::optional<at::Tensor>& t) {
    if (t.has_value()) *this = View(*t);
  }
  bool present() const { return data != nullptr; }
};

// Lanes [0, lanes) of x[b, c0 + i, t] (a 3-d tensor with channels on axis 1), zeros in the other lanes.
template <typename T>
Vectorized<T> load_channels(const View<T>& x, int64_t b, int64_t c0, int64_t t, int64_t lanes) {
  using Vec = Vectorized<T>;
  const T* p = x.data + b * x.strides[0] + c0 * x.strides[1] + t * x.strides[2];
  const int64_t step = x.strides[1];
  if (step == 1) return lanes == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, lanes);
  alignas(64) T buffer[Vec::size()] = {};
  for (int64_t i = 0; i < lanes; ++i) buffer[i] = p[i * step];
  return Vec::loadu(buffer);
}

// Lanes [0, lanes) of p[i * step], zeros in the other lanes (a per-channel parameter such as D).
template <typename T>
Vectorized<T> load_strided(const T* p, int64_t step, int64_t lanes) {
  alignas(64) T buffer[Vectorized<T>::size()] = {};
  for (int64_t i = 0; i < lanes; ++i) buffer[i] = p[i * step];
  return Vectorized<T>::loadu(buffer);
}

// Lanes [0, lanes) of v to p[i * step].
template <typename T>
void store_strided(const Vectorized<T>& v, T* p, int64_t step, int64_t lanes) {
  if (step == 1) {
    v.store(p, lanes);
    return;
  }
  alignas(64) T buffer[Vectorized<T>::size()];
  v.store(buffer);
  for (int64_t i = 0; i < lanes; ++i) p[i * step] = buffer[i];
}

// A token-major (length, Vec::size()) buffer of one block of channels -> rows out[first_row + i, :]
// of a contiguous (rows, length) array: each channel's row is written contiguously.
template <typename T>
void write_rows(T* out, int64_t first_row, int64_t length, int64_t lanes, const std::vector<T>& buffer) {
  at::vec::transpose_mxn<T>(buffer.data(), Vectorized<T>::size(), out + first_row * length, length, length, lanes);
}

template <typename T>
T reduce_lanes(const Vectorized<T>& v) {
  alignas(64) T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T sum = T(0);
  for (int64_t i = 0; i < Vectorized<T>::size(); ++i) sum += lanes[i];
  return sum;
}

template <typename T>
Vectorized<T> sigmoid(const Vectorized<T>& x) {
  const Vectorized<T> one(T(1));
  return one / (one + x.neg().exp());
}

// torch.nn.functional.softplus with beta 1 and threshold 20.
template <typename T>
Vectorized<T> softplus(const Vectorized<T>& x) {
  return Vectorized<T>::blendv(x.exp().log1p(), x, x > Vectorized<T>(T(20)));
}

// Blocks of at most Vec::size() channels over `channels`: how many, and the lanes of block j.
template <typename T>
int64_t channel_blocks(int64_t channels) {
  return (channels + Vectorized<T>::size() - 1) / Vectorized<T>::size();
}

template <typename T>
int64_t block_lanes(int64_t channels, int64_t j) {
  return std::min<int64_t>(Vectorized<T>::size(), channels - j * Vectorized<T>::size());
}

}  // namespace mambaprune_cpu
