// Fused CPU kernels for DynConv training: the masked residual add + ReLU, forward and backward. Each is one
// pass over the block's channels-last activations, where the equivalent ATen ops make two (forward) and four
// (backward). And for the sparse engine on CPUs: a depthwise conv at chosen positions, the masked residual add
// (+ ReLU) on the chosen rows, and a tiled mask unit's logits and masks. See dynconv/fused/__init__.py for the
// Python side and the eager specification they are tested against.
//
// Layout: activations are channels-last, i.e. rows of C values per pixel, pixel index (n * H + y) * W + x.
// The loops over channels carry `omp simd` so that they vectorise (reductions included) without -ffast-math.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
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

// One output row of depthwise_rows, channels [c0, c0 + B): B accumulators that stay in registers over the taps
// (B a compile-time constant, so the loops unroll and vectorise).
template <int64_t B>
inline void depthwise_row_block(const float* in, const float* w, const float* b, float* row, int64_t c0, int64_t c,
                                int64_t k, int64_t image, int64_t y, int64_t x, int64_t height, int64_t width) {
  float acc[B];
  for (int64_t i = 0; i < B; ++i) acc[i] = b[c0 + i];
  for (int64_t dy = 0; dy < k; ++dy) {
    const int64_t yy = y + dy - k / 2;
    if (yy < 0 || yy >= height) continue;
    for (int64_t dx = 0; dx < k; ++dx) {
      const int64_t xx = x + dx - k / 2;
      if (xx < 0 || xx >= width) continue;
      const float* tap = in + ((image * height + yy) * width + xx) * c + c0;
      const float* tap_weight = w + (dy * k + dx) * c + c0;
#pragma omp simd
      for (int64_t i = 0; i < B; ++i) acc[i] += tap_weight[i] * tap[i];
    }
  }
  for (int64_t i = 0; i < B; ++i) row[c0 + i] = acc[i];
}

// Output rows [begin, end) of depthwise_rows. Compiled for AVX2 and for any x86-64 CPU (the loader picks the
// clone the CPU runs): 8-wide vectors where the default build has 4.
__attribute__((target_clones("avx2", "default")))
void depthwise_rows_range(const float* in, const float* w, const float* b, const int64_t* positions, float* o,
                          int64_t c, int64_t k, int64_t height, int64_t width, double eps, int64_t begin,
                          int64_t end) {
  for (int64_t j = begin; j < end; ++j) {
    const int64_t p = positions[j], image = p / (height * width), y = p / width % height, x = p % width;
    float* row = o + j * c;
    int64_t c0 = 0;
    for (; c0 + 16 <= c; c0 += 16) depthwise_row_block<16>(in, w, b, row, c0, c, k, image, y, x, height, width);
    for (; c0 < c; ++c0)  // the channels left over, one at a time
      depthwise_row_block<1>(in, w, b, row, c0, c, k, image, y, x, height, width);
    if (eps < 0) continue;
    // LayerNorm of the row (no affine), as F.layer_norm: the biased variance, eps inside the square root
    float sum = 0.0f, squares = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t ch = 0; ch < c; ++ch) sum += row[ch];
    const float mean = sum / static_cast<float>(c);
#pragma omp simd reduction(+ : squares)
    for (int64_t ch = 0; ch < c; ++ch) squares += (row[ch] - mean) * (row[ch] - mean);
    const float rstd = 1.0f / std::sqrt(squares / static_cast<float>(c) + static_cast<float>(eps));
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) row[ch] = (row[ch] - mean) * rstd;
  }
}

