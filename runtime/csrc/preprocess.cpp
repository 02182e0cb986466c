// edge_ad preprocessing core, see preprocess.hpp.
//
// Both resize modes are separable: out = Wy * img * Wx^T with sparse per-axis weight matrices,
// stored as fixed-width taps (AxisTaps). Each job is processed in chunks of output rows, in one of
// two pass orders chosen by a cost model:
//   horizontal first: resample only the source rows the vertical taps touch (gathered reads), keep
//     them in a small ring cache, blend them vertically (contiguous, vectorisable);
//   vertical first:   blend whole source rows (contiguous uint8 -> float, vectorisable), then one
//     horizontal pass per output row. Wins for area downscaling, where every source pixel counts.
// Normalisation (x * scale[c] + offset[c]), the BGR -> RGB swap, grey replication and the CHW
// (planar) float32 / float16 write are fused into the last step of each output row.
#include "preprocess.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <tuple>
#include <utility>

#if defined(__SSE2__)
#include <emmintrin.h>
#elif defined(__ARM_NEON) && defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace edge_ad {

// ------------------------------------------------------------------------------------------------
// Taps
// ------------------------------------------------------------------------------------------------

void taps_kinds(ResizeMode mode, int src_h, int src_w, int dst_h, int dst_w, TapKind* ky, TapKind* kx) {
  const bool down = src_h >= dst_h && src_w >= dst_w;
  if (mode == ResizeMode::Bilinear || (mode == ResizeMode::Auto && !down)) {
    *ky = *kx = TapKind::Linear;
    return;
  }
  // OpenCV INTER_AREA: true area averaging only when neither axis upscales; otherwise both axes
  // use its bilinear variant (also the downscaling one, as cv::resize does). Auto only gets here
  // when downscaling, so it is exactly INTER_AREA there and INTER_LINEAR otherwise.
  *ky = *kx = down ? TapKind::Box : TapKind::AreaLinear;
}

std::shared_ptr<AxisTaps> make_taps(int src, int dst, TapKind kind) {
  if (src <= 0 || dst <= 0) throw std::invalid_argument("make_taps: sizes must be positive");
  std::vector<std::vector<std::pair<int, double>>> per(static_cast<size_t>(dst));
  const double scale = static_cast<double>(src) / dst;
  const double inv_scale = static_cast<double>(dst) / src;
  for (int d = 0; d < dst; ++d) {
    auto& taps = per[static_cast<size_t>(d)];
    if (kind == TapKind::Box) {
      const double a = d * scale;
      const double b = std::min(a + scale, static_cast<double>(src));
      const double cell = b - a;
      const int i0 = static_cast<int>(std::floor(a));
      const int i1 = std::min(static_cast<int>(std::ceil(b)), src);
      for (int i = i0; i < i1; ++i) {
        const double overlap = std::min(i + 1.0, b) - std::max(static_cast<double>(i), a);
        if (overlap > 1e-3) taps.emplace_back(i, overlap / cell);  // OpenCV's 1e-3 cut-off
      }
      if (taps.empty()) taps.emplace_back(std::min(std::max(i0, 0), src - 1), 1.0);
    } else {
      int s;
      float f;
      if (kind == TapKind::Linear) {
        f = static_cast<float>((d + 0.5) * scale - 0.5);
        s = static_cast<int>(std::floor(f));
        f -= static_cast<float>(s);
      } else {
        s = static_cast<int>(std::floor(d * scale));
        f = static_cast<float>((d + 1) - (s + 1) * inv_scale);
        f = f <= 0.f ? 0.f : f - std::floor(f);
      }
      if (s < 0) { s = 0; f = 0.f; }
      if (s >= src - 1) { s = src - 1; f = 0.f; }
      if (1.f - f != 0.f) taps.emplace_back(s, 1.f - f);
      if (f != 0.f) taps.emplace_back(s + 1, f);
    }
  }
  auto t = std::make_shared<AxisTaps>();
  t->src = src;
  t->dst = dst;
  int k = 1;
  size_t nnz = 0;
  for (const auto& taps : per) {
    k = std::max(k, taps.back().first - taps.front().first + 1);
    nnz += taps.size();
  }
  t->k = k;
  t->nnz = static_cast<double>(nnz) / dst;
  t->start.resize(static_cast<size_t>(dst));
  t->w.assign(static_cast<size_t>(dst) * k, 0.f);
  std::vector<char> used(static_cast<size_t>(src), 0);
  for (int d = 0; d < dst; ++d) {
    const auto& taps = per[static_cast<size_t>(d)];
    const int start = std::max(0, std::min(taps.front().first, src - k));
    t->start[static_cast<size_t>(d)] = start;
    for (const auto& [i, wt] : taps) {
      t->w[static_cast<size_t>(d) * k + (i - start)] = static_cast<float>(wt);
      used[static_cast<size_t>(i)] = 1;
    }
  }
  t->used = static_cast<int>(std::count(used.begin(), used.end(), 1));
  t->safe_n = 0;
  while (t->safe_n < dst && t->start[static_cast<size_t>(t->safe_n)] + k <= src - 1) ++t->safe_n;
  t->w4.resize(t->w.size() * 4);
  for (size_t i = 0; i < t->w.size(); ++i)
    for (int l = 0; l < 4; ++l) t->w4[4 * i + static_cast<size_t>(l)] = t->w[i];
  return t;
}

