// edge_ad CUDA preprocessing kernel, see preprocess_cuda.hpp.
//
// One thread per output pixel: out[c, y, x] = sum_i wy[y, i] * sum_j wx[x, j] * src[sy[y] + i,
// sx[x] + j, ch(c)], then * scale[c] + offset[c]. The taps (start index + fixed-width weights per
// output row / column) are the CPU core's own (get_taps), uploaded per frame geometry, so the GPU
// and CPU paths share every geometric decision (OpenCV INTER_LINEAR / INTER_AREA semantics).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <memory>
#include <stdexcept>
#include <string>

#include "preprocess_cuda.hpp"

namespace edge_ad {
namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("CUDA ") + what + " failed: " + cudaGetErrorName(err) + " (" +
                             cudaGetErrorString(err) + ")");
}

struct KernelArgs {
  const uint8_t* src;   // packed rows: pitch = width * channels bytes
  int64_t pitch;
  int channels;         // 1 or 3
  int out_h, out_w;
  int ky, kx;           // taps per output row / column
  const int32_t* sy;    // [out_h] first source row of each output row
  const float* wy;      // [out_h * ky]
  const int32_t* sx;    // [out_w]
  const float* wx;      // [out_w * kx]
  int cidx[3];          // source channel of output plane R, G, B (BGR: 2, 1, 0)
  float scale[3];       // out = value * scale + offset, per RGB plane
  float offset[3];
  void* out;            // (3, out_h, out_w) planes of this frame
  bool half;
};

__global__ void resize_normalize(const KernelArgs a) {
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  const int y = blockIdx.y * blockDim.y + threadIdx.y;
  if (x >= a.out_w || y >= a.out_h) return;
  const int C = a.channels;
  const int x0 = a.sx[x];
  const int y0 = a.sy[y];
  const float* wyr = a.wy + static_cast<int64_t>(y) * a.ky;
  const float* wxr = a.wx + static_cast<int64_t>(x) * a.kx;
  float acc[3] = {0.f, 0.f, 0.f};
  for (int i = 0; i < a.ky; ++i) {
    const float wyv = wyr[i];
    if (wyv == 0.f) continue;  // padding taps (the tap width is the widest row's)
    const uint8_t* row = a.src + static_cast<int64_t>(y0 + i) * a.pitch + static_cast<int64_t>(x0) * C;
    float h[3] = {0.f, 0.f, 0.f};
    for (int j = 0; j < a.kx; ++j) {
      const float wxv = wxr[j];
      const uint8_t* px = row + static_cast<int64_t>(j) * C;
      h[0] += wxv * static_cast<float>(px[0]);
      if (C == 3) {
        h[1] += wxv * static_cast<float>(px[1]);
        h[2] += wxv * static_cast<float>(px[2]);
      }
    }
    acc[0] += wyv * h[0];
    acc[1] += wyv * h[1];
    acc[2] += wyv * h[2];
  }
  const int64_t plane = static_cast<int64_t>(a.out_h) * a.out_w;
  const int64_t idx = static_cast<int64_t>(y) * a.out_w + x;
  for (int c = 0; c < 3; ++c) {
    const float v = (C == 1 ? acc[0] : acc[a.cidx[c]]) * a.scale[c] + a.offset[c];
    if (a.half) static_cast<__half*>(a.out)[c * plane + idx] = __float2half_rn(v);
    else static_cast<float*>(a.out)[c * plane + idx] = v;
  }
}

size_t align_up(size_t n) { return (n + 255) & ~static_cast<size_t>(255); }

}  // namespace

