// Fused CPU kernels for DynConv training: the masked residual add + ReLU, forward and backward. Each is one
// pass over the block's channels-last activations, where the equivalent ATen ops make two (forward) and four
// (backward); see dynconv/fused/__init__.py for the Python side and the eager specification they are tested
// against.
//
// Layout: activations are channels-last, i.e. rows of C values per pixel, pixel index (n * H + y) * W + x.
// The loops over channels carry `omp simd` so that they vectorise (reductions included) without -ffast-math.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace {

// Grain in pixels for at::parallel_for: enough work per task to amortise the thread hand-off.
constexpr int64_t kPixelGrain = 256;

void check_channels_last(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast), name,
              " must be a channels-last 4-d tensor");
}

template <typename scalar_t>
void masked_residual_relu_kernel(const scalar_t* identity, const scalar_t* residual, const scalar_t* hard,
                                 scalar_t* out, int64_t pixels, int64_t c) {
  at::parallel_for(0, pixels, kPixelGrain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const scalar_t m = hard[p];
      const scalar_t* id = identity + p * c;
      const scalar_t* res = residual + p * c;
      scalar_t* o = out + p * c;
#pragma omp simd
      for (int64_t ch = 0; ch < c; ++ch) o[ch] = std::max(id[ch] + m * res[ch], scalar_t(0));
    }
  });
}

// out = relu(identity + hard * residual); identity and residual channels-last (N, C, H, W), hard (N, 1, H, W).
at::Tensor masked_residual_relu(const at::Tensor& identity, const at::Tensor& residual, const at::Tensor& hard) {
  check_channels_last(identity, "identity");
  check_channels_last(residual, "residual");
  TORCH_CHECK(identity.sizes() == residual.sizes(), "identity and residual differ in shape");
  const int64_t c = identity.size(1), pixels = identity.numel() / c;
  auto h = hard.to(identity.dtype()).contiguous();
  TORCH_CHECK(h.numel() == pixels, "the mask must have one value per pixel");
  auto out = at::empty_like(identity, at::MemoryFormat::ChannelsLast);
  AT_DISPATCH_FLOATING_TYPES(identity.scalar_type(), "masked_residual_relu", [&] {
    masked_residual_relu_kernel<scalar_t>(identity.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(),
                                          h.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), pixels, c);
  });
  return out;
}

template <typename scalar_t>
void masked_residual_relu_backward_kernel(const scalar_t* grad, const scalar_t* out, const scalar_t* residual,
                                          const scalar_t* hard, scalar_t* grad_identity, scalar_t* grad_residual,
                                          scalar_t* grad_hard, int64_t pixels, int64_t c) {
  at::parallel_for(0, pixels, kPixelGrain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const scalar_t m = hard[p];
      const int64_t base = p * c;
      scalar_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t ch = 0; ch < c; ++ch) {
        const scalar_t g = scalar_t(out[base + ch] > 0) * grad[base + ch];  // branch-free: vectorises
        grad_identity[base + ch] = g;
        grad_residual[base + ch] = g * m;
        sum += g * residual[base + ch];
      }
      grad_hard[p] = sum;
    }
  });
}

// Gradients of masked_residual_relu from grad = dL/dout and its output: (identity's, residual's, hard's).
std::vector<at::Tensor> masked_residual_relu_backward(const at::Tensor& grad, const at::Tensor& out,
                                                      const at::Tensor& residual, const at::Tensor& hard) {
  auto g = grad.contiguous(at::MemoryFormat::ChannelsLast);
  check_channels_last(out, "out");
  check_channels_last(residual, "residual");
  const int64_t c = out.size(1), pixels = out.numel() / c;
  auto h = hard.to(out.dtype()).contiguous();
  auto grad_identity = at::empty_like(out, at::MemoryFormat::ChannelsLast);
  auto grad_residual = at::empty_like(out, at::MemoryFormat::ChannelsLast);
  auto grad_hard = at::empty_like(h);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "masked_residual_relu_backward", [&] {
    masked_residual_relu_backward_kernel<scalar_t>(
        g.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(),
        grad_identity.data_ptr<scalar_t>(), grad_residual.data_ptr<scalar_t>(), grad_hard.data_ptr<scalar_t>(),
        pixels, c);
  });
  return {grad_identity, grad_residual, grad_hard};
}

}  // namespace

TORCH_LIBRARY(dynconv_fused, m) {
  m.def("masked_residual_relu(Tensor identity, Tensor residual, Tensor hard) -> Tensor");
  m.def("masked_residual_relu_backward(Tensor grad, Tensor out, Tensor residual, Tensor hard) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(dynconv_fused, CPU, m) {
  m.impl("masked_residual_relu", &masked_residual_relu);
  m.impl("masked_residual_relu_backward", &masked_residual_relu_backward);
}