std::shared_ptr<const AxisTaps> get_taps(int src, int dst, TapKind kind) {
  static std::mutex mu;
  static std::map<std::tuple<int, int, int>, std::shared_ptr<const AxisTaps>> cache;
  const auto key = std::make_tuple(src, dst, static_cast<int>(kind));
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  std::shared_ptr<const AxisTaps> t = make_taps(src, dst, kind);
  std::lock_guard<std::mutex> lock(mu);
  if (cache.size() >= 256) cache.clear();  // bounded: many distinct ROI sizes must not leak
  cache.emplace(key, t);
  return t;
}

// ------------------------------------------------------------------------------------------------
// float -> binary16
// ------------------------------------------------------------------------------------------------

static inline uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// Branch-free, so that loops over it vectorise.
static inline uint16_t half_bits(float f) {
  const uint32_t bits = f2u(f);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t mag = bits & 0x7fffffffu;
  // Normal half range: re-bias the exponent (127 -> 15, i.e. subtract 112 << 23), then round the
  // 13 dropped mantissa bits to nearest even by adding 0xfff plus the lowest kept bit. A carry out
  // of the mantissa correctly bumps the exponent (up to 0x7c00 = inf for |f| >= 65520).
  const uint32_t normal = (mag - (112u << 23) + 0x0fffu + ((mag >> 13) & 1u)) >> 13;
  // Subnormal half (|f| < 2^-14): adding 0.5f aligns the half's 10 mantissa bits with the bottom
  // of the float mantissa, and the FPU's own round-to-nearest-even does the rounding.
  const uint32_t sub = f2u(u2f(mag) + 0.5f) - 0x3f000000u;
  // Selections as bit masks (no branches, no ?:) so the conversion loop vectorises.
  const uint32_t is_sub = 0u - static_cast<uint32_t>(mag < 0x38800000u);   // |f| < 2^-14
  const uint32_t is_big = 0u - static_cast<uint32_t>(mag >= 0x47800000u);  // |f| >= 65536, inf, NaN
  const uint32_t is_nan = 0u - static_cast<uint32_t>(mag > 0x7f800000u);
  const uint32_t special = 0x7c00u | (is_nan & 0x0200u);  // inf, or a quiet NaN
  uint32_t h = (sub & is_sub) | (normal & ~is_sub);
  h = (special & is_big) | (h & ~is_big);
  return static_cast<uint16_t>(h | sign);
}

uint16_t float_to_half(float f) { return half_bits(f); }

// ------------------------------------------------------------------------------------------------
// Kernels
// ------------------------------------------------------------------------------------------------

