// mlx_set_error_handler and the handler-dispatch used by every entry point.

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <mutex>

#include "mlx/c/error.h"
#include "private.h"

namespace {

void default_handler(const char* msg, void*) {
  std::fprintf(stderr, "MLX error: %s\n", msg);
  std::exit(-1);
}

struct Handler {
  mlx_error_handler_func func = default_handler;
  void* data = nullptr;
  void (*dtor)(void*) = nullptr;
};

std::mutex handler_mutex;
Handler handler;

} // namespace

extern "C" void mlx_set_error_handler(
    mlx_error_handler_func func,
    void* data,
    void (*dtor)(void*)) {
  Handler old;
  {
    std::lock_guard<std::mutex> lock(handler_mutex);
    old = handler;
    handler = Handler{func ? func : default_handler, data, dtor};
  }
  if (old.dtor) {
    old.dtor(old.data);
  }
}

extern "C" void _mlx_error(const char* file, const int line, const char* fmt, ...) {
  (void)file;
  (void)line;
  char buffer[2048];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buffer, sizeof(buffer), fmt, args);
  va_end(args);
  cmlx::report_error(buffer);
}

namespace cmlx {

void report_error(const char* msg) {
  Handler current;
  {
    std::lock_guard<std::mutex> lock(handler_mutex);
    current = handler;
  }
  current.func(msg, current.data);
}

} // namespace cmlx
