// mlx-c's failure contract in one place: a C++ exception becomes "pass the
// message to the error handler and return 1". Header-only, so the extension
// can share it when built against a real mlx-c.

#pragma once

#include <exception>

namespace cmlx {

template <typename Report, typename F>
int guarded_with(Report report, F&& body) {
  try {
    body();
    return 0;
  } catch (const std::exception& e) {
    report(e.what());
  } catch (...) {
    report("unknown C++ exception");
  }
  return 1;
}

} // namespace cmlx
