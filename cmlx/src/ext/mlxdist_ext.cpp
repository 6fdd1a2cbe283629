// cmlx extensions (mlxdist_ prefix): per-thread error capture, build facts,
// MLX-owned buffers and collectives that call the backend with no graph.
// Handles follow mlx-c's layout: ctx points at the C++ object.

#include <dlfcn.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <future>
#include <memory>
#include <stdexcept>
#include <string>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/distributed/distributed.h"
#include "mlx/distributed/distributed_impl.h"
#include "mlx/scheduler.h"
#include "mlx/stream.h"
#include "mlx/version.h"

#include "../convert.h"
#include "../guarded.h"
#include "mlx/c/error.h"
#include "mlxdist/cmlx_ext.h"

namespace mlx::core::gpu {
bool is_available(); // exported by libmlx; its header is not in the wheel
} // namespace mlx::core::gpu

namespace mx = mlx::core;
namespace mxd = mlx::core::distributed;

namespace {

thread_local std::string last_error;
thread_local mlxdist_error_kind last_error_kind = MLXDIST_ERROR_NONE;

template <typename F>
int guarded(F&& body) {
  // mlx-c's own entry point reaches whichever handler is installed, whether
  // the extension is linked with cmlx or with a real mlx-c.
  return cmlx::guarded_with(
      [](const char* msg) { _mlx_error(__FILE__, __LINE__, "%s", msg); },
      std::forward<F>(body));
}

// Whether buffers come from MLX's CPU allocator, which stores each buffer's
// size in the word before the data it hands out (Buffer::raw_ptr() is
// ptr() + one word). Checked on a real allocation rather than assumed.
bool cpu_allocator_layout() {
  static const bool ok = [] {
    if (mx::gpu::is_available()) {
      return false;
    }
    auto probe = mx::allocator::malloc(64);
    auto buffer = probe.buffer();
    return buffer.raw_ptr() ==
        static_cast<void*>(static_cast<char*>(buffer.ptr()) + sizeof(size_t));
  }();
  return ok;
}

// MLX data over memory it does not own. Where the allocator can adopt it
// (Metal, page-aligned) that is the official path. On the CPU build a Buffer
// one word before `data` yields `data` as its raw pointer; its deleter does
// nothing (the memory stays the caller's) and, since such arrays only meet
// the backends' direct calls, which read data() and nbytes(), nothing reads
// the size word.
mx::allocator::Data foreign_data(void* data, size_t nbytes) {
  auto adopted = mx::allocator::make_buffer(data, nbytes);
  if (adopted.ptr() != nullptr) {
    return mx::allocator::Data(
        adopted, [](mx::allocator::Buffer b) { mx::allocator::release(b); });
  }
  if (!cpu_allocator_layout()) {
    throw std::runtime_error(
        "[mlxdist] this MLX build can neither adopt nor view foreign memory");
  }
  return mx::allocator::Data(
      mx::allocator::Buffer(static_cast<char*>(data) - sizeof(size_t)),
      [](mx::allocator::Buffer) {});
}

[[noreturn]] void fail(mlxdist_error_kind kind, const std::string& msg) {
  throw cmlx::Error(kind, "[mlxdist] " + msg);
}

mx::array& array_of(mlx_array a, const char* name) {
  if (a.ctx == nullptr) {
    fail(MLXDIST_ERROR_ARGUMENT, std::string("null array: ") + name);
  }
  return *static_cast<mx::array*>(a.ctx);
}

bool is_dense(const mx::array& a) {
  return a.status() != mx::array::Status::unscheduled &&
      a.flags().row_contiguous && a.data_size() == a.size();
}

mx::array& dense_array(mlx_array handle, const char* name) {
  auto& a = array_of(handle, name);
  if (a.status() == mx::array::Status::unscheduled) {
    fail(MLXDIST_ERROR_ARGUMENT, std::string("array is not evaluated: ") + name);
  }
  a.wait();
  if (!is_dense(a)) {
    fail(MLXDIST_ERROR_ARGUMENT, std::string("array is not row contiguous: ") + name);
  }
  return a;
}

mxd::Group group_of(mlx_distributed_group g) {
  return g.ctx ? *static_cast<mxd::Group*>(g.ctx) : mxd::init();
}

mx::Stream& stream_of(mlx_stream s) {
  if (s.ctx == nullptr) {
    fail(MLXDIST_ERROR_ARGUMENT, "null stream");
  }
  return *static_cast<mx::Stream*>(s.ctx);
}

// The bytes `op` writes for an input of `in_bytes` on `size` ranks. The
// caller shapes `out` (mlxdist.rules holds the shape rules); this only keeps
// the backend inside the memory it was given.
size_t result_bytes(size_t in_bytes, mlxdist_op op, int size) {
  switch (op) {
    case MLXDIST_ALL_GATHER:
      return in_bytes * size;
    case MLXDIST_SUM_SCATTER:
      return in_bytes / size;
    case MLXDIST_ALL_SUM:
    case MLXDIST_ALL_MAX:
    case MLXDIST_ALL_MIN:
      return in_bytes;
  }
  fail(MLXDIST_ERROR_ARGUMENT, "invalid collective op");
}

bool overlap(const mx::array& a, const mx::array& b) {
  auto pa = a.data<char>();
  auto pb = b.data<char>();
  return pa < pb + b.nbytes() && pb < pa + a.nbytes();
}

// Set once the world has failed (mlxdist_abandon_waits): waits end at once.
std::atomic<bool> abandoned{false};

// As mx::synchronize(s) (a completion task queued behind the backend call),
// but the wait wakes every 20 ms to see whether the world was abandoned: a
// backend wait that can never finish (a ring socket worker that exited with
// tasks still queued) then ends with an error instead of blocking forever.
void wait_abandonable(const mx::Stream& s) {
  auto done = std::make_shared<std::promise<void>>();
  auto finished = done->get_future();
  mx::scheduler::enqueue(s, [done] { done->set_value(); });
  while (finished.wait_for(std::chrono::milliseconds(20)) != std::future_status::ready) {
    if (abandoned.load(std::memory_order_relaxed)) {
      throw std::runtime_error(
          "[mlxdist] the world failed; the backend call was abandoned (connection to a peer was lost)");
    }
  }
}

// Runs a backend call and waits for the work it queued on `s`; whatever goes
// wrong there is the transport's failure.
template <typename F>
void communicate(const mx::Stream& s, F&& call) {
  try {
    call();
    wait_abandonable(s);
    mx::scheduler::check_error(s);
  } catch (const std::exception& e) {
    throw cmlx::Error(MLXDIST_ERROR_COMMUNICATION, e.what());
  }
}

void check_peer_in_range(int peer, int size, const char* name) {
  if (peer < 0 || peer >= size) {
    fail(
        MLXDIST_ERROR_RANK,
        std::string(name) + "=" + std::to_string(peer) +
            " is not a rank of a group of size " + std::to_string(size));
  }
}

} // namespace

