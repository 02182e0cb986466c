// nanobind module edge_ad.runtime._preprocess: thin wrapper over preprocess.hpp.
// The public, validated API is edge_ad.runtime.preprocess (Python); this module re-checks the
// invariants it relies on (so a direct call cannot corrupt memory) and releases the GIL.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/array.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <array>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "preprocess.hpp"
#ifdef EDGE_AD_WITH_CUDA
#include <cstdint>

#include "preprocess_cuda.hpp"
#endif

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using Frame = nb::ndarray<const uint8_t, nb::device::cpu>;
using OutArray = nb::ndarray<nb::device::cpu, nb::c_contig>;

bool is_float_dtype(nb::dlpack::dtype dt, int bits) {
  return dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float) && dt.bits == bits && dt.lanes == 1;
}

edge_ad::ResizeMode parse_mode(const std::string& mode) {
  if (mode == "bilinear") return edge_ad::ResizeMode::Bilinear;
  if (mode == "area") return edge_ad::ResizeMode::Area;
  if (mode == "auto") return edge_ad::ResizeMode::Auto;
  throw nb::value_error(("resize mode must be 'auto', 'bilinear' or 'area', got '" + mode + "'").c_str());
}

// Output geometry and the per-channel affine x * scale + offset that folds /255, -mean and /std.
edge_ad::OutParams make_params(int height, int width, const std::string& mode, bool bgr, bool half,
                               const std::array<double, 3>& mean, const std::array<double, 3>& stdv) {
  edge_ad::OutParams p;
  p.height = height;
  p.width = width;
  p.mode = parse_mode(mode);
  p.bgr = bgr;
  p.half = half;
  for (int c = 0; c < 3; ++c) {
    if (!(stdv[c] > 0.0) || !std::isfinite(stdv[c]) || !std::isfinite(mean[c]))
      throw nb::value_error("std must be positive and mean/std finite");
    p.scale[c] = static_cast<float>(1.0 / (255.0 * stdv[c]));
    p.offset[c] = static_cast<float>(-mean[c] / stdv[c]);
  }
  return p;
}

// Channel count (1 or 3) of a non-empty (H, W) or (H, W, C) frame.
int64_t frame_channels(const Frame& f) {
  if (f.ndim() != 2 && f.ndim() != 3) throw nb::value_error("frames must be 2-D (H, W) or 3-D (H, W, C)");
  const int64_t ch = f.ndim() == 3 ? static_cast<int64_t>(f.shape(2)) : 1;
  if (ch != 1 && ch != 3) throw nb::value_error("frames must have 1 or 3 channels");
  if (f.shape(0) == 0 || f.shape(1) == 0) throw nb::value_error("empty frame");
  return ch;
}

int preprocess_into(const std::vector<Frame>& frames, OutArray out, bool bgr, const std::string& mode,
                    std::array<double, 3> mean, std::array<double, 3> stdv, int num_threads, int order) {
  if (frames.empty()) throw nb::value_error("no frames given");
  if (out.ndim() != 4 || out.shape(0) != frames.size() || out.shape(1) != 3 || out.shape(2) == 0 ||
      out.shape(3) == 0)
    throw nb::value_error("out must have shape (len(frames), 3, H, W)");
  const bool half = is_float_dtype(out.dtype(), 16);
  if (!half && !is_float_dtype(out.dtype(), 32)) throw nb::type_error("out must be float32 or float16");
  if (num_threads < 0) throw nb::value_error("num_threads must be >= 0 (0 = automatic)");
  if (order < -1 || order > 1) throw nb::value_error("order must be -1 (auto), 0 or 1");

  const edge_ad::OutParams p =
      make_params(static_cast<int>(out.shape(2)), static_cast<int>(out.shape(3)), mode, bgr, half, mean, stdv);

  const size_t elem = half ? 2 : 4;
  const size_t per_frame = 3 * static_cast<size_t>(p.height) * p.width * elem;
  auto* base = static_cast<uint8_t*>(out.data());
  std::vector<edge_ad::Job> jobs(frames.size());
  for (size_t i = 0; i < frames.size(); ++i) {
    const Frame& f = frames[i];
    const int64_t ch = frame_channels(f);
    edge_ad::SrcImage& s = jobs[i].src;
    s.data = f.data();
    s.height = static_cast<int64_t>(f.shape(0));
    s.width = static_cast<int64_t>(f.shape(1));
    s.channels = ch;
    s.row_stride = f.stride(0);  // uint8: element strides are byte strides
    s.col_stride = f.stride(1);
    s.ch_stride = f.ndim() == 3 ? f.stride(2) : 0;
    jobs[i].out = base + i * per_frame;
  }
  nb::gil_scoped_release release;
  return edge_ad::run_jobs(jobs, p, num_threads, order);
}

