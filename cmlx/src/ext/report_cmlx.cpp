// Built with cmlx: reuse its handler dispatch.

#include "../private.h"
#include "report.h"

namespace mlxdist_ext {

void report(const char* msg) {
  cmlx::report_error(msg);
}

} // namespace mlxdist_ext