extern "C" void mlxdist_error_handler(const char* msg, void*) {
  last_error = msg ? msg : "";
  last_error_kind = cmlx::pending_error_kind == MLXDIST_ERROR_NONE
      ? MLXDIST_ERROR_UNKNOWN
      : cmlx::pending_error_kind;
  cmlx::pending_error_kind = MLXDIST_ERROR_NONE;
}

extern "C" const char* mlxdist_last_error(void) {
  return last_error.c_str();
}

extern "C" mlxdist_error_kind mlxdist_last_error_kind(void) {
  return last_error_kind;
}

extern "C" void mlxdist_clear_error(void) {
  last_error.clear();
  last_error_kind = MLXDIST_ERROR_NONE;
}

extern "C" const char* mlxdist_compiled_mlx_version(void) {
#define CMLX_STR2(x) #x
#define CMLX_STR(x) CMLX_STR2(x)
  return CMLX_STR(MLX_VERSION_MAJOR) "." CMLX_STR(
      MLX_VERSION_MINOR) "." CMLX_STR(MLX_VERSION_PATCH);
}

extern "C" const char* mlxdist_libmlx_path(void) {
  static std::string path = [] {
    Dl_info info;
    const char* (*probe)() = &mx::version;
    if (dladdr(reinterpret_cast<void*>(probe), &info) && info.dli_fname) {
      return std::string(info.dli_fname);
    }
    return std::string();
  }();
  return path.c_str();
}

extern "C" void mlxdist_array_release(mlx_array* arr) {
  if (arr) {
    delete static_cast<mx::array*>(arr->ctx);
    arr->ctx = nullptr;
  }
}

extern "C" void mlxdist_group_release(mlx_distributed_group* group) {
  if (group) {
    delete static_cast<mxd::Group*>(group->ctx);
    group->ctx = nullptr;
  }
}

extern "C" void mlxdist_stream_release(mlx_stream* stream) {
  if (stream) {
    delete static_cast<mx::Stream*>(stream->ctx);
    stream->ctx = nullptr;
  }
}

// The shape, dtype and byte size of an array a caller describes.
struct Layout {
  mx::Shape shape;
  mx::Dtype dtype;
  size_t nbytes;
};

Layout layout_of(const int* shape, int dim, mlx_dtype dtype) {
  if (dim < 0) {
    fail(MLXDIST_ERROR_SHAPE, "negative dimension count");
  }
  size_t count;
  mx::Shape s = cmlx::to_shape(shape, dim, &count);
  mx::Dtype dt = cmlx::to_cpp_dtype(dtype);
  if (count > SIZE_MAX / mx::size_of(dt)) {
    fail(MLXDIST_ERROR_MEMORY, "array of " + std::to_string(count) + " elements overflows the address space");
  }
  return Layout{std::move(s), dt, count * mx::size_of(dt)};
}