// The sparse engine's depthwise k x k conv (stride 1, zero padding k / 2, with bias) of a position-major map
// src (N * H * W, C) at the positions idx only (ops.depthwise_rows): out[j] = bias + sum over taps of
// weight[tap] * src[neighbour of idx[j]], weight tap-major (k * k, C); eps >= 0: each row then layer-normalised
// (no affine; ConvNeXt's LayerNorm, whose affine the plan folds into the next layer). Parallel over the rows.
at::Tensor depthwise_rows(const at::Tensor& src, const at::Tensor& idx, int64_t height, int64_t width,
                          const at::Tensor& weight, const at::Tensor& bias, double eps) {
  TORCH_CHECK(src.dim() == 2 && src.is_contiguous() && src.scalar_type() == at::kFloat,
              "src must be contiguous float32 rows");
  TORCH_CHECK(idx.dim() == 1 && idx.is_contiguous() && idx.scalar_type() == at::kLong, "idx must be int64");
  const int64_t c = src.size(1), taps = weight.size(0);
  int64_t k = 1;
  while (k * k < taps) ++k;
  TORCH_CHECK(k * k == taps && k % 2 == 1, "weight must have k * k rows for an odd k");
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == at::kFloat && weight.size(1) == c &&
              bias.is_contiguous() && bias.scalar_type() == at::kFloat && bias.numel() == c,
              "weight (k * k, C) and bias (C) must be contiguous float32");
  TORCH_CHECK(src.size(0) % (height * width) == 0, "src rows must be N * H * W");
  auto out = at::empty({idx.size(0), c}, src.options());
  const float *in = src.data_ptr<float>(), *w = weight.data_ptr<float>(), *b = bias.data_ptr<float>();
  const int64_t* positions = idx.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / (taps * c));  // ~16k multiply-adds per task
  at::parallel_for(0, idx.size(0), grain, [&](int64_t begin, int64_t end) {
    depthwise_rows_range(in, w, b, positions, o, c, k, height, width, eps, begin, end);
  });
  return out;
}

// The sparse engine's row scatters, in place on the rows idx only: dst[idx[k]] = rows[k] (ops.scatter_rows_) or,
// with `add`, dst[idx[k]] + rows[k] (ops.scatter_add_), then max(..., 0) with `relu` (ops.scatter_add_relu_).
// dst (M, C) and rows (K, C) contiguous float32, idx without repeats. With the ReLU the eager ops add at idx,
// then apply it to the whole map (valid because dst is a ReLU output outside idx): at 30% of the positions this
// touches 30% of the map, once. The add alone took 30-45% less time than index_add_ on ConvNeXt-T's rows at batch 1
// (10.7 against 15.7 us, 60 x 384); the copy 3-6x less than index_copy_ on ResNet-50/101's buffers (5.7 against
// 32.2 us for 1470 x 64 rows into 56 x 56, 3.1 against 10.8 us for 110 x 256 into 14 x 14; 2-core AVX-512 CPU).
at::Tensor scatter_rows(at::Tensor dst, const at::Tensor& idx, const at::Tensor& rows, bool add, bool relu) {
  TORCH_CHECK(dst.dim() == 2 && dst.is_contiguous() && dst.scalar_type() == at::kFloat &&
              rows.dim() == 2 && rows.is_contiguous() && rows.scalar_type() == at::kFloat &&
              rows.size(1) == dst.size(1), "dst (M, C) and rows (K, C) must be contiguous float32 rows");
  TORCH_CHECK(idx.dim() == 1 && idx.is_contiguous() && idx.scalar_type() == at::kLong &&
              idx.size(0) == rows.size(0), "idx must be K int64 row indices");
  const int64_t c = dst.size(1), m = dst.size(0);
  const int64_t* positions = idx.data_ptr<int64_t>();
  const float* r = rows.data_ptr<float>();
  float* d = dst.data_ptr<float>();
  for (int64_t k = 0; k < idx.size(0); ++k)
    TORCH_CHECK(positions[k] >= 0 && positions[k] < m, "idx out of range");
  const int64_t grain = std::max<int64_t>(1, 16384 / c);  // ~16k values per task
  at::parallel_for(0, idx.size(0), grain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      float* row = d + positions[k] * c;
      const float* from = r + k * c;
      if (add && relu) {
#pragma omp simd
        for (int64_t ch = 0; ch < c; ++ch) row[ch] = std::max(row[ch] + from[ch], 0.0f);
      } else if (add) {
#pragma omp simd
        for (int64_t ch = 0; ch < c; ++ch) row[ch] += from[ch];
      } else if (relu) {
#pragma omp simd
        for (int64_t ch = 0; ch < c; ++ch) row[ch] = std::max(from[ch], 0.0f);
      } else {
        std::memcpy(row, from, c * sizeof(float));
      }
    }
  });
  return dst;
}

