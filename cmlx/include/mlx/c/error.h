/* mlx-c error handling (mlx-c main signatures).
 *
 * Every function returning int returns 0 on success and 1 on failure; the
 * failure message goes to the process-wide handler. The default handler
 * prints the message and exits the process. */

#ifndef MLX_ERROR_H
#define MLX_ERROR_H

#ifdef __cplusplus
extern "C" {
#endif

typedef void (*mlx_error_handler_func)(const char* msg, void* data);

void mlx_set_error_handler(
    mlx_error_handler_func handler,
    void* data,
    void (*dtor)(void*));

/* Format a message and pass it to the error handler. */
void _mlx_error(const char* file, const int line, const char* fmt, ...);

#ifdef __cplusplus
}
#endif

#endif