extern "C" int mlxdist_array_alloc(
    mlx_array* res,
    const int* shape,
    int dim,
    mlx_dtype dtype) {
  return guarded([&] {
    Layout l = layout_of(shape, dim, dtype);
    auto memory = mx::allocator::malloc(l.nbytes);
    if (l.nbytes > 0 && memory.buffer().ptr() == nullptr) {
      fail(MLXDIST_ERROR_MEMORY, "cannot allocate " + std::to_string(l.nbytes) + " bytes");
    }
    cmlx::set_array(res, mx::array(std::move(memory), std::move(l.shape), l.dtype));
  });
}

extern "C" int mlxdist_array_wrap(
    mlx_array* res,
    void* data,
    const int* shape,
    int dim,
    mlx_dtype dtype) {
  return guarded([&] {
    Layout l = layout_of(shape, dim, dtype);
    size_t nbytes = l.nbytes;
    if (data == nullptr && nbytes > 0) {
      fail(MLXDIST_ERROR_ARGUMENT, "null data for a non-empty array");
    }
    auto memory = nbytes == 0 ? mx::allocator::malloc(0) : foreign_data(data, nbytes);
    cmlx::set_array(res, mx::array(std::move(memory), std::move(l.shape), l.dtype));
  });
}

extern "C" void* mlxdist_array_data(const mlx_array arr) {
  if (arr.ctx == nullptr) {
    return nullptr;
  }
  auto& a = *static_cast<mx::array*>(arr.ctx);
  if (a.status() == mx::array::Status::unscheduled) {
    return nullptr;
  }
  a.wait();
  return a.data<void>();
}

extern "C" bool mlxdist_array_is_dense(const mlx_array arr) {
  if (arr.ctx == nullptr) {
    return false;
  }
  auto& a = *static_cast<mx::array*>(arr.ctx);
  if (a.status() != mx::array::Status::unscheduled) {
    a.wait();
  }
  return is_dense(a);
}

extern "C" int mlxdist_collective(
    mlx_array out,
    const mlx_array x,
    mlxdist_op op,
    const mlx_distributed_group group,
    const mlx_stream s) {
  return guarded([&] {
    auto& in = dense_array(x, "x");
    auto& o = dense_array(out, "out");
    auto g = group_of(group);
    int size = g.size();
    if (o.dtype() != in.dtype()) {
      fail(MLXDIST_ERROR_DTYPE, "out has a different dtype than x");
    }
    if (o.nbytes() != result_bytes(in.nbytes(), op, size)) {
      fail(
          MLXDIST_ERROR_SHAPE,
          "out holds " + std::to_string(o.nbytes()) + " bytes, the result " +
              std::to_string(result_bytes(in.nbytes(), op, size)));
    }
    bool in_place = o.data<char>() == in.data<char>();
    if (!in_place && overlap(o, in)) {
      fail(MLXDIST_ERROR_ARGUMENT, "out partly overlaps x");
    }
    if (in_place && (op == MLXDIST_ALL_GATHER || op == MLXDIST_SUM_SCATTER)) {
      fail(MLXDIST_ERROR_ARGUMENT, "all_gather and sum_scatter cannot run in place");
    }
    if (size == 1) {
      if (!in_place) {
        std::memcpy(o.data<char>(), in.data<char>(), in.nbytes());
      }
      return;
    }
    auto raw = g.raw_group();
    auto cs = raw->communication_stream(stream_of(s));
    communicate(cs, [&] {
      switch (op) {
        case MLXDIST_ALL_SUM:
          raw->all_sum(in, o, cs);
          break;
        case MLXDIST_ALL_MAX:
          raw->all_max(in, o, cs);
          break;
        case MLXDIST_ALL_MIN:
          raw->all_min(in, o, cs);
          break;
        case MLXDIST_ALL_GATHER:
          raw->all_gather(in, o, cs);
          break;
        case MLXDIST_SUM_SCATTER:
          raw->sum_scatter(in, o, cs);
          break;
      }
    });
  });
}

extern "C" int mlxdist_send(
    const mlx_array x,
    int dst,
    const mlx_distributed_group group,
    const mlx_stream s) {
  return guarded([&] {
    auto& in = dense_array(x, "x");
    auto g = group_of(group);
    check_peer_in_range(dst, g.size(), "dst");
    auto raw = g.raw_group();
    auto cs = raw->communication_stream(stream_of(s));
    communicate(cs, [&] { raw->send(in, dst, cs); });
  });
}

extern "C" int mlxdist_recv(
    mlx_array out,
    int src,
    const mlx_distributed_group group,
    const mlx_stream s) {
  return guarded([&] {
    auto& o = dense_array(out, "out");
    auto g = group_of(group);
    check_peer_in_range(src, g.size(), "src");
    auto raw = g.raw_group();
    auto cs = raw->communication_stream(stream_of(s));
    communicate(cs, [&] { raw->recv(o, src, cs); });
  });
}

extern "C" void mlxdist_abandon_waits(void) {
  abandoned.store(true);
}
