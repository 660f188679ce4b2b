/* The offload_fileio addon: file I/O that Node does not offer (see addon.c). */
#ifndef OFFLOAD_FILEIO_H
#define OFFLOAD_FILEIO_H
#include <node_api.h>

#define CHECK(env, call)                                                     \
  do {                                                                       \
    if ((call) != napi_ok) {                                                 \
      napi_throw_error((env), "EINVAL", "offload_fileio: " #call " failed"); \
      return NULL;                                                           \
    }                                                                        \
  } while (0)

/* The errno name ("ENOSPC", ...) that Node would put in an error's `code`. */
const char *offload_errno_name(int err);
/* An Error for errno `err`: code = its name, message = "<what>: <strerror>". */
napi_value offload_errno_error(napi_env env, int err, const char *what);
/* Throw that error; returns NULL for `return offload_throw_errno(...)`. */
napi_value offload_throw_errno(napi_env env, int err, const char *what);

napi_value offload_seek(napi_env env, napi_callback_info info);
napi_value offload_copy_ranges(napi_env env, napi_callback_info info);
napi_value offload_write_batch(napi_env env, napi_callback_info info);
napi_value offload_background_read(napi_env env, napi_callback_info info);
napi_value offload_background_write(napi_env env, napi_callback_info info);
napi_value offload_background_sync(napi_env env, napi_callback_info info);

#endif
