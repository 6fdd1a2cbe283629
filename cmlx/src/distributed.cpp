// mlx-c's distributed operations: lazy arrays built by MLX's own ops.

#include "mlx/c/distributed.h"
#include "mlx/distributed/ops.h"
#include "private.h"

namespace mxd = mlx::core::distributed;

namespace {

template <typename Op>
int lazy_unary(
    mlx_array* res,
    const mlx_array x,
    const mlx_distributed_group group,
    const mlx_stream s,
    Op op) {
  return cmlx::guarded([&] {
    cmlx::set_array(
        res,
        op(cmlx::get_array(x), cmlx::get_group(group), cmlx::get_stream(s)));
  });
}

} // namespace

#define CMLX_LAZY_UNARY(NAME)                                               \
  extern "C" int mlx_distributed_##NAME(                                    \
      mlx_array* res,                                                       \
      const mlx_array x,                                                    \
      const mlx_distributed_group group,                                    \
      const mlx_stream s) {                                                 \
    return lazy_unary(res, x, group, s, [](auto&&... a) {                   \
      return mxd::NAME(std::forward<decltype(a)>(a)...);                    \
    });                                                                     \
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
  return cmlx::guarded([&] {
    cmlx::set_array(
        res,
        mxd::send(
            cmlx::get_array(x),
            dst,
            cmlx::get_group(group),
            cmlx::get_stream(s)));
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
  return cmlx::guarded([&] {
    cmlx::set_array(
        res,
        mxd::recv(
            cmlx::to_shape(shape, shape_num),
            cmlx::to_cpp_dtype(dtype),
            src,
            cmlx::get_group(group),
            cmlx::get_stream(s)));
  });
}

extern "C" int mlx_distributed_recv_like(
    mlx_array* res,
    const mlx_array x,
    int src,
    const mlx_distributed_group group,
    const mlx_stream s) {
  return cmlx::guarded([&] {
    cmlx::set_array(
        res,
        mxd::recv_like(
            cmlx::get_array(x),
            src,
            cmlx::get_group(group),
            cmlx::get_stream(s)));
  });
}