// Which of a 3x3 conv's tap offsets d (bit d, input coordinate stride * out + d - 1) reach input coordinate
// `in` from an output coordinate in [begin, end): the taps through which `in` feeds a tile of outputs.
inline int taps_from(int64_t in, int64_t begin, int64_t end, int64_t stride) {
  int bits = 0;  // stride 1 or 2 (checked), without a division: this runs per window row and column
  for (int64_t d = 0; d < 3; ++d) {
    int64_t from = in + 1 - d;  // stride * out
    if (from < 0 || (stride == 2 && (from & 1))) continue;
    if (stride == 2) from >>= 1;
    if (from >= begin && from < end) bits |= 1 << d;
  }
  return bits;
}

// Lanes of the dot products' accumulators: several independent vector sums, so the adds do not wait on each other.
constexpr int64_t kLanes = 32;

// lanes (+)= a * b elementwise over c channels, folded into kLanes sums (then 8, for narrow maps); the part past
// a multiple of 8 is returned (summed one at a time).
inline float dot_into(float* __restrict lanes, const float* __restrict a, const float* __restrict b, int64_t c) {
  int64_t ch = 0;
  for (; ch + kLanes <= c; ch += kLanes) {
#pragma omp simd
    for (int64_t i = 0; i < kLanes; ++i) lanes[i] += a[ch + i] * b[ch + i];
  }
  for (; ch + 8 <= c; ch += 8) {
#pragma omp simd
    for (int64_t i = 0; i < 8; ++i) lanes[i] += a[ch + i] * b[ch + i];
  }
  float rest = 0.0f;
  for (; ch < c; ++ch) rest += a[ch] * b[ch];
  return rest;
}

struct TileLogitGeometry {
  int64_t c, h, w, stride, tile, out_h, out_w, grid_h, grid_w;
};

// Tiles [begin, end) of tile_logits: per tile, the conv's mean over the tile (`mean`) and fc . (the sum of the
// input pixels that fall to the tile for the global average) (`global`). Compiled for AVX2 and for any x86-64
// CPU (the loader picks the clone the CPU runs).
__attribute__((target_clones("avx2", "default")))
void tile_logit_range(const TileLogitGeometry& g, const float* in, const float* cw, const float* f, float* mean,
                      float* global, int64_t begin, int64_t end) {
  const int64_t c = g.c, h = g.h, w = g.w, s = g.stride;
  // input pixels that are the global average's share of a tile: stride 1, the tile's own (tap row and column 1
  // reach them); stride 2, also the odd rows and columns after them (tap 2), up to the map's end for the last
  const int own = s == 1 ? 2 : 6;
  std::vector<int> columns;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t image = t / (g.grid_h * g.grid_w), ty = t / g.grid_w % g.grid_h, tx = t % g.grid_w;
    const int64_t y0 = ty * g.tile, y1 = std::min(y0 + g.tile, g.out_h);
    const int64_t x0 = tx * g.tile, x1 = std::min(x0 + g.tile, g.out_w);
    const int64_t iy0 = std::max<int64_t>(0, s * y0 - 1), iy1 = std::min(h, s * (y1 - 1) + 2);
    const int64_t ix0 = std::max<int64_t>(0, s * x0 - 1), ix1 = std::min(w, s * (x1 - 1) + 2);
    columns.clear();  // the window's column classes, once per tile (not per pixel)
    for (int64_t xx = ix0; xx < ix1; ++xx) columns.push_back(taps_from(xx, x0, x1, s));
    float conv_lanes[kLanes] = {}, pooled_lanes[kLanes] = {};
    float conv = 0.0f, pooled = 0.0f;
    for (int64_t y = iy0; y < iy1; ++y) {
      const int row_bits = taps_from(y, y0, y1, s);
      if (row_bits == 0) continue;
      const float* pixels = in + ((image * h + y) * w + ix0) * c;
      for (int64_t k = 0; k < ix1 - ix0; ++k) {
        if (columns[k] == 0) continue;
        const float* pixel = pixels + k * c;
        conv += dot_into(conv_lanes, cw + (8 * row_bits + columns[k]) * c, pixel, c);
        if ((row_bits & own) && (columns[k] & own)) pooled += dot_into(pooled_lanes, f, pixel, c);
      }
    }
    for (int64_t i = 0; i < kLanes; ++i) {
      conv += conv_lanes[i];
      pooled += pooled_lanes[i];
    }
    mean[t] = conv / static_cast<float>((y1 - y0) * (x1 - x0));
    global[t] = pooled;
  }
}

