// Runs an AOTInductor package of a paca_kernels model from C++, without Python.
//
//   TORCH=$(python -c "import torch, os; print(os.path.dirname(torch.__file__))")
//   g++ -std=c++20 examples/run_aoti_package.cpp -o run_aoti_package -I$TORCH/include \
//       -I$TORCH/include/torch/csrc/api/include -L$TORCH/lib -ltorch -ltorch_cpu -lc10 -ldl
//   LD_LIBRARY_PATH=$TORCH/lib ./run_aoti_package model.pt2 paca_kernels/_C.cpython-311-x86_64-linux-gnu.so
//
// The package calls the fused ops through the dispatcher (extern kernels), so the op library must be
// loaded before the package: dlopen runs its static initialisers, which register the ops. RTLD_LAZY,
// because the library's one Python symbol (PyModule_Create2, used only when Python imports it) has no
// definition in a process without libpython, and RTLD_NOW would refuse to load it.

#include <dlfcn.h>

#include <iostream>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: " << argv[0] << " model.pt2 path/to/paca_kernels/_C*.so [batch]\n";
    return 2;
  }
  if (dlopen(argv[2], RTLD_LAZY | RTLD_GLOBAL) == nullptr) {
    std::cerr << "cannot load the op library: " << dlerror() << "\n";
    return 1;
  }
  torch::NoGradGuard no_grad;
  torch::inductor::AOTIModelPackageLoader loader(argv[1]);
  const int64_t batch = argc > 3 ? std::stoll(argv[3]) : 2;
  // The input size the package was exported with (here a 64x64 test model; 224 for ImageNet).
  auto x = torch::ones({batch, 3, 64, 64});
  auto out = loader.run({x});
  std::cout << "output " << out[0].sizes() << ", sum " << out[0].sum().item<float>() << "\n";
  return 0;
}
