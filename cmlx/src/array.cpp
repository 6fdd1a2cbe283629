// mlx_array: a heap mlx::core::array behind an opaque handle, plus dtype and
// shape conversions shared by the other sources.

#include <cstring>
#include <limits>
#include <stdexcept>

#include "mlx/allocator.h"
#include "mlx/transforms.h"
#include "private.h"

namespace cmlx {

// An available array holding a copy of `data`.
mx::array copy_into_new(const void* data, mx::Shape shape, mx::Dtype dtype) {
  size_t count = 1;
  for (int d : shape) {
    count *= static_cast<size_t>(d);
  }
  size_t nbytes = count * mx::size_of(dtype);
  mx::array result(mx::allocator::malloc(nbytes), std::move(shape), dtype);
  if (nbytes > 0) {
    if (data == nullptr) {
      throw std::invalid_argument("null data for a non-empty array");
    }
    std::memcpy(result.data<char>(), data, nbytes);
  }
  return result;
}

} // namespace cmlx

using cmlx::get_array;
using cmlx::guarded;

extern "C" size_t mlx_dtype_size(mlx_dtype dtype) {
  size_t size = 0;
  guarded([&] { size = mlx::core::size_of(cmlx::to_cpp_dtype(dtype)); });
  return size;
}

extern "C" mlx_array mlx_array_new(void) {
  return mlx_array{nullptr};
}

extern "C" int mlx_array_free(mlx_array arr) {
  delete static_cast<mlx::core::array*>(arr.ctx);
  return 0;
}

extern "C" int mlx_array_set(mlx_array* arr, const mlx_array src) {
  return guarded([&] { cmlx::set_array(arr, get_array(src)); });
}

extern "C" mlx_array mlx_array_new_data(
    const void* data,
    const int* shape,
    int dim,
    mlx_dtype dtype) {
  mlx_array res{nullptr};
  guarded([&] {
    if (dim < 0) {
      throw std::invalid_argument("negative dimension count");
    }
    res.ctx = new mlx::core::array(cmlx::copy_into_new(
        data, cmlx::to_shape(shape, dim), cmlx::to_cpp_dtype(dtype)));
  });
  return res;
}

extern "C" mlx_array mlx_array_new_data_managed_payload(
    void* data,
    const int* shape,
    int dim,
    mlx_dtype dtype,
    void* payload,
    void (*dtor)(void*)) {
  mlx_array res{nullptr};
  guarded([&] {
    if (dim < 0) {
      throw std::invalid_argument("negative dimension count");
    }
    // MLX adopts the memory where its allocator can (Metal); on the CPU
    // build it copies and calls the deleter straight away.
    res.ctx = new mlx::core::array(
        data,
        cmlx::to_shape(shape, dim),
        cmlx::to_cpp_dtype(dtype),
        [payload, dtor](void*) {
          if (dtor) {
            dtor(payload);
          }
        });
  });
  return res;
}

extern "C" mlx_array mlx_array_new_data_managed(
    void* data,
    const int* shape,
    int dim,
    mlx_dtype dtype,
    void (*dtor)(void*)) {
  return mlx_array_new_data_managed_payload(data, shape, dim, dtype, data, dtor);
}

extern "C" size_t mlx_array_itemsize(const mlx_array arr) {
  size_t v = 0;
  guarded([&] { v = get_array(arr).itemsize(); });
  return v;
}

extern "C" size_t mlx_array_size(const mlx_array arr) {
  size_t v = 0;
  guarded([&] { v = get_array(arr).size(); });
  return v;
}

extern "C" size_t mlx_array_nbytes(const mlx_array arr) {
  size_t v = 0;
  guarded([&] { v = get_array(arr).nbytes(); });
  return v;
}

extern "C" size_t mlx_array_ndim(const mlx_array arr) {
  size_t v = 0;
  guarded([&] { v = get_array(arr).ndim(); });
  return v;
}

extern "C" const int* mlx_array_shape(const mlx_array arr) {
  const int* v = nullptr;
  guarded([&] { v = get_array(arr).shape().data(); });
  return v;
}

extern "C" int mlx_array_dim(const mlx_array arr, int dim) {
  int v = 0;
  guarded([&] { v = get_array(arr).shape(dim); });
  return v;
}

extern "C" mlx_dtype mlx_array_dtype(const mlx_array arr) {
  mlx_dtype v = MLX_BOOL;
  guarded([&] { v = cmlx::to_c_dtype(get_array(arr).dtype()); });
  return v;
}

extern "C" int mlx_array_eval(mlx_array arr) {
  return guarded([&] { get_array(arr).eval(); });
}

namespace {

template <typename T>
const T* data_of(const mlx_array arr) {
  const T* v = nullptr;
  guarded([&] {
    auto& a = get_array(arr);
    if (a.status() != mlx::core::array::Status::unscheduled) {
      a.wait();
      v = a.data<T>();
    }
  });
  return v;
}

} // namespace

#define CMLX_DATA_ACCESSOR(NAME, TYPE)                          \
  extern "C" const TYPE* mlx_array_data_##NAME(const mlx_array arr) { \
    return data_of<TYPE>(arr);                                  \
  }

CMLX_DATA_ACCESSOR(bool, bool)
CMLX_DATA_ACCESSOR(uint8, uint8_t)
CMLX_DATA_ACCESSOR(uint16, uint16_t)
CMLX_DATA_ACCESSOR(uint32, uint32_t)
CMLX_DATA_ACCESSOR(uint64, uint64_t)
CMLX_DATA_ACCESSOR(int8, int8_t)
CMLX_DATA_ACCESSOR(int16, int16_t)
CMLX_DATA_ACCESSOR(int32, int32_t)
CMLX_DATA_ACCESSOR(int64, int64_t)
CMLX_DATA_ACCESSOR(float32, float)
CMLX_DATA_ACCESSOR(float64, double)