std::tuple<int, std::vector<int32_t>, std::vector<float>> taps(int src, int dst, const std::string& kind) {
  edge_ad::TapKind k;
  if (kind == "linear") k = edge_ad::TapKind::Linear;
  else if (kind == "area_linear") k = edge_ad::TapKind::AreaLinear;
  else if (kind == "box") k = edge_ad::TapKind::Box;
  else throw nb::value_error("kind must be 'linear', 'area_linear' or 'box'");
  if (src <= 0 || dst <= 0) throw nb::value_error("sizes must be positive");
  auto t = edge_ad::get_taps(src, dst, k);
  return {t->k, t->start, t->w};
}

void f32_to_f16(nb::ndarray<const float, nb::device::cpu, nb::c_contig> in,
                nb::ndarray<uint16_t, nb::device::cpu, nb::c_contig> out) {
  if (in.size() != out.size()) throw nb::value_error("in and out must have the same size");
  const float* src = in.data();
  uint16_t* dst = out.data();
  const size_t n = in.size();
  nb::gil_scoped_release release;
  for (size_t i = 0; i < n; ++i) dst[i] = edge_ad::float_to_half(src[i]);
}

#ifdef EDGE_AD_WITH_CUDA
// GPU path (built only when CMake found a CUDA compiler): host uint8 frames -> device buffer at
// out_ptr ((B, 3, height, width) float32 / float16), queued on `stream`. Validated like
// preprocess_into; frames must have their pixels packed within each row.
size_t preprocess_cuda_py(const std::vector<Frame>& frames, std::uintptr_t out_ptr, int height, int width, bool half,
                          bool bgr, const std::string& mode, std::array<double, 3> mean, std::array<double, 3> stdv,
                          std::uintptr_t stream, std::uintptr_t scratch, size_t scratch_bytes, int device) {
  if (frames.empty()) throw nb::value_error("no frames given");
  if (out_ptr == 0) throw nb::value_error("out_ptr is a null device pointer");
  if (height <= 0 || width <= 0) throw nb::value_error("height and width must be positive");
  const edge_ad::OutParams p = make_params(height, width, mode, bgr, half, mean, stdv);
  std::vector<edge_ad::HostFrame> host(frames.size());
  for (size_t i = 0; i < frames.size(); ++i) {
    const Frame& f = frames[i];
    const int64_t ch = frame_channels(f);
    if (f.stride(1) != ch || (f.ndim() == 3 && f.stride(2) != 1) ||
        f.stride(0) < static_cast<int64_t>(f.shape(1)) * ch)
      throw nb::value_error("frames must have packed pixels in each row (np.ascontiguousarray)");
    host[i] = {f.data(), static_cast<int64_t>(f.shape(0)), static_cast<int64_t>(f.shape(1)), ch, f.stride(0)};
  }
  nb::gil_scoped_release release;
  return edge_ad::preprocess_cuda(host, p, reinterpret_cast<void*>(out_ptr), stream, reinterpret_cast<void*>(scratch),
                                  scratch_bytes, device);
}
#endif

}  // namespace

NB_MODULE(_preprocess, m) {
  m.doc() = "edge_ad native preprocessing (use edge_ad.runtime.preprocess, which validates inputs)";
  m.attr("API_VERSION") = 2;  // 2: resize mode "auto"
  m.def("preprocess_into", &preprocess_into, "frames"_a.noconvert(), "out"_a.noconvert(), "bgr"_a, "mode"_a, "mean"_a,
        "std"_a, "num_threads"_a = 0, "order"_a = -1,
        "Resize + normalise uint8 frames into out (B, 3, H, W) float32/float16, RGB planes. "
        "Releases the GIL. Returns the number of threads used. order: -1 auto, 0 horizontal "
        "pass first, 1 vertical pass first (testing / benchmarking).");
  m.def("taps", &taps, "src"_a, "dst"_a, "kind"_a,
        "Per-axis taps (k, start[dst], weights[dst*k]); kind: 'linear', 'area_linear', 'box'.");
  m.def("f32_to_f16", &f32_to_f16, "src"_a.noconvert(), "dst"_a.noconvert(),
        "Convert float32 to IEEE binary16 bits (round to nearest even), as the float16 output does.");
  m.def("auto_threads", &edge_ad::auto_threads, "Threads used for large work when num_threads=0.");
#ifdef EDGE_AD_WITH_CUDA
  m.def("preprocess_cuda", &preprocess_cuda_py, "frames"_a.noconvert(), "out_ptr"_a, "height"_a, "width"_a, "half"_a,
        "bgr"_a, "mode"_a, "mean"_a, "std"_a, "stream"_a, "scratch"_a, "scratch_bytes"_a, "device"_a = -1,
        "CUDA: resize + normalise uint8 host frames into the device buffer at out_ptr (B, 3, H, W), "
        "queued on stream (cudaStream_t as int), staging through the device scratch buffer used only on that "
        "stream. Returns 0 when queued, else the scratch bytes needed (nothing queued). device >= 0 is made "
        "current first. Releases the GIL.");
  m.def("cuda_device_count", &edge_ad::cuda_device_count, "Visible CUDA devices (0 without driver / GPU).");
#endif
}
