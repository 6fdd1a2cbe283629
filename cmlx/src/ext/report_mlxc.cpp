// Built against a real mlx-c install: mlx-c's own error entry point.

#include "mlx/c/error.h"
#include "report.h"

namespace mlxdist_ext {

void report(const char* msg) {
  _mlx_error(__FILE__, __LINE__, "%s", msg);
}

} // namespace mlxdist_ext
