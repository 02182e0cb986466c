// edge_ad preprocessing core: uint8 HxWx{1,3} frames (any strides) -> resized, normalised,
// float32 / float16 RGB planes. Pure C++17, no Python; bindings.cpp wraps it for nanobind.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace edge_ad {

// Auto: Area when neither axis upscales (antialiased downscaling), else Bilinear; per frame.
enum class ResizeMode : int { Bilinear = 0, Area = 1, Auto = 2 };

// How one resize axis maps source to destination indices (see make_taps()).
enum class TapKind : int {
  Linear = 0,      // OpenCV INTER_LINEAR: src = (dst + 0.5) * scale - 0.5, clamped, 2 taps
  AreaLinear = 1,  // what OpenCV INTER_AREA does when any axis upscales (a bilinear variant)
  Box = 2,         // OpenCV INTER_AREA downscale: pixel-area averaging with fractional overlaps
};

// Per-axis resampling taps. Output index d reads source indices start[d] .. start[d] + k - 1 with
// weights w[d*k .. d*k + k - 1] (zero-padded to a fixed k; start[d] + k <= src always holds).
struct AxisTaps {
  int src = 0;
  int dst = 0;
  int k = 0;
  int used = 0;        // number of distinct source indices with a non-zero weight
  double nnz = 0.0;    // mean number of non-zero taps per output index
  int safe_n = 0;      // outputs 0..safe_n-1 only read source indices <= src - 2 (see kernels)
  std::vector<int32_t> start;
  std::vector<float> w;
  std::vector<float> w4;  // w with every weight repeated 4 times (pre-broadcast for SIMD)
};

// Taps for one axis, cached by (src, dst, kind): building them is O(dst) but a camera loop asks
// for the same geometry every frame. Thread-safe.
std::shared_ptr<const AxisTaps> get_taps(int src, int dst, TapKind kind);
// Uncached builder (exposed for tests / introspection).
std::shared_ptr<AxisTaps> make_taps(int src, int dst, TapKind kind);
// The per-axis kinds OpenCV uses for a whole 2-D resize (the choice depends on both axes).
void taps_kinds(ResizeMode mode, int src_h, int src_w, int dst_h, int dst_w, TapKind* ky, TapKind* kx);

struct SrcImage {
  const uint8_t* data = nullptr;  // address of pixel (0, 0), channel 0, of the region to resize
  int64_t height = 0, width = 0, channels = 0;           // channels: 1 or 3
  int64_t row_stride = 0, col_stride = 0, ch_stride = 0;  // in bytes; may be negative
};

struct OutParams {
  int height = 0, width = 0;
  ResizeMode mode = ResizeMode::Bilinear;
  bool bgr = true;    // 3-channel sources are BGR (false: RGB)
  bool half = false;  // write IEEE-754 binary16 (round to nearest even) instead of float32
  float scale[3] = {1.f, 1.f, 1.f};   // RGB: out = pixel * scale + offset
  float offset[3] = {0.f, 0.f, 0.f};
};

struct Job {
  SrcImage src;
  void* out = nullptr;  // three contiguous planes (R, G, B) of height*width float32 / binary16
};

// Pass order the cost model picks for one job: 0 = horizontal first (only the source rows the
// vertical taps need), 1 = vertical first (whole source rows blended, then one horizontal pass).
int choose_order(const SrcImage& src, const OutParams& p, const AxisTaps& ty, const AxisTaps& tx);

// Runs all jobs, splitting them into row chunks over up to `num_threads` std::threads when the
// work is large enough to pay for the threads (num_threads = 0: automatic; otherwise an upper
// bound). force_order: -1 = cost model, 0 / 1 = that pass order (tests, benchmarks). Blocks until
// done. Returns the number of threads used.
int run_jobs(const std::vector<Job>& jobs, const OutParams& p, int num_threads, int force_order = -1);

// Threads used when num_threads = 0 and the work is large (hardware concurrency, capped).
int auto_threads();

// Portable float -> IEEE binary16 bits, round to nearest even (overflow -> inf, NaN -> qNaN).
uint16_t float_to_half(float f);

}  // namespace edge_ad