namespace {

// ---- 4-lane float vectors: GCC/Clang vector extensions (SSE2 on x86-64, NEON on aarch64, both
// baseline ISAs, so no -march flags and no runtime dispatch). Only the uint8x4 -> float32x4
// widening needs intrinsics; everything else is portable vector arithmetic. Other compilers,
// or -DEDGE_AD_NO_SIMD, use the scalar code (same results up to float rounding order).
#if !defined(EDGE_AD_NO_SIMD) && (defined(__GNUC__) || defined(__clang__)) && \
    (defined(__SSE2__) || (defined(__ARM_NEON) && defined(__aarch64__)))
#define EDGE_AD_SIMD 1
typedef float f32x4 __attribute__((vector_size(16)));

inline f32x4 load4f(const float* p) { f32x4 v; std::memcpy(&v, p, 16); return v; }
inline void store4f(float* p, f32x4 v) { std::memcpy(p, &v, 16); }

// Bytes p[0..3] -> 4 floats. Reads exactly 4 bytes.
inline f32x4 load4u8(const uint8_t* p) {
  uint32_t u;
  std::memcpy(&u, p, 4);
#if defined(__SSE2__)
  const __m128i z = _mm_setzero_si128();
  __m128i v = _mm_cvtsi32_si128(static_cast<int>(u));
  v = _mm_unpacklo_epi16(_mm_unpacklo_epi8(v, z), z);
  return reinterpret_cast<f32x4>(_mm_cvtepi32_ps(v));
#else
  const uint16x8_t h = vmovl_u8(vcreate_u8(static_cast<uint64_t>(u)));
  return reinterpret_cast<f32x4>(vcvtq_f32_u32(vmovl_u16(vget_low_u16(h))));
#endif
}
#endif

// Row layouts between passes ("lanes"): grey rows are 1 float per pixel; 3-channel rows are
// 4 floats per pixel in SOURCE channel order (lane 3 is padding / don't-care), so one pixel is one
// 4-lane vector. The final write picks the lane of each RGB plane.

// 3-channel uint8 source whose channels are adjacent bytes (ch_stride 1) and pixels `step` >= 3
// bytes apart (3: packed BGR/RGB; 4: a [..., :3] view of BGRA; more: column-strided views).
template <int KF>
inline void hpass_u8_c3_adjacent(const uint8_t* row, int64_t step, const AxisTaps& t, float* out) {
  const int K = KF ? KF : t.k;
  const int n = t.dst;
  const int32_t* st = t.start.data();
#if EDGE_AD_SIMD
  const float* W4 = t.w4.data();
  // A 4-byte load reads one byte past the pixel's 3 channels. For source pixels before the last
  // one of the row that byte lies between this pixel and the next (step >= 3), so inside the
  // frame's buffer: fine for outputs whose taps end before the last source pixel (x < safe_n).
  // The others (the last few outputs) copy 3 bytes first. (The last pixel's 4th byte may be past
  // the end of the buffer even with step >= 4, e.g. for a transposed view.)
  const int safe = std::min(n, t.safe_n);
  int x = 0;
  for (; x < safe; ++x) {
    const uint8_t* px = row + step * st[x];
    const float* w = W4 + static_cast<size_t>(x) * K * 4;
    f32x4 acc = load4u8(px) * load4f(w);
    for (int k = 1; k < K; ++k) acc += load4u8(px + step * k) * load4f(w + 4 * k);
    store4f(out + 4 * static_cast<size_t>(x), acc);
  }
  for (; x < n; ++x) {
    const uint8_t* px = row + step * st[x];
    const float* w = W4 + static_cast<size_t>(x) * K * 4;
    f32x4 acc = {0.f, 0.f, 0.f, 0.f};
    for (int k = 0; k < K; ++k) {
      const uint8_t* q = px + step * k;
      const uint8_t tmp[4] = {q[0], q[1], q[2], 0};
      acc += load4u8(tmp) * load4f(w + 4 * k);
    }
    store4f(out + 4 * static_cast<size_t>(x), acc);
  }
#else
  const float* W = t.w.data();
  for (int x = 0; x < n; ++x) {
    const uint8_t* px = row + step * st[x];
    const float* w = W + static_cast<size_t>(x) * K;
    float a0 = 0.f, a1 = 0.f, a2 = 0.f;
    for (int k = 0; k < K; ++k, px += step) {
      a0 += w[k] * px[0];
      a1 += w[k] * px[1];
      a2 += w[k] * px[2];
    }
    float* o = out + 4 * static_cast<size_t>(x);
    o[0] = a0; o[1] = a1; o[2] = a2; o[3] = 0.f;
  }
#endif
}

// 3-channel float row (pixel-major, 3 floats per pixel, at least one float of padding after the
// last pixel so a 4-float load never leaves the buffer) -> 4-lane row.
template <int KF>
inline void hpass_f_c3(const float* row, const AxisTaps& t, float* out) {
  const int K = KF ? KF : t.k;
  const int n = t.dst;
  const int32_t* st = t.start.data();
#if EDGE_AD_SIMD
  const float* W4 = t.w4.data();
  for (int x = 0; x < n; ++x) {
    const float* px = row + 3 * static_cast<int64_t>(st[x]);
    const float* w = W4 + static_cast<size_t>(x) * K * 4;
    f32x4 acc = load4f(px) * load4f(w);
    for (int k = 1; k < K; ++k) acc += load4f(px + 3 * k) * load4f(w + 4 * k);
    store4f(out + 4 * static_cast<size_t>(x), acc);
  }
#else
  const float* W = t.w.data();
  for (int x = 0; x < n; ++x) {
    const float* px = row + 3 * static_cast<int64_t>(st[x]);
    const float* w = W + static_cast<size_t>(x) * K;
    float a0 = 0.f, a1 = 0.f, a2 = 0.f;
    for (int k = 0; k < K; ++k, px += 3) {
      a0 += w[k] * px[0];
      a1 += w[k] * px[1];
      a2 += w[k] * px[2];
    }
    float* o = out + 4 * static_cast<size_t>(x);
    o[0] = a0; o[1] = a1; o[2] = a2; o[3] = 0.f;
  }
#endif
}

// Any-stride 3-channel uint8 row -> 4-lane row (scalar gathers).
template <int KF>
inline void hpass_u8_c3_strided(const uint8_t* row, int64_t step, int64_t cstep, const AxisTaps& t, float* out) {
  const int K = KF ? KF : t.k;
  const int n = t.dst;
  const int32_t* st = t.start.data();
  const float* W = t.w.data();
  for (int x = 0; x < n; ++x) {
    const uint8_t* px = row + static_cast<int64_t>(st[x]) * step;
    const float* w = W + static_cast<size_t>(x) * K;
    float a0 = 0.f, a1 = 0.f, a2 = 0.f;
    for (int k = 0; k < K; ++k, px += step) {
      a0 += w[k] * px[0];
      a1 += w[k] * px[cstep];
      a2 += w[k] * px[2 * cstep];
    }
    float* o = out + 4 * static_cast<size_t>(x);
    o[0] = a0; o[1] = a1; o[2] = a2; o[3] = 0.f;
  }
}

// Single-channel row (uint8 with any pixel stride, or float) -> 1-lane row.
template <typename T, int KF>
inline void hpass_c1(const T* row, int64_t step, const AxisTaps& t, float* out) {
  const int K = KF ? KF : t.k;
  const int n = t.dst;
  const int32_t* st = t.start.data();
  const float* W = t.w.data();
  for (int x = 0; x < n; ++x) {
    const T* px = row + static_cast<int64_t>(st[x]) * step;
    const float* w = W + static_cast<size_t>(x) * K;
    float a = 0.f;
    for (int k = 0; k < K; ++k, px += step) a += w[k] * static_cast<float>(*px);
    out[x] = a;
  }
}

#define EDGE_AD_DISPATCH_K(K, CALL) \
  switch (K) {                      \
    case 1: CALL(1); break;         \
    case 2: CALL(2); break;         \
    case 3: CALL(3); break;         \
    case 4: CALL(4); break;         \
    default: CALL(0); break;        \
  }

// Horizontal pass of one uint8 source row into a lane row.
inline void hpass_src_row(const uint8_t* row, const SrcImage& s, const AxisTaps& t, float* out) {
  if (s.channels == 1) {
#define EDGE_AD_CALL(k) hpass_c1<uint8_t, k>(row, s.col_stride, t, out)
    EDGE_AD_DISPATCH_K(t.k, EDGE_AD_CALL)
#undef EDGE_AD_CALL
  } else if (s.col_stride >= 3 && s.ch_stride == 1) {
#define EDGE_AD_CALL(k) hpass_u8_c3_adjacent<k>(row, s.col_stride, t, out)
    EDGE_AD_DISPATCH_K(t.k, EDGE_AD_CALL)
#undef EDGE_AD_CALL
  } else {
#define EDGE_AD_CALL(k) hpass_u8_c3_strided<k>(row, s.col_stride, s.ch_stride, t, out)
    EDGE_AD_DISPATCH_K(t.k, EDGE_AD_CALL)
#undef EDGE_AD_CALL
  }
}

// Horizontal pass of one vertically blended float row (pixel-major, `channels` per pixel).
inline void hpass_float_row(const float* row, int channels, const AxisTaps& t, float* out) {
  if (channels == 1) {
#define EDGE_AD_CALL(k) hpass_c1<float, k>(row, 1, t, out)
    EDGE_AD_DISPATCH_K(t.k, EDGE_AD_CALL)
#undef EDGE_AD_CALL
  } else {
#define EDGE_AD_CALL(k) hpass_f_c3<k>(row, t, out)
    EDGE_AD_DISPATCH_K(t.k, EDGE_AD_CALL)
#undef EDGE_AD_CALL
  }
}

// acc[i] (+)= w0 * a[i] (+ w1 * b[i]) over n contiguous bytes: the vectorisable vertical blend.
inline void vblend_u8_first(float* __restrict acc, const uint8_t* __restrict a, float w0, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] = w0 * static_cast<float>(a[i]);
}
inline void vblend_u8_first2(float* __restrict acc, const uint8_t* __restrict a, const uint8_t* __restrict b,
                             float w0, float w1, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] = w0 * static_cast<float>(a[i]) + w1 * static_cast<float>(b[i]);
}
inline void vblend_u8_add(float* __restrict acc, const uint8_t* __restrict a, float w0, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += w0 * static_cast<float>(a[i]);
}
inline void vblend_u8_add2(float* __restrict acc, const uint8_t* __restrict a, const uint8_t* __restrict b,
                           float w0, float w1, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += w0 * static_cast<float>(a[i]) + w1 * static_cast<float>(b[i]);
}