size_t preprocess_cuda(const std::vector<HostFrame>& frames, const OutParams& p, void* out_device,
                       std::uintptr_t stream_int, void* scratch, size_t scratch_bytes, int device) {
  if (p.height <= 0 || p.width <= 0) throw std::invalid_argument("output size must be positive");
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_int);
  const size_t elem = p.half ? 2 : 4;
  const size_t per_frame = 3 * static_cast<size_t>(p.height) * p.width * elem;

  // Per frame the scratch holds the source pixels, then the four tap arrays. Sized (and checked)
  // for every frame before anything is queued, so a too-small buffer changes nothing.
  struct Plan {
    std::shared_ptr<const AxisTaps> ty, tx;
    size_t pitch, n_src, n_sy, n_wy, n_sx, n_wx;
  };
  std::vector<Plan> plans(frames.size());
  size_t needed = 0;
  for (size_t f = 0; f < frames.size(); ++f) {
    const HostFrame& s = frames[f];
    if (!s.data || s.height <= 0 || s.width <= 0 || (s.channels != 1 && s.channels != 3) ||
        s.row_stride < s.width * s.channels)
      throw std::invalid_argument("invalid host frame (needs packed pixels and a positive row stride)");
    TapKind ky, kx;
    taps_kinds(p.mode, static_cast<int>(s.height), static_cast<int>(s.width), p.height, p.width, &ky, &kx);
    Plan& pl = plans[f];
    pl.ty = get_taps(static_cast<int>(s.height), p.height, ky);
    pl.tx = get_taps(static_cast<int>(s.width), p.width, kx);
    pl.pitch = static_cast<size_t>(s.width * s.channels);
    pl.n_src = align_up(pl.pitch * static_cast<size_t>(s.height));
    pl.n_sy = align_up(pl.ty->start.size() * sizeof(int32_t));
    pl.n_wy = align_up(pl.ty->w.size() * sizeof(float));
    pl.n_sx = align_up(pl.tx->start.size() * sizeof(int32_t));
    pl.n_wx = align_up(pl.tx->w.size() * sizeof(float));
    needed = std::max(needed, pl.n_src + pl.n_sy + pl.n_wy + pl.n_sx + pl.n_wx);
  }
  if (scratch == nullptr || scratch_bytes < needed) return needed;
  // cudaSetDevice is per thread: the caller's device must be current on whichever thread runs this.
  if (device >= 0) check(cudaSetDevice(device), "cudaSetDevice");

  for (size_t f = 0; f < frames.size(); ++f) {
    const HostFrame& s = frames[f];
    const Plan& pl = plans[f];
    const auto& ty = pl.ty;
    const auto& tx = pl.tx;
    const size_t pitch = pl.pitch, n_src = pl.n_src, n_sy = pl.n_sy, n_wy = pl.n_wy, n_sx = pl.n_sx;
    // One persistent scratch buffer per caller stream: frames reuse it in stream order (the copy
    // for frame f+1 is queued after frame f's kernel on the same stream).
    auto* base = static_cast<uint8_t*>(scratch);
    uint8_t* d_src = base;
    auto* d_sy = reinterpret_cast<int32_t*>(base + n_src);
    auto* d_wy = reinterpret_cast<float*>(base + n_src + n_sy);
    auto* d_sx = reinterpret_cast<int32_t*>(base + n_src + n_sy + n_wy);
    auto* d_wx = reinterpret_cast<float*>(base + n_src + n_sy + n_wy + n_sx);
    // From pageable memory these copies stage the host bytes before returning, so the frame and
    // the taps may change or die after this call; the device side stays stream-ordered.
    check(cudaMemcpy2DAsync(d_src, pitch, s.data, static_cast<size_t>(s.row_stride), pitch,
                            static_cast<size_t>(s.height), cudaMemcpyHostToDevice, stream), "cudaMemcpy2DAsync");
    check(cudaMemcpyAsync(d_sy, ty->start.data(), ty->start.size() * sizeof(int32_t), cudaMemcpyHostToDevice, stream),
          "cudaMemcpyAsync(taps)");
    check(cudaMemcpyAsync(d_wy, ty->w.data(), ty->w.size() * sizeof(float), cudaMemcpyHostToDevice, stream),
          "cudaMemcpyAsync(taps)");
    check(cudaMemcpyAsync(d_sx, tx->start.data(), tx->start.size() * sizeof(int32_t), cudaMemcpyHostToDevice, stream),
          "cudaMemcpyAsync(taps)");
    check(cudaMemcpyAsync(d_wx, tx->w.data(), tx->w.size() * sizeof(float), cudaMemcpyHostToDevice, stream),
          "cudaMemcpyAsync(taps)");

    KernelArgs a;
    a.src = d_src;
    a.pitch = static_cast<int64_t>(pitch);
    a.channels = static_cast<int>(s.channels);
    a.out_h = p.height;
    a.out_w = p.width;
    a.ky = ty->k;
    a.kx = tx->k;
    a.sy = d_sy;
    a.wy = d_wy;
    a.sx = d_sx;
    a.wx = d_wx;
    a.cidx[0] = p.bgr ? 2 : 0;
    a.cidx[1] = 1;
    a.cidx[2] = p.bgr ? 0 : 2;
    for (int c = 0; c < 3; ++c) {
      a.scale[c] = p.scale[c];
      a.offset[c] = p.offset[c];
    }
    a.out = static_cast<uint8_t*>(out_device) + f * per_frame;
    a.half = p.half;
    const dim3 block_dim(32, 8);
    const dim3 grid((p.width + 31) / 32, (p.height + 7) / 8);
    resize_normalize<<<grid, block_dim, 0, stream>>>(a);
    check(cudaGetLastError(), "kernel launch");
  }
  return 0;
}

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver / no device" error
    return 0;
  }
  return n;
}

}  // namespace edge_ad
