// mlx_string: a heap std::string behind an opaque handle.

#include <string>

#include "private.h"

extern "C" mlx_string mlx_string_new(void) {
  return mlx_string{new std::string()};
}

extern "C" mlx_string mlx_string_new_data(const char* str) {
  return mlx_string{new std::string(str ? str : "")};
}

extern "C" const char* mlx_string_data(mlx_string str) {
  return str.ctx ? static_cast<std::string*>(str.ctx)->c_str() : nullptr;
}

extern "C" int mlx_string_free(mlx_string str) {
  delete static_cast<std::string*>(str.ctx);
  return 0;
}
