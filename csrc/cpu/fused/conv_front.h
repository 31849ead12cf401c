// The front end that the depthwise-convolution ops share: the clustering head
// (conv_cluster_logits.cpp) and the MLP ops (mlp_dwconv.cpp, mlp_fused.cpp). Argument checks of an
// (H, W) grid of tokens with a depthwise weight, the split of the images into bands of rows, and
// the zero-padded band the portable convolution reads (cpu/math/dwconv.h).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "common/check.h"
#include "cpu/math/tensor_access.h"

namespace paca_kernels::cpu {

// How the B images of an H x W grid are cut into bands of whole rows, one band per task: about
// `tokens` patches per band, halved until there are two bands per thread (small B), then evened
// out (H = 28, 9 rows: 4 x 7 rather than 3 x 9 + 1) so that no task is a sliver. Returns
// {rows per band, bands per image}.
inline std::pair<int64_t, int64_t> row_bands(int64_t B, int64_t H, int64_t W, int64_t tokens) {
  int64_t rows = std::clamp<int64_t>(tokens / W, 1, H);
  const int64_t want = 2 * static_cast<int64_t>(at::get_num_threads());
  while (rows > 1 && B * ((H + rows - 1) / rows) < want) rows = (rows + 1) / 2;
  const int64_t bands = (H + rows - 1) / rows;
  return {(H + bands - 1) / bands, bands};  // ceil(H / that) is `bands` again
}

// The zero-padded band of image rows y0 - pad .. y0 + nr + pad - 1 of image b of x (B, N, C), read
// through its strides, as acc_t ((nr + k - 1) x (W + k - 1) x C): the input of dwconv_band.
//
// in_bias (C,), if given, is added to every pixel inside the image (not to the zero padding): the
// band is then that of x + in_bias, e.g. of a linear layer's output whose bias was left out.
template <typename scalar_t, typename acc_t>
void load_band(const scalar_t* xp, const Strides& sx, int64_t b, int64_t y0, int64_t nr, int64_t H,
               int64_t W, int64_t C, int64_t k, acc_t* band, const acc_t* in_bias = nullptr) {
  const int64_t pad = (k - 1) / 2, in_w = W + k - 1;
  for (int64_t r = 0; r < nr + k - 1; ++r) {
    const int64_t y = y0 - pad + r;
    acc_t* drow = band + r * in_w * C;
    if (y < 0 || y >= H) {
      std::fill(drow, drow + in_w * C, acc_t(0));
      continue;
    }
    std::fill(drow, drow + pad * C, acc_t(0));
    std::fill(drow + (pad + W) * C, drow + in_w * C, acc_t(0));
    acc_t* dst = drow + pad * C;
    const scalar_t* xr = xp + b * sx[0] + y * W * sx[1];
    if (sx[2] == 1 && sx[1] == C) {  // the image row is one contiguous run of W * C values
      if (in_bias != nullptr) {  // x + in_bias in the same pass
        for (int64_t j = 0; j < W; ++j) {
          const scalar_t* xv = xr + j * C;
          acc_t* dv = dst + j * C;
          // x streams from memory: 4 KiB ahead, one line at a time (as in mlp_dwconv_bwd.cpp).
          for (int64_t c = 0; c < C; c += 64 / sizeof(scalar_t)) {
            __builtin_prefetch(xv + c + 4096 / sizeof(scalar_t));
          }
          for (int64_t c = 0; c < C; ++c) dv[c] = static_cast<acc_t>(xv[c]) + in_bias[c];
        }
        continue;
      }
      for (int64_t i = 0; i < W * C; ++i) dst[i] = static_cast<acc_t>(xr[i]);
    } else if (sx[2] == 1) {
      for (int64_t j = 0; j < W; ++j) {
        for (int64_t c = 0; c < C; ++c) dst[j * C + c] = static_cast<acc_t>(xr[j * sx[1] + c]);
      }
    } else {
      for (int64_t j = 0; j < W; ++j) {
        for (int64_t c = 0; c < C; ++c) dst[j * C + c] = static_cast<acc_t>(xr[j * sx[1] + c * sx[2]]);
      }
    }
    if (in_bias != nullptr) {
      for (int64_t j = 0; j < W; ++j) {
        for (int64_t c = 0; c < C; ++c) dst[j * C + c] += in_bias[c];
      }
    }
  }
}

// x (B, N, C) floating tokens of an H x W grid (N = H*W, C > 0) and a depthwise weight
// (channels, 1, k, k) with k odd (channels: C unless given, e.g. the MLP's hidden width); returns k.
inline int64_t check_grid_and_depthwise(const char* op, const at::Tensor& x, int64_t H,
                                        int64_t W, const at::Tensor& dw, const char* dw_name,
                                        int64_t channels = -1) {
  check_dim(x, 3, op, "x", "(B, N, C)");
  check_supported_float(x, op, "x");
  const int64_t N = x.size(1), C = x.size(2);
  TORCH_CHECK(H > 0 && W > 0 && H * W == N, op, ": expected H * W == N with H, W > 0, got H=", H,
              ", W=", W, ", N=", N);
  TORCH_CHECK(C > 0, op, ": expected C > 0 channels");
  const int64_t ch = channels < 0 ? C : channels;
  TORCH_CHECK(dw.dim() == 4 && dw.size(2) == dw.size(3) && dw.size(2) % 2 == 1, op, ": expected ",
              dw_name, " of shape (", ch, ", 1, k, k) with k odd, got ", dw.sizes());
  const int64_t k = dw.size(2);
  check_param(op, dw, x, {ch, 1, k, k}, dw_name);
  return k;
}


}  // namespace paca_kernels::cpu
