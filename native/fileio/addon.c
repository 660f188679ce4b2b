/*
 * offload_fileio: the optional native helper of the qcow2 engine (plain N-API, no dependencies).
 *
 *   seek(fd, offset, whence)          lseek SEEK_DATA / SEEK_HOLE (seek.c)
 *   copyRanges(src, dst, ops, opts)   a pipelined file-to-file copy off the main thread (copy.c)
 *
 * The engine works without it (engine/native-addon.ts): raw images are then scanned for holes,
 * and copies go through Node's thread pool one read and one write at a time.
 */
#include "fileio.h"

NAPI_MODULE_INIT() {
  napi_value fn;
  CHECK(env, napi_create_function(env, "seek", NAPI_AUTO_LENGTH, offload_seek, NULL, &fn));
  CHECK(env, napi_set_named_property(env, exports, "seek", fn));
  CHECK(env, napi_create_function(env, "copyRanges", NAPI_AUTO_LENGTH, offload_copy_ranges, NULL, &fn));
  CHECK(env, napi_set_named_property(env, exports, "copyRanges", fn));
  return exports;
}
