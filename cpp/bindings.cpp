// The Python extension module llama_mm._C. Loading it registers the torch.ops.llama_mm.* operators
// (op_library.cpp, cuda/*.cu); pybind11 bindings for stateful objects go here.
#include <torch/extension.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "llama_mm native kernels; the ops are torch.ops.llama_mm.*";
#ifdef LLAMA_MM_WITH_CUDA
  m.attr("cuda_kernels") = true;
#else
  m.attr("cuda_kernels") = false;
#endif
}