inline void vblend_f_first(float* __restrict acc, const float* __restrict a, float w0, int n) {
  for (int i = 0; i < n; ++i) acc[i] = w0 * a[i];
}
inline void vblend_f_add2(float* __restrict acc, const float* __restrict a, const float* __restrict b,
                          float w0, float w1, int n) {
  for (int i = 0; i < n; ++i) acc[i] += w0 * a[i] + w1 * b[i];
}
inline void vblend_f_first2(float* __restrict acc, const float* __restrict a, const float* __restrict b,
                            float w0, float w1, int n) {
  for (int i = 0; i < n; ++i) acc[i] = w0 * a[i] + w1 * b[i];
}
inline void vblend_f_add(float* __restrict acc, const float* __restrict a, float w0, int n) {
  for (int i = 0; i < n; ++i) acc[i] += w0 * a[i];
}

// out[i] = v[i * L + lane] * scale + offset, as float32 or binary16.
template <int L>
inline void store_plane_row(const float* __restrict v, int lane, float scale, float offset, void* out,
                            size_t index, int n, bool half) {
  v += lane;
  if (half) {
    uint16_t* __restrict o = static_cast<uint16_t*>(out) + index;
    float tmp[256];  // normalise, then convert: two simple loops that both vectorise
    for (int i0 = 0; i0 < n; i0 += 256) {
      const int m = std::min(256, n - i0);
      for (int i = 0; i < m; ++i) tmp[i] = v[static_cast<size_t>(i0 + i) * L] * scale + offset;
      for (int i = 0; i < m; ++i) o[i0 + i] = half_bits(tmp[i]);
    }
  } else {
    float* __restrict o = static_cast<float*>(out) + index;
    for (int i = 0; i < n; ++i) o[i] = v[static_cast<size_t>(i) * L] * scale + offset;
  }
}