// The mask unit's logits (MaskLogits: a 3x3 conv C -> 1 with stride 1 or 2 and padding 1, plus a linear layer on
// the input's global average) averaged over tile x tile tiles of the output, without the per-position map
// (MaskLogits.tile_logits; its spec is avg_pool2d(logits, tile, tile, ceil_mode=True)). A tile's mean of the conv
// is a weighted sum of the input pixels in its window: pixel q is weighed by the sum of the taps through which
// it feeds the tile's outputs, which depends only on which tap rows and tap columns reach it (3 bits each:
// `class_weights`, (64, C), row 8 * row_bits + column_bits). So each window pixel costs one dot product with its
// class's weights, where the per-position logits cost ten multiply-adds per pixel and channel; the products go
// into kLanes independent sums (a single running sum made the adds wait on each other: 4x slower). The global
// average's fc takes the pixels that fall to each tile (every input pixel once), in the same pass.
// x: channels-last (N, C, H, W) float32; returns (N, 1, ceil(out_h / tile), ceil(out_w / tile)).
at::Tensor tile_logits(const at::Tensor& x, const at::Tensor& class_weights, const at::Tensor& fc, double constant,
                       int64_t stride, int64_t tile, int64_t out_h, int64_t out_w) {
  check_channels_last(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32");
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  TORCH_CHECK(class_weights.is_contiguous() && class_weights.scalar_type() == at::kFloat &&
              class_weights.dim() == 2 && class_weights.size(0) == 64 && class_weights.size(1) == c &&
              fc.is_contiguous() && fc.scalar_type() == at::kFloat && fc.numel() == c,
              "class_weights (64, C) and fc (C) must be contiguous float32");
  TORCH_CHECK((stride == 1 || stride == 2) && tile >= 1 && out_h == (h - 1) / stride + 1 &&
              out_w == (w - 1) / stride + 1, "stride 1 or 2, and the output size the strided conv's");
  const TileLogitGeometry g{c, h, w, stride, tile, out_h, out_w, (out_h + tile - 1) / tile,
                            (out_w + tile - 1) / tile};
  const int64_t grid_h = g.grid_h, grid_w = g.grid_w;
  auto means = at::empty({n, grid_h, grid_w}, x.options());
  auto globals = at::empty({n, grid_h, grid_w}, x.options());
  const float *in = x.data_ptr<float>(), *cw = class_weights.data_ptr<float>(), *f = fc.data_ptr<float>();
  float *mean = means.data_ptr<float>(), *global = globals.data_ptr<float>();
  at::parallel_for(0, n * grid_h * grid_w, 1, [&](int64_t begin, int64_t end) {
    tile_logit_range(g, in, cw, f, mean, global, begin, end);
  });
  // each image's global term (fc on the average, plus the constant) added to its tiles
  const int64_t tiles = grid_h * grid_w;
  for (int64_t image = 0; image < n; ++image) {
    double sum = 0.0;
    for (int64_t t = 0; t < tiles; ++t) sum += global[image * tiles + t];
    const float term = static_cast<float>(sum / static_cast<double>(h * w) + constant);
    for (int64_t t = 0; t < tiles; ++t) mean[image * tiles + t] += term;
  }
  return means.unsqueeze(1);
}

// For each output coordinate o of a 3x3 conv's input axis (size `out`), the range [lo, hi) of mask coordinates p
// (of `size`) that read it: dilate_stride * p + (-1, 0, 1) = o, i.e. ceil((o - 1) / s) <= p <= floor((o + 1) / s).
std::vector<std::pair<int64_t, int64_t>> readers(int64_t out, int64_t size, int64_t s) {
  std::vector<std::pair<int64_t, int64_t>> ranges(out);
  for (int64_t o = 0; o < out; ++o) {
    const int64_t lo = o == 0 ? 0 : (o - 1 + s - 1) / s;  // ceil((o - 1) / s), o - 1 >= 0 here
    ranges[o] = {lo, std::min(size, (o + 1) / s + 1)};
  }
  return ranges;
}

// The flat indices (as mask.reshape(-1)) of the ones of N maps of `size` elements each, in order, given each
// map's count of ones: the maps in parallel, each writing from its offset.
at::Tensor nonzero_rows(const float* maps, const std::vector<int64_t>& counts, int64_t size,
                        const at::TensorOptions& options) {
  std::vector<int64_t> offsets(counts.size() + 1, 0);
  for (size_t i = 0; i < counts.size(); ++i) offsets[i + 1] = offsets[i] + counts[i];
  auto idx = at::empty({offsets.back()}, options.dtype(at::kLong));
  int64_t* out = idx.data_ptr<int64_t>();
  at::parallel_for(0, static_cast<int64_t>(counts.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t image = begin; image < end; ++image) {
      int64_t* o = out + offsets[image];
      const float* map = maps + image * size;
      for (int64_t i = 0; i < size; ++i)
        if (map[i] != 0.0f) *o++ = image * size + i;
    }
  });
  return idx;
}

