// Shared helpers of the cmlx implementation: handle <-> C++ object
// conversion and the error-reporting wrapper every entry point uses.

#pragma once

#include <exception>
#include <optional>
#include <string>
#include <utility>

#include "mlx/array.h"
#include "mlx/distributed/distributed.h"
#include "mlx/stream.h"

#include "mlx/c/array.h"
#include "mlx/c/distributed_group.h"
#include "mlx/c/stream.h"
#include "mlx/c/string.h"
#include "convert.h"
#include "guarded.h"

namespace cmlx {

namespace mx = mlx::core;

// Passes `msg` to the installed mlx_set_error_handler handler.
void report_error(const char* msg);

// Runs `body`; a C++ exception becomes mlx-c's "report and return 1".
template <typename F>
int guarded(F&& body) {
  return guarded_with(report_error, std::forward<F>(body));
}

template <typename T>
T& deref(void* ctx, const char* what) {
  if (ctx == nullptr) {
    throw std::invalid_argument(std::string("null ") + what + " handle");
  }
  return *static_cast<T*>(ctx);
}

inline mx::array& get_array(mlx_array a) {
  return deref<mx::array>(a.ctx, "mlx_array");
}

inline mx::Stream& get_stream(mlx_stream s) {
  return deref<mx::Stream>(s.ctx, "mlx_stream");
}

// A null group means the global group.
std::optional<mx::distributed::Group> get_group(mlx_distributed_group g);
// The group itself (the global one for a null handle).
mx::distributed::Group resolve_group(mlx_distributed_group g);

inline void set_group(mlx_distributed_group* res, mx::distributed::Group g) {
  set_handle(res, std::move(g));
}

} // namespace cmlx