struct Prepared {
  const Job* job = nullptr;
  std::shared_ptr<const AxisTaps> ty, tx;
  int lanes = 4;           // floats per pixel between passes: 1 (grey source) or 4 (3 channels)
  int cidx[3] = {0, 0, 0}; // source channel (= lane) feeding output plane R, G, B
  int order = 0;           // 0 horizontal first, 1 vertical first
  bool contiguous_row = false;  // a source row's pixels and channels are one contiguous byte run
  double cost = 0.0;       // rough work estimate (~instructions)
};

// Per-thread scratch, reused across chunks.
struct Scratch {
  std::vector<float> ring;     // horizontal-first: cached resampled rows, lanes * out_w each
  std::vector<int> ring_row;   // source row held by each ring slot (-1: none)
  std::vector<float> acc;      // lanes * out_w: one output row before normalisation
  std::vector<float> srcrow;   // vertical-first: blended source row, width * channels (+ pad)
};

// Normalise one lane row and write it to the three output planes at row y.
void finish_row(const Prepared& pj, const OutParams& p, const float* acc, int y) {
  const int W = p.width;
  const size_t plane = static_cast<size_t>(p.height) * W;
  for (int c = 0; c < 3; ++c) {
    const size_t index = c * plane + static_cast<size_t>(y) * W;
    if (pj.lanes == 1) store_plane_row<1>(acc, 0, p.scale[c], p.offset[c], pj.job->out, index, W, p.half);
    else store_plane_row<4>(acc, pj.cidx[c], p.scale[c], p.offset[c], pj.job->out, index, W, p.half);
  }
}

