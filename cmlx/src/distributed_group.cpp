// mlx_distributed_group: a heap mlx::core::distributed::Group.

#include "private.h"

namespace mxd = mlx::core::distributed;

namespace cmlx {

std::optional<mxd::Group> get_group(mlx_distributed_group g) {
  if (g.ctx == nullptr) {
    return std::nullopt;
  }
  return *static_cast<mxd::Group*>(g.ctx);
}

mxd::Group resolve_group(mlx_distributed_group g) {
  if (g.ctx == nullptr) {
    return mxd::init();
  }
  return *static_cast<mxd::Group*>(g.ctx);
}

} // namespace cmlx

extern "C" mlx_distributed_group mlx_distributed_group_new(void) {
  return mlx_distributed_group{nullptr};
}

extern "C" int mlx_distributed_group_free(mlx_distributed_group group) {
  delete static_cast<mxd::Group*>(group.ctx);
  return 0;
}

extern "C" int mlx_distributed_init(
    mlx_distributed_group* res,
    bool strict,
    const char* bk) {
  return cmlx::guarded([&] {
    try {
      cmlx::set_group(res, mxd::init(strict, bk ? bk : "any"));
    } catch (const std::exception& e) {
      throw cmlx::Error(MLXDIST_ERROR_INIT, e.what());
    }
  });
}

extern "C" int mlx_distributed_group_rank(mlx_distributed_group group) {
  int v = -1;
  cmlx::guarded([&] { v = cmlx::resolve_group(group).rank(); });
  return v;
}

extern "C" int mlx_distributed_group_size(mlx_distributed_group group) {
  int v = -1;
  cmlx::guarded([&] { v = cmlx::resolve_group(group).size(); });
  return v;
}

extern "C" int mlx_distributed_group_split(
    mlx_distributed_group* res,
    mlx_distributed_group group,
    int color,
    int key) {
  return cmlx::guarded([&] {
    cmlx::set_group(res, cmlx::resolve_group(group).split(color, key));
  });
}

extern "C" bool mlx_distributed_is_available(const char* bk) {
  bool v = false;
  cmlx::guarded([&] { v = mxd::is_available(bk ? bk : "any"); });
  return v;
}
