// mlxdist._bridge: hands mx.array objects to mlx-c's distributed functions as
// `mlx_array` handles and their lazy results back as mx.arrays, with nothing
// evaluated and no data copied (an mlx::core::array is a reference to a graph
// node). The functions themselves are the cffi extension's (mlxdist._cmlx):
// Python passes their addresses, so there is one cmlx and one error state.
//
// Built with -DNB_DOMAIN=mlx against a nanobind whose internals key equals
// mlx.core's: only then does nanobind here see MLX's bound types.

#include <cstdint>
#include <string>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "mlx/array.h"
#include "mlx/device.h"
#include "mlx/distributed/distributed.h"
#include "mlx/distributed/distributed_impl.h"
#include "mlx/stream.h"
#include "mlx/version.h"

#include "mlx/c/array.h"
#include "mlx/c/distributed_group.h"
#include "mlx/c/stream.h"

// NB_INTERNALS_KEY, this module's internals key; last, since it defines a
// `check` macro that MLX's headers would trip over.
#include "nb_internals.h"
#undef check

namespace nb = nanobind;
namespace mx = mlx::core;
namespace mxd = mlx::core::distributed;

#define BRIDGE_STR2(x) #x
#define BRIDGE_STR(x) BRIDGE_STR2(x)

namespace {

const char* const own_key = "__nb_internals_" NB_INTERNALS_KEY "_" BRIDGE_STR(NB_DOMAIN) "__";

// mlx-c's signatures (cmlx/include/mlx/c/distributed.h).
using UnaryFn = int (*)(mlx_array*, const mlx_array, const mlx_distributed_group, const mlx_stream);
using PeerFn = int (*)(mlx_array*, const mlx_array, int, const mlx_distributed_group, const mlx_stream);
using RecvFn = int (*)(
    mlx_array*, const int*, size_t, mlx_dtype, int, const mlx_distributed_group, const mlx_stream);

const mxd::Group& group_at(uintptr_t group) {
  if (group == 0) {
    throw nb::value_error("null group handle");
  }
  return *reinterpret_cast<const mxd::Group*>(group);
}

// As mx.distributed: None is the group's communication stream (the calling
// thread's default stream of the backend's device), a Device its default
// stream on this thread, a Stream itself.
mx::Stream stream_for(nb::handle stream, const mxd::Group& group) {
  if (stream.is_none()) {
    return group.raw_group()->communication_stream({});
  }
  mx::Stream* s = nullptr;
  if (nb::try_cast<mx::Stream*>(stream, s) && s != nullptr) {
    return *s;
  }
  mx::Device device = mx::Device::cpu;
  if (nb::try_cast<mx::Device>(stream, device)) {
    return mx::default_stream(device);
  }
  throw nb::type_error("stream must be an mlx.core.Stream, an mlx.core.Device or None");
}

// The result of an mlx-c call: the new heap array moved into an mx.array, or
// None when the call failed (the caller reads the error cmlx recorded).
nb::object finish(int rc, mlx_array res) {
  auto* out = static_cast<mx::array*>(res.ctx);
  if (rc != 0 || out == nullptr) {
    delete out;
    return nb::none();
  }
  mx::array value(std::move(*out));
  delete out;
  return nb::cast(std::move(value));
}

mlx_array borrowed(const mx::array& x) {
  // Valid for the call: cmlx copies the array into the node it builds.
  return mlx_array{const_cast<mx::array*>(&x)};
}

nb::list internals_keys() {
  nb::list keys;
  PyObject* dict = PyInterpreterState_GetDict(PyInterpreterState_Get());
  if (dict == nullptr) {
    return keys;
  }
  PyObject *key, *value;
  Py_ssize_t pos = 0;
  while (PyDict_Next(dict, &pos, &key, &value)) {
    if (PyUnicode_Check(key)) {
      std::string k = nb::borrow<nb::str>(key).c_str();
      if (k.rfind("__nb_internals_", 0) == 0) {
        keys.append(nb::borrow<nb::str>(key));
      }
    }
  }
  return keys;
}

bool sees_mlx_types() {
  return nb::type<mx::array>().is_valid() && nb::type<mx::Stream>().is_valid() &&
      nb::type<mx::Device>().is_valid();
}

} // namespace

