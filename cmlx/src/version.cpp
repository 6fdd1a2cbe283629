// mlx_version: the version of the libmlx running in this process.

#include "mlx/c/version.h"
#include "mlx/version.h"
#include "private.h"

extern "C" int mlx_version(mlx_string* str) {
  return cmlx::guarded([&] {
    if (str == nullptr) {
      throw std::invalid_argument("null result pointer");
    }
    if (str->ctx) {
      *static_cast<std::string*>(str->ctx) = mlx::core::version();
    } else {
      str->ctx = new std::string(mlx::core::version());
    }
  });
}
