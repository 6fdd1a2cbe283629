// mlx-c's distributed operations: lazy arrays built by MLX's own ops.

#include "mlx/c/distributed.h"
#include "mlx/distributed/ops.h"
#include "private.h"

namespace mxd = mlx::core::distributed;

namespace {

// Stores the lazy array `make()` returns in `res`.
template <typename Make>
int lazy(mlx_array* res, Make make) {
  return cmlx::guarded([&] { cmlx::set_array(res, make()); });
}

} // namespace

#define CMLX_LAZY_UNARY(NAME)                                  \
  extern "C" int mlx_distributed_##NAME(                       \
      mlx_array* res,                                          \
      const mlx_array x,                                       \
      const mlx_distributed_group group,                       \
      const mlx_stream s) {                                    \
    return lazy(res, [&] {                                     \
      return mxd::NAME(                                        \
          cmlx::get_array(x),                                  \
          cmlx::get_group(group),                              \
          cmlx::get_stream(s));                                \
    });                                                        \
  }

CMLX_LAZY_UNARY(all_gather)
CMLX_LAZY_UNARY(all_max)
CMLX_LAZY_UNARY(all_min)
CMLX_LAZY_UNARY(all_sum)
CMLX_LAZY_UNARY(sum_scatter)

extern "C" int mlx_distributed_send(
    mlx_array* res,
    const mlx_array x,
    int dst,
    const mlx_distributed_group group,
    const mlx_stream s) {
  return lazy(res, [&] {
    return mxd::send(
        cmlx::get_array(x), dst, cmlx::get_group(group), cmlx::get_stream(s));
  });
}

extern "C" int mlx_distributed_recv(
    mlx_array* res,
    const int* shape,
    size_t shape_num,
    mlx_dtype dtype,
    int src,
    const mlx_distributed_group group,
    const mlx_stream s) {
  return lazy(res, [&] {
    return mxd::recv(
        cmlx::to_shape(shape, shape_num),
        cmlx::to_cpp_dtype(dtype),
        src,
        cmlx::get_group(group),
        cmlx::get_stream(s));
  });
}

extern "C" int mlx_distributed_recv_like(
    mlx_array* res,
    const mlx_array x,
    int src,
    const mlx_distributed_group group,
    const mlx_stream s) {
  return lazy(res, [&] {
    return mxd::recv_like(
        cmlx::get_array(x), src, cmlx::get_group(group), cmlx::get_stream(s));
  });
}