NB_MODULE(_bridge, m) {
  // mlx.core registers its types first; then this module either shares them
  // or refuses to load.
  nb::module_::import_("mlx.core");
  m.attr("internals_key") = own_key;
  m.attr("compiled_mlx_version") =
      BRIDGE_STR(MLX_VERSION_MAJOR) "." BRIDGE_STR(MLX_VERSION_MINOR) "." BRIDGE_STR(MLX_VERSION_PATCH);
  m.def("internals_keys", &internals_keys, "Every nanobind internals key in this interpreter.");
  if (!sees_mlx_types()) {
    std::string msg = std::string("mlxdist._bridge cannot see mlx.core's types: its nanobind internals key is ") +
        own_key + ", while this interpreter holds " + nb::str(internals_keys()).c_str() +
        "; rebuild mlxdist (pip install --force-reinstall --no-deps .) with a nanobind whose key "
        "matches mlx.core's (the one ending in _mlx__)";
    throw nb::import_error(msg.c_str());
  }

  m.def(
      "collective",
      [](uintptr_t fn, const mx::array& x, uintptr_t group, nb::handle stream, bool bool_ok) -> nb::object {
        if (!bool_ok && x.dtype() == mx::bool_) {
          return nb::borrow(Py_NotImplemented);
        }
        const auto& g = group_at(group);
        mx::Stream s = stream_for(stream, g);
        mlx_array res{nullptr};
        int rc = reinterpret_cast<UnaryFn>(fn)(
            &res, borrowed(x), mlx_distributed_group{reinterpret_cast<void*>(group)}, mlx_stream{&s});
        return finish(rc, res);
      },
      nb::arg("fn"), nb::arg("x"), nb::arg("group"), nb::arg("stream").none(), nb::arg("bool_ok") = true,
      "fn(res, x, group, stream) of mlx-c (all_sum, all_gather, ...): the lazy result, None on "
      "failure, or NotImplemented for a bool x when not bool_ok (the caller composes it).");

  m.def(
      "peer",
      [](uintptr_t fn, const mx::array& x, int peer, uintptr_t group, nb::handle stream) {
        const auto& g = group_at(group);
        mx::Stream s = stream_for(stream, g);
        mlx_array res{nullptr};
        int rc = reinterpret_cast<PeerFn>(fn)(
            &res, borrowed(x), peer, mlx_distributed_group{reinterpret_cast<void*>(group)}, mlx_stream{&s});
        return finish(rc, res);
      },
      nb::arg("fn"), nb::arg("x"), nb::arg("peer"), nb::arg("group"), nb::arg("stream").none(),
      "fn(res, x, peer, group, stream) of mlx-c (send, recv_like): the lazy result, or None on failure.");

  m.def(
      "recv",
      [](uintptr_t fn, const std::vector<int>& shape, int dtype, int src, uintptr_t group, nb::handle stream) {
        const auto& g = group_at(group);
        mx::Stream s = stream_for(stream, g);
        mlx_array res{nullptr};
        int rc = reinterpret_cast<RecvFn>(fn)(
            &res, shape.data(), shape.size(), static_cast<mlx_dtype>(dtype), src,
            mlx_distributed_group{reinterpret_cast<void*>(group)}, mlx_stream{&s});
        return finish(rc, res);
      },
      nb::arg("fn"), nb::arg("shape"), nb::arg("dtype"), nb::arg("src"), nb::arg("group"),
      nb::arg("stream").none(), "mlx-c's recv: the lazy result, or None on failure.");

  m.def(
      "to_handle",
      [](const mx::array& x) { return reinterpret_cast<uintptr_t>(new mx::array(x)); },
      nb::arg("x"),
      "The address of a new heap mlx::core::array (an mlx_array ctx) sharing x's graph node; "
      "the caller owns it: from_handle() or mlx_array_free() it once.");

  m.def(
      "from_handle",
      [](uintptr_t handle) {
        if (handle == 0) {
          throw nb::value_error("null mlx_array handle");
        }
        auto* p = reinterpret_cast<mx::array*>(handle);
        mx::array value(std::move(*p));
        delete p;
        return value;
      },
      nb::arg("handle"), "Take a heap mlx::core::array (deleting the heap object) as an mx.array.");

  m.def(
      "is_tracer",
      [](const mx::array& x) { return x.is_tracer(); },
      nb::arg("x"), "Whether x is traced by a transformation (grad, vjp, jvp, vmap, compile) now.");

  m.def(
      "node",
      [](const mx::array& x) { return nb::make_tuple(x.id(), static_cast<int>(x.status())); },
      nb::arg("x"), "(graph node id, status) of x, status 0 meaning not yet scheduled.");
}
