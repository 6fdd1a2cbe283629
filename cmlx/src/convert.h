// Conversions between mlx-c's C types and MLX's C++ ones, header-only so the
// extension can use them when built against a real mlx-c.

#pragma once

#include <stdexcept>
#include <string>
#include <utility>

#include "mlx/array.h"
#include "mlx/dtype.h"

#include "mlx/c/array.h"

namespace cmlx {

struct DtypePair {
  mlx_dtype c;
  mlx::core::Dtype cpp;
};

inline const DtypePair dtype_table[] = {
    {MLX_BOOL, mlx::core::bool_},
    {MLX_UINT8, mlx::core::uint8},
    {MLX_UINT16, mlx::core::uint16},
    {MLX_UINT32, mlx::core::uint32},
    {MLX_UINT64, mlx::core::uint64},
    {MLX_INT8, mlx::core::int8},
    {MLX_INT16, mlx::core::int16},
    {MLX_INT32, mlx::core::int32},
    {MLX_INT64, mlx::core::int64},
    {MLX_FLOAT16, mlx::core::float16},
    {MLX_FLOAT32, mlx::core::float32},
    {MLX_FLOAT64, mlx::core::float64},
    {MLX_BFLOAT16, mlx::core::bfloat16},
    {MLX_COMPLEX64, mlx::core::complex64},
};

inline mlx::core::Dtype to_cpp_dtype(mlx_dtype dtype) {
  for (const auto& p : dtype_table) {
    if (p.c == dtype) {
      return p.cpp;
    }
  }
  throw std::invalid_argument(
      "invalid mlx_dtype " + std::to_string(static_cast<int>(dtype)));
}

inline mlx_dtype to_c_dtype(mlx::core::Dtype dtype) {
  for (const auto& p : dtype_table) {
    if (p.cpp == dtype) {
      return p.c;
    }
  }
  throw std::invalid_argument("dtype has no mlx_dtype equivalent");
}

// A C shape as MLX's; `count` receives the number of elements.
inline mlx::core::Shape to_shape(const int* shape, size_t dim, size_t* count = nullptr) {
  if (dim > 0 && shape == nullptr) {
    throw std::invalid_argument("null shape with a non-zero dimension count");
  }
  mlx::core::Shape result(shape, shape + dim);
  size_t elements = 1;
  for (int d : result) {
    if (d < 0) {
      throw std::invalid_argument("negative dimension in shape");
    }
    elements *= static_cast<size_t>(d);
  }
  if (count) {
    *count = elements;
  }
  return result;
}

// mlx-c semantics for a result handle: an empty one gets a new object, a
// live one is assigned.
template <typename Handle, typename T>
void set_handle(Handle* res, T value) {
  if (res == nullptr) {
    throw std::invalid_argument("null result pointer");
  }
  if (res->ctx) {
    *static_cast<T*>(res->ctx) = std::move(value);
  } else {
    res->ctx = new T(std::move(value));
  }
}

inline void set_array(mlx_array* res, mlx::core::array value) {
  set_handle(res, std::move(value));
}

} // namespace cmlx