// acc = sum over the non-zero taps of w[k] * rows(k), two taps per sweep over acc.
template <typename RowFn>
inline void vblend_rows(float* acc, int n, const float* w, int K, int start, RowFn&& rows) {
  const float* pending = nullptr;
  float pending_w = 0.f;
  bool first = true;
  for (int k = 0; k < K; ++k) {
    if (w[k] == 0.f) continue;
    const float* r = rows(start + k);
    if (!pending) { pending = r; pending_w = w[k]; continue; }
    if (first) vblend_f_first2(acc, pending, r, pending_w, w[k], n);
    else vblend_f_add2(acc, pending, r, pending_w, w[k], n);
    first = false;
    pending = nullptr;
  }
  if (pending) {
    if (first) vblend_f_first(acc, pending, pending_w, n);
    else vblend_f_add(acc, pending, pending_w, n);
  }
}

void run_hfirst(const Prepared& pj, const OutParams& p, int y0, int y1, Scratch& s) {
  const SrcImage& src = pj.job->src;
  const AxisTaps& ty = *pj.ty;
  const AxisTaps& tx = *pj.tx;
  const int rowlen = pj.lanes * p.width;
  const int R = ty.k;
  s.ring.resize(static_cast<size_t>(R) * rowlen);
  s.ring_row.assign(static_cast<size_t>(R), -1);
  s.acc.resize(static_cast<size_t>(rowlen));
  // Ring of R = ty.k resampled rows: the rows of one output row are R consecutive source rows at
  // most, so they never evict each other, and rows shared with the next output row are kept.
  auto get_row = [&](int r) -> const float* {
    const size_t slot = static_cast<size_t>(r % R);
    float* buf = s.ring.data() + slot * rowlen;
    if (s.ring_row[slot] != r) {
      hpass_src_row(src.data + static_cast<int64_t>(r) * src.row_stride, src, tx, buf);
      s.ring_row[slot] = r;
    }
    return buf;
  };
  for (int y = y0; y < y1; ++y) {
    const float* w = ty.w.data() + static_cast<size_t>(y) * R;
    vblend_rows(s.acc.data(), rowlen, w, R, ty.start[static_cast<size_t>(y)], get_row);
    finish_row(pj, p, s.acc.data(), y);
  }
}

