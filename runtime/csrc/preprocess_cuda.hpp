// edge_ad CUDA preprocessing: uint8 HxWx{1,3} host frames -> resized, normalised float32 /
// float16 RGB planes written straight into a device buffer (e.g. a TensorRT input binding).
// Same semantics as the CPU core (preprocess.hpp): the per-axis taps come from get_taps(), so
// bilinear / area geometry, BGR/RGB/grey handling and the normalisation are identical; only the
// float summation order differs (within float rounding).
//
// This header has no CUDA includes, so bindings.cpp compiles with a plain C++ compiler; it is
// only used when the build defines EDGE_AD_WITH_CUDA (CMake found a CUDA compiler).
#pragma once

#include <cstdint>
#include <vector>

#include "preprocess.hpp"

namespace edge_ad {

// One host frame whose pixels are packed within each row (channel stride 1, pixel stride =
// channels bytes); rows are `row_stride` (> 0) bytes apart, so ROI crops of packed frames work
// without a copy.
struct HostFrame {
  const uint8_t* data = nullptr;
  int64_t height = 0, width = 0, channels = 0;  // channels: 1 or 3
  int64_t row_stride = 0;
};

// Uploads each frame (pageable host memory; it may be reused as soon as this returns) and runs
// the resize + normalise kernel on `stream` (a cudaStream_t as an integer; 0 = legacy default),
// writing frame i to out_device + i * 3 * p.height * p.width elements (float32, or binary16 when
// p.half). Asynchronous with respect to the device: synchronise the stream (or record an event)
// before reading the output. Throws std::runtime_error naming the failed CUDA call.
//
// `scratch` is a device buffer of `scratch_bytes` owned by the caller and used only on `stream`
// (no per-frame allocation: cudaMallocAsync needs memory pools, which some devices lack). Returns
// 0 when the work was queued, or the bytes the scratch needs (nothing queued) when it is null or
// too small: grow it (after the stream has finished with the old one) and call again.
// `device` >= 0 is made current on the calling thread first (cudaSetDevice is per thread).
size_t preprocess_cuda(const std::vector<HostFrame>& frames, const OutParams& p, void* out_device,
                       std::uintptr_t stream, void* scratch, size_t scratch_bytes, int device);

// Number of visible CUDA devices (0 when there is no driver or no GPU).
int cuda_device_count();

}  // namespace edge_ad
