/* cmlx extensions beyond mlx-c, all prefixed mlxdist_.
 *
 * They reuse mlx-c's handle types, whose ctx points at the MLX C++ object,
 * so they build against cmlx or against a real mlx-c install alike.
 * Functions returning int follow mlx-c's contract: 0 on success, 1 on
 * failure with the message passed to the error handler. */

#ifndef MLXDIST_CMLX_EXT_H
#define MLXDIST_CMLX_EXT_H

#include <stdbool.h>
#include <stddef.h>

#include "mlx/c/array.h"
#include "mlx/c/distributed_group.h"
#include "mlx/c/stream.h"

#ifdef __cplusplus
extern "C" {
#endif

/* What kind of failure an error was, decided where it was raised. Errors
 * reported by a real mlx-c's own functions are UNKNOWN. Only COMMUNICATION
 * means the transport failed; every other kind leaves the group usable. */
typedef enum mlxdist_error_kind_ {
  MLXDIST_ERROR_NONE,
  MLXDIST_ERROR_UNKNOWN,
  MLXDIST_ERROR_ARGUMENT,
  MLXDIST_ERROR_SHAPE,
  MLXDIST_ERROR_DTYPE,
  MLXDIST_ERROR_RANK,
  MLXDIST_ERROR_UNSUPPORTED,
  MLXDIST_ERROR_COMMUNICATION,
  MLXDIST_ERROR_INIT,
  MLXDIST_ERROR_MEMORY,
} mlxdist_error_kind;

/* Error handler that keeps the last message and its kind per thread; install
 * it with mlx_set_error_handler(mlxdist_error_handler, NULL, NULL). */
void mlxdist_error_handler(const char* msg, void* data);
/* The calling thread's last error message ("" if none). */
const char* mlxdist_last_error(void);
/* The kind of the calling thread's last error (NONE if none). */
mlxdist_error_kind mlxdist_last_error_kind(void);
void mlxdist_clear_error(void);

/* The MLX version the extension was compiled against ("major.minor.patch"). */
const char* mlxdist_compiled_mlx_version(void);
/* The file libmlx was loaded from (empty if unknown). */
const char* mlxdist_libmlx_path(void);

/* Free the object a handle points to and clear the handle (NULL-safe); the
 * pointer form suits a finalizer. */
void mlxdist_array_release(mlx_array* arr);
void mlxdist_group_release(mlx_distributed_group* group);
void mlxdist_stream_release(mlx_stream* stream);

/* An evaluated, row-contiguous array whose uninitialised memory MLX owns. */
int mlxdist_array_alloc(
    mlx_array* res,
    const int* shape,
    int dim,
    mlx_dtype dtype);
/* An array that views `data` (the product of `shape` elements of `dtype`,
 * C-contiguous and aligned) without a copy, for direct collectives that read
 * or write it during the call. The caller keeps `data` alive and in place
 * until the array is freed, and must not hand the array to MLX's graph ops.
 * Fails where this MLX build can neither adopt nor view foreign memory. */
int mlxdist_array_wrap(
    mlx_array* res,
    void* data,
    const int* shape,
    int dim,
    mlx_dtype dtype);
/* Writable pointer to an evaluated array's first element (NULL if the array
 * holds no data yet). */
void* mlxdist_array_data(const mlx_array arr);
/* Whether the array is evaluated and row contiguous with its own memory. */
bool mlxdist_array_is_dense(const mlx_array arr);

/* Collectives straight on the backend, with no graph: when the call returns
 * the result is in `out`. `x` and `out` must be dense (see above), of one
 * dtype; `out` may be `x` itself for the reductions (in place), and must not
 * otherwise overlap it. `out` holds as many bytes as the result: x's for the
 * reductions, size times x's for all_gather, x's over size for sum_scatter
 * (the caller gives it the result's shape). */
typedef enum mlxdist_op_ {
  MLXDIST_ALL_SUM,
  MLXDIST_ALL_MAX,
  MLXDIST_ALL_MIN,
  MLXDIST_ALL_GATHER,
  MLXDIST_SUM_SCATTER,
} mlxdist_op;

int mlxdist_collective(
    mlx_array out,
    const mlx_array x,
    mlxdist_op op,
    const mlx_distributed_group group,
    const mlx_stream s);
int mlxdist_send(
    const mlx_array x,
    int dst,
    const mlx_distributed_group group,
    const mlx_stream s);
int mlxdist_recv(
    mlx_array out,
    int src,
    const mlx_distributed_group group,
    const mlx_stream s);

#ifdef __cplusplus
}
#endif

#endif
