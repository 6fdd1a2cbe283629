// mlx_stream: streams are per thread for CPU command encoders, so the
// default CPU stream must be fetched on the thread that uses it.

#include "mlx/c/stream.h"
#include "private.h"

extern "C" mlx_stream mlx_stream_new(void) {
  return mlx_stream{nullptr};
}

extern "C" int mlx_stream_free(mlx_stream stream) {
  delete static_cast<mlx::core::Stream*>(stream.ctx);
  return 0;
}

extern "C" int mlx_stream_get_index(int* index, mlx_stream stream) {
  return cmlx::guarded([&] { *index = cmlx::get_stream(stream).index; });
}

extern "C" mlx_stream mlx_default_cpu_stream_new(void) {
  mlx_stream res{nullptr};
  cmlx::guarded([&] {
    res.ctx = new mlx::core::Stream(
        mlx::core::default_stream(mlx::core::Device::cpu));
  });
  return res;
}

extern "C" int mlx_synchronize(mlx_stream stream) {
  return cmlx::guarded(
      [&] { mlx::core::synchronize(cmlx::get_stream(stream)); });
}
