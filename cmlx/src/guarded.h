// mlx-c's failure contract in one place: a C++ exception becomes "pass the
// message to the error handler and return 1". Header-only, so the extension
// can share it when built against a real mlx-c.
//
// Beside the message, mlxdist records what kind of failure it was (see
// mlxdist_error_kind in cmlx_ext.h): the guard notes the kind, then reports;
// mlxdist's handler, called synchronously on the same thread, takes it.

#pragma once

#include <exception>
#include <new>
#include <stdexcept>
#include <string>

#include "mlxdist/cmlx_ext.h"

namespace cmlx {

// An error whose kind is known where it is raised.
struct Error : std::runtime_error {
  Error(mlxdist_error_kind kind, const std::string& msg)
      : std::runtime_error(msg), kind(kind) {}
  mlxdist_error_kind kind;
};

// The kind of the error being reported on this thread (NONE: unknown). One
// instance per shared object: cmlx and the extension share it when linked
// together; a real mlx-c never sets it.
inline thread_local mlxdist_error_kind pending_error_kind = MLXDIST_ERROR_NONE;

template <typename Report, typename F>
int guarded_with(Report report, F&& body) {
  try {
    body();
    return 0;
  } catch (const Error& e) {
    pending_error_kind = e.kind;
    report(e.what());
  } catch (const std::invalid_argument& e) {
    pending_error_kind = MLXDIST_ERROR_ARGUMENT;
    report(e.what());
  } catch (const std::bad_alloc& e) {
    pending_error_kind = MLXDIST_ERROR_MEMORY;
    report(e.what());
  } catch (const std::exception& e) {
    pending_error_kind = MLXDIST_ERROR_UNKNOWN;
    report(e.what());
  } catch (...) {
    pending_error_kind = MLXDIST_ERROR_UNKNOWN;
    report("unknown C++ exception");
  }
  return 1;
}

} // namespace cmlx