// A tiled mask unit's masks in evaluation from its tile logits (N, 1, grid_h, grid_w): `hard` (N, 1, out_h,
// out_w), 1 on the tiles whose logit is >= 0, and, when dilate_stride > 0, `dilated` (N, 1, dil_h, dil_w): the
// positions a 3x3 conv reads for the hard positions, hard position p reading dilate_stride * p + (-1, 0, 1) in
// each axis (maskunit.dilate_mask: the mask placed at stride dilate_stride, dilated by a 3x3 window, cropped).
// Then the index lists of both (the flat indices of their ones, as nonzero() gives them): returns [hard,
// hard's indices] or [hard, dilated, hard's indices, dilated's indices]. The ATen ops (threshold, two
// repeat_interleave, pad or max_pool2d, two nonzero) make seven to ten passes; here each image is one task, its
// hard mask written a row of tiles at a time and its dilation separable (the rows' maximum, then the columns').
std::vector<at::Tensor> tile_masks(const at::Tensor& logits, int64_t tile, int64_t out_h, int64_t out_w,
                                   int64_t dilate_stride, int64_t dil_h, int64_t dil_w) {
  TORCH_CHECK(logits.dim() == 4 && logits.size(1) == 1 && logits.scalar_type() == at::kFloat,
              "logits must be float32 (N, 1, grid_h, grid_w)");
  const int64_t n = logits.size(0), grid_h = logits.size(2), grid_w = logits.size(3);
  TORCH_CHECK(tile >= 1 && grid_h == (out_h + tile - 1) / tile && grid_w == (out_w + tile - 1) / tile,
              "the logits must be on the tile grid of the output");
  const auto grid = logits.contiguous();
  const float* g = grid.data_ptr<float>();
  const auto options = logits.options();
  const bool dilate = dilate_stride > 0;
  auto hard = at::empty({n, 1, out_h, out_w}, options);
  auto dilated = at::empty({dilate ? n : 0, 1, dil_h, dil_w}, options);
  float* m = hard.data_ptr<float>();
  float* d = dilated.data_ptr<float>();
  std::vector<int64_t> hard_counts(n, 0), dilated_counts(n, 0);
  std::vector<std::pair<int64_t, int64_t>> columns, rows;
  if (dilate) columns = readers(dil_w, out_w, dilate_stride), rows = readers(dil_h, out_h, dilate_stride);
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> across(dilate ? out_h * dil_w : 0);  // per hard row, the maximum over each column's readers
    for (int64_t image = begin; image < end; ++image) {
      float* mask = m + image * out_h * out_w;
      int64_t count = 0;
      for (int64_t ty = 0; ty < grid_h; ++ty) {
        const float* tiles = g + (image * grid_h + ty) * grid_w;
        const int64_t y0 = ty * tile, y1 = std::min(y0 + tile, out_h);
        float* first = mask + y0 * out_w;
        int64_t row_count = 0;
        for (int64_t tx = 0; tx < grid_w; ++tx) {
          const float on = tiles[tx] >= 0.0f ? 1.0f : 0.0f;
          const int64_t x0 = tx * tile, x1 = std::min(x0 + tile, out_w);
          for (int64_t x = x0; x < x1; ++x) first[x] = on;
          row_count += static_cast<int64_t>(on) * (x1 - x0);
        }
        for (int64_t y = y0 + 1; y < y1; ++y) std::memcpy(mask + y * out_w, first, out_w * sizeof(float));
        count += row_count * (y1 - y0);
      }
      hard_counts[image] = count;
      if (!dilate) continue;
      for (int64_t y = 0; y < out_h; ++y)
        for (int64_t x = 0; x < dil_w; ++x) {
          float on = 0.0f;
          for (int64_t p = columns[x].first; p < columns[x].second; ++p) on = std::max(on, mask[y * out_w + p]);
          across[y * dil_w + x] = on;
        }
      float* out = d + image * dil_h * dil_w;
      int64_t on_count = 0;
      for (int64_t y = 0; y < dil_h; ++y) {
        float* row = out + y * dil_w;
        std::fill(row, row + dil_w, 0.0f);
        for (int64_t p = rows[y].first; p < rows[y].second; ++p)
          for (int64_t x = 0; x < dil_w; ++x) row[x] = std::max(row[x], across[p * dil_w + x]);
        for (int64_t x = 0; x < dil_w; ++x) on_count += row[x] != 0.0f;
      }
      dilated_counts[image] = on_count;
    }
  });
  auto hard_rows = nonzero_rows(m, hard_counts, out_h * out_w, options);
  if (!dilate) return {hard, hard_rows};
  return {hard, dilated, hard_rows, nonzero_rows(d, dilated_counts, dil_h * dil_w, options)};
}

}  // namespace

