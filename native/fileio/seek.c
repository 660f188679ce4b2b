/*
 * seek(): lseek(SEEK_DATA / SEEK_HOLE) for Node, which has no binding for them.
 *
 *   seek(fd, offset, whence) -> the resulting offset, or -1 when lseek fails with ENXIO
 *   (SEEK_DATA: no data at or after offset; either: offset is at or past the end of the file).
 *   whence: 0 = SEEK_DATA, 1 = SEEK_HOLE. Any other failure throws an Error whose `code` is the
 *   errno name (EINVAL when the file system cannot seek holes, EBADF, ...) and whose message has
 *   strerror's text. Synchronous: lseek is a cheap system call that does no I/O.
 *
 * Plain N-API (node_api.h), no dependencies. Moves the descriptor's file position, which Node's
 * positional reads and writes (pread/pwrite) do not use.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>
#include "fileio.h"

napi_value offload_seek(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  CHECK(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 3) {
    napi_throw_type_error(env, "EINVAL", "seek(fd, offset, whence): three arguments expected");
    return NULL;
  }
  int32_t fd, which;
  int64_t offset;
  if (napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_value_int64(env, argv[1], &offset) != napi_ok ||
      napi_get_value_int32(env, argv[2], &which) != napi_ok) {
    napi_throw_type_error(env, "EINVAL", "seek(fd, offset, whence): numbers expected");
    return NULL;
  }
#if defined(SEEK_DATA) && defined(SEEK_HOLE)
  if (which != 0 && which != 1) {
    napi_throw_range_error(env, "EINVAL", "seek: whence must be 0 (SEEK_DATA) or 1 (SEEK_HOLE)");
    return NULL;
  }
  if (offset < 0) return offload_throw_errno(env, EINVAL, "lseek");
  off_t r = lseek(fd, (off_t)offset, which == 0 ? SEEK_DATA : SEEK_HOLE);
  if (r < 0) {
    int err = errno;
    if (err == ENXIO) r = -1;
    else return offload_throw_errno(env, err, which == 0 ? "lseek(SEEK_DATA)" : "lseek(SEEK_HOLE)");
  }
  napi_value out;
  CHECK(env, napi_create_int64(env, (int64_t)r, &out));
  return out;
#else
  (void)fd; (void)which; (void)offset;
  return offload_throw_errno(env, EINVAL, "lseek(SEEK_DATA/SEEK_HOLE) is not available on this system");
#endif
}
