// The CPU kernels of the mambaprune_cpu ops, in one translation unit (one compile, a few seconds).
//
// Built on first use by mambaprune/runtime/cpu_kernels.py (torch.utils.cpp_extension.load). The
// schemas and fake kernels are defined in Python (scan_cpp.py, ssd_cpp.py, token_ops_cpp.py), so the ops exist,
// and trace, whether or not this library could be built; it only adds their CPU kernels.

#include <torch/library.h>

#include "scan.h"
#include "ssd.h"
#include "token_ops.h"

TORCH_LIBRARY_IMPL(mambaprune_cpu, CPU, m) {
  m.impl("scan_forward", &mambaprune_cpu::scan_forward);
  m.impl("scan_backward", &mambaprune_cpu::scan_backward);
  m.impl("ssd_forward", &mambaprune_cpu::ssd_forward);
  m.impl("ssd_backward", &mambaprune_cpu::ssd_backward);
  m.impl("pos_conv1d_forward", &mambaprune_cpu::pos_conv1d_forward);
  m.impl("pos_conv1d_backward", &mambaprune_cpu::pos_conv1d_backward);
  m.impl("pos_conv2d_forward", &mambaprune_cpu::pos_conv2d_forward);
  m.impl("pos_conv2d_backward", &mambaprune_cpu::pos_conv2d_backward);
}