TORCH_LIBRARY(dynconv_fused, m) {
  m.def("depthwise_rows(Tensor src, Tensor idx, int height, int width, Tensor weight, Tensor bias, float eps) -> "
        "Tensor");
  m.def("masked_residual_relu(Tensor identity, Tensor residual, Tensor hard) -> Tensor");
  m.def("masked_residual_relu_backward(Tensor grad, Tensor out, Tensor residual, Tensor hard) -> Tensor[]");
  m.def("scatter_rows(Tensor(a!) dst, Tensor idx, Tensor rows, bool add, bool relu) -> Tensor(a!)");
  m.def("tile_logits(Tensor x, Tensor class_weights, Tensor fc, float constant, int stride, int tile, int out_h, "
        "int out_w) -> Tensor");
  m.def("tile_masks(Tensor logits, int tile, int out_h, int out_w, int dilate_stride, int dil_h, int dil_w) -> "
        "Tensor[]");
}

TORCH_LIBRARY_IMPL(dynconv_fused, CPU, m) {
  m.impl("depthwise_rows", &depthwise_rows);
  m.impl("masked_residual_relu", &masked_residual_relu);
  m.impl("masked_residual_relu_backward", &masked_residual_relu_backward);
  m.impl("scatter_rows", &scatter_rows);
  m.impl("tile_logits", &tile_logits);
  m.impl("tile_masks", &tile_masks);
}
