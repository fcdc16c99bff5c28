// Runs an AOTInductor package written by `PrunedModel.export(path, format="aoti")` without Python.
//
//   aoti_run PACKAGE INPUT OUTPUT BATCH C H W [REPEATS]
//
// INPUT holds BATCH*C*H*W float32 values (raw, little-endian); the first output is written to OUTPUT
// the same way. With REPEATS > 0 it also prints the mean latency of REPEATS runs after one warm-up.
// The mambaprune:: ops come from libmambaprune_ops.so (mambaprune_ops.cpp), linked in.

#include <chrono>
#include <fstream>
#include <iostream>
#include <vector>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

int main(int argc, char** argv) {
  if (argc < 8) {
    std::cerr << "usage: aoti_run PACKAGE INPUT OUTPUT BATCH C H W [REPEATS]\n";
    return 2;
  }
  const int64_t batch = std::stoll(argv[4]), c = std::stoll(argv[5]), h = std::stoll(argv[6]), w = std::stoll(argv[7]);
  const int repeats = argc > 8 ? std::stoi(argv[8]) : 0;
  torch::Tensor x = torch::empty({batch, c, h, w}, torch::kFloat);
  std::ifstream in(argv[2], std::ios::binary);
  in.read(reinterpret_cast<char*>(x.data_ptr<float>()), x.numel() * sizeof(float));
  if (!in) {
    std::cerr << "cannot read " << x.numel() << " floats from " << argv[2] << "\n";
    return 1;
  }
  torch::NoGradGuard no_grad;
  torch::inductor::AOTIModelPackageLoader loader(argv[1]);
  std::vector<torch::Tensor> outputs = loader.run({x});
  torch::Tensor y = outputs.at(0).contiguous().to(torch::kFloat);
  std::ofstream out(argv[3], std::ios::binary);
  out.write(reinterpret_cast<const char*>(y.data_ptr<float>()), y.numel() * sizeof(float));
  std::cout << "output " << y.sizes() << "\n";
  if (repeats > 0) {
    loader.run({x});
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < repeats; ++i) loader.run({x});
    const std::chrono::duration<double, std::milli> elapsed = std::chrono::steady_clock::now() - start;
    std::cout << "ms_per_run " << elapsed.count() / repeats << "\n";
  }
  return 0;
}
