// mlx_set_error_handler and the handler-dispatch used by every entry point.

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
