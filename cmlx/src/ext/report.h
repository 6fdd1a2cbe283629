// How the extension reports a failure: through the error handler of the C
// API it is built with (report_cmlx.cpp or report_mlxc.cpp).

#pragma once

namespace mlxdist_ext {

void report(const char* msg);

} // namespace mlxdist_ext
