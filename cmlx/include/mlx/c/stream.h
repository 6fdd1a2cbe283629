/* mlx-c stream handle: the subset cmlx uses (mlx-c main signatures). */

#ifndef MLX_STREAM_H
#define MLX_STREAM_H

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mlx_stream_ {
  void* ctx;
} mlx_stream;

mlx_stream mlx_stream_new(void);
int mlx_stream_free(mlx_stream stream);
int mlx_stream_get_index(int* index, mlx_stream stream);
/* The default CPU stream of the calling thread. */
mlx_stream mlx_default_cpu_stream_new(void);
int mlx_synchronize(mlx_stream stream);

#ifdef __cplusplus
}
#endif

#endif