void run_vfirst(const Prepared& pj, const OutParams& p, int y0, int y1, Scratch& s) {
  const SrcImage& src = pj.job->src;
  const AxisTaps& ty = *pj.ty;
  const AxisTaps& tx = *pj.tx;
  const int64_t C = src.channels;
  const int64_t n = src.width * C;  // pixel-major row, source channel order
  s.srcrow.assign(static_cast<size_t>(n) + 4, 0.f);  // padding: 4-float loads of the last pixel
  s.acc.resize(static_cast<size_t>(pj.lanes) * p.width);
  float* row = s.srcrow.data();
  const int K = ty.k;
  for (int y = y0; y < y1; ++y) {
    const int start = ty.start[static_cast<size_t>(y)];
    const float* w = ty.w.data() + static_cast<size_t>(y) * K;
    if (pj.contiguous_row) {
      const uint8_t* pending = nullptr;
      float pending_w = 0.f;
      bool first = true;
      for (int k = 0; k < K; ++k) {
        if (w[k] == 0.f) continue;
        const uint8_t* r = src.data + static_cast<int64_t>(start + k) * src.row_stride;
        if (!pending) { pending = r; pending_w = w[k]; continue; }
        if (first) vblend_u8_first2(row, pending, r, pending_w, w[k], n);
        else vblend_u8_add2(row, pending, r, pending_w, w[k], n);
        first = false;
        pending = nullptr;
      }
      if (pending) {
        if (first) vblend_u8_first(row, pending, pending_w, n);
        else vblend_u8_add(row, pending, pending_w, n);
      }
    } else {
      bool first = true;
      for (int k = 0; k < K; ++k) {
        const float wk = w[k];
        if (wk == 0.f) continue;
        const uint8_t* r = src.data + static_cast<int64_t>(start + k) * src.row_stride;
        for (int64_t x = 0; x < src.width; ++x) {
          const uint8_t* px = r + x * src.col_stride;
          for (int64_t c = 0; c < C; ++c) {
            const float v = wk * static_cast<float>(px[c * src.ch_stride]);
            float& d = row[x * C + c];
            d = first ? v : d + v;
          }
        }
        first = false;
      }
    }
    hpass_float_row(row, static_cast<int>(C), tx, s.acc.data());
    finish_row(pj, p, s.acc.data(), y);
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Planning and threading
// ------------------------------------------------------------------------------------------------

// Rough instruction counts per pass (calibrated on x86-64 with SSE2; only the ratio matters).
static bool row_contiguous(const SrcImage& s) {
  return s.col_stride == s.channels && (s.channels == 1 || s.ch_stride == 1);
}

static double hpass_cost_per_output(const SrcImage& s, int k, bool from_float) {
  if (s.channels == 1) return 3.0 * k + 2.0;
#if EDGE_AD_SIMD
  if (from_float || (s.col_stride >= 3 && s.ch_stride == 1)) return (from_float ? 3.0 : 5.0) * k + 3.0;
#else
  (void)from_float;
#endif
  return 9.0 * k + 4.0;
}

static double cost_hfirst(const SrcImage& s, const OutParams& p, const AxisTaps& ty, const AxisTaps& tx) {
  const int lanes = s.channels == 1 ? 1 : 4;
  const double rows = std::min<double>(ty.used, static_cast<double>(p.height) * ty.nnz);
  return rows * p.width * hpass_cost_per_output(s, tx.k, false) +
         0.5 * p.height * p.width * lanes * ty.nnz + 6.0 * p.height * p.width;
}

static double cost_vfirst(const SrcImage& s, const OutParams& p, const AxisTaps& ty, const AxisTaps& tx) {
  const double per_elem = row_contiguous(s) ? 1.0 : 4.0;
  const double row_elems = static_cast<double>(s.width) * static_cast<double>(s.channels);
  return static_cast<double>(p.height) * ty.nnz * row_elems * per_elem +
         static_cast<double>(p.height) * p.width * hpass_cost_per_output(s, tx.k, true) + 6.0 * p.height * p.width;
}

int choose_order(const SrcImage& src, const OutParams& p, const AxisTaps& ty, const AxisTaps& tx) {
  return cost_vfirst(src, p, ty, tx) < cost_hfirst(src, p, ty, tx) ? 1 : 0;
}

int auto_threads() {
  // Cached: hardware_concurrency() reads sysfs on every call (glibc), ~5 us.
  static const int n = [] {
    const unsigned hc = std::thread::hardware_concurrency();
    return static_cast<int>(std::max(1u, std::min(hc == 0 ? 1u : hc, 8u)));
  }();
  return n;
}

// Minimum estimated work (cost units ~ instructions, see cost_hfirst) that justifies one more
// thread: starting and joining a std::thread costs tens of microseconds.
static constexpr double kMinWorkPerThread = 2.0e6;  // ~0.2 ms of work on a Zen 4 core

int run_jobs(const std::vector<Job>& jobs, const OutParams& p, int num_threads, int force_order) {
  if (jobs.empty()) return 0;
  if (p.height <= 0 || p.width <= 0) throw std::invalid_argument("output size must be positive");
  std::vector<Prepared> prep(jobs.size());
  double total = 0.0;
  for (size_t i = 0; i < jobs.size(); ++i) {
    const SrcImage& s = jobs[i].src;
    if (!s.data || s.height <= 0 || s.width <= 0 || (s.channels != 1 && s.channels != 3))
      throw std::invalid_argument("invalid source image");
    if (s.height > INT32_MAX || s.width > INT32_MAX) throw std::invalid_argument("source image too large");
    Prepared& pj = prep[i];
    pj.job = &jobs[i];
    TapKind ky, kx;
    taps_kinds(p.mode, static_cast<int>(s.height), static_cast<int>(s.width), p.height, p.width, &ky, &kx);
    pj.ty = get_taps(static_cast<int>(s.height), p.height, ky);
    pj.tx = get_taps(static_cast<int>(s.width), p.width, kx);
    pj.lanes = s.channels == 1 ? 1 : 4;
    if (s.channels == 3) {
      pj.cidx[0] = p.bgr ? 2 : 0;
      pj.cidx[1] = 1;
      pj.cidx[2] = p.bgr ? 0 : 2;
    }
    pj.contiguous_row = row_contiguous(s);
    const double ch = cost_hfirst(s, p, *pj.ty, *pj.tx);
    const double cv = cost_vfirst(s, p, *pj.ty, *pj.tx);
    pj.order = force_order >= 0 ? force_order : (cv < ch ? 1 : 0);
    pj.cost = std::min(ch, cv);
    total += pj.cost;
  }

  int nt = num_threads > 0 ? num_threads : auto_threads();
  nt = std::min(nt, static_cast<int>(std::max(1.0, std::floor(total / kMinWorkPerThread))));
  nt = std::max(1, std::min(nt, 64));

  struct Chunk { int job, y0, y1; };
  std::vector<Chunk> chunks;
  if (nt == 1) {
    for (size_t i = 0; i < prep.size(); ++i) chunks.push_back({static_cast<int>(i), 0, p.height});
  } else {
    // ~3 chunks per thread (dynamic scheduling evens out uneven rows), never below the
    // per-thread minimum work.
    const double target = std::max(total / (3.0 * nt), kMinWorkPerThread / 2);
    for (size_t i = 0; i < prep.size(); ++i) {
      int pieces = static_cast<int>(std::ceil(prep[i].cost / target));
      pieces = std::max(1, std::min(pieces, p.height));
      for (int q = 0; q < pieces; ++q) {
        const int y0 = static_cast<int>(static_cast<int64_t>(p.height) * q / pieces);
        const int y1 = static_cast<int>(static_cast<int64_t>(p.height) * (q + 1) / pieces);
        if (y1 > y0) chunks.push_back({static_cast<int>(i), y0, y1});
      }
    }
    nt = std::min(nt, static_cast<int>(chunks.size()));
  }

  std::atomic<size_t> next{0};
  std::exception_ptr error;
  std::mutex error_mu;
  auto worker = [&]() {
    try {
      Scratch scratch;
      for (;;) {
        const size_t c = next.fetch_add(1);
        if (c >= chunks.size()) break;
        const Chunk& ch = chunks[c];
        const Prepared& pj = prep[static_cast<size_t>(ch.job)];
        if (pj.order == 1) run_vfirst(pj, p, ch.y0, ch.y1, scratch);
        else run_hfirst(pj, p, ch.y0, ch.y1, scratch);
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mu);
      if (!error) error = std::current_exception();
      next.store(chunks.size());
    }
  };
  if (nt == 1) {
    worker();
  } else {
    std::vector<std::thread> threads;
    threads.reserve(static_cast<size_t>(nt - 1));
    try {
      for (int t = 1; t < nt; ++t) threads.emplace_back(worker);
    } catch (...) {
      // Could not start a thread (resource limits): the threads already running and this one
      // still finish all chunks.
    }
    worker();
    for (auto& th : threads) th.join();
  }
  if (error) std::rethrow_exception(error);
  return nt;
}

}  // namespace edge_ad
