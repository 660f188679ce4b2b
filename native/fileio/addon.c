/*
 * offload_fileio: the optional native helper of the qcow2 engine (plain N-API, no dependencies).
 *
 *   seek(fd, offset, whence)          lseek SEEK_DATA / SEEK_HOLE (seek.c)
 *   copyRanges(src, dst, ops, opts)   a pipelined file-to-file copy off the main thread (copy.c)
 *   writeBatch(fd, positions, buffers, sync)  several pwrites, then fdatasync, in one work item
 *                                     of the thread pool (writes.c)
 *   backgroundRead / backgroundWrite(fd, buffer, position)  a pread or pwrite on the addon's own
 *                                     lowest-priority thread (bgio.c)
 *
 * The engine works without it (engine/native-addon.ts): raw images are then scanned for holes,
 * copies go through Node's thread pool one read and one write at a time, and so do the writes
 * of a batch, each a round trip.
 */
#include "fileio.h"

NAPI_MODULE_INIT() {
  napi_value fn;
  CHECK(env, napi_create_function(env, "seek", NAPI_AUTO_LENGTH, offload_seek, NULL, &fn));
  CHECK(env, napi_set_named_property(env, exports, "seek", fn));
  CHECK(env, napi_create_function(env, "copyRanges", NAPI_AUTO_LENGTH, offload_copy_ranges, NULL, &fn));
  CHECK(env, napi_set_named_property(env, exports, "copyRanges", fn));
  napi_value yes;
  CHECK(env, napi_get_boolean(env, true, &yes));
  CHECK(env, napi_set_named_property(env, exports, "copyRangesUntil", yes)); /* honours opts.until */
  CHECK(env, napi_create_function(env, "writeBatch", NAPI_AUTO_LENGTH, offload_write_batch, NULL, &fn));
  CHECK(env, napi_set_named_property(env, exports, "writeBatch", fn));
  CHECK(env, napi_create_function(env, "backgroundRead", NAPI_AUTO_LENGTH, offload_background_read, NULL, &fn));
  CHECK(env, napi_set_named_property(env, exports, "backgroundRead", fn));
  CHECK(env, napi_create_function(env, "backgroundWrite", NAPI_AUTO_LENGTH, offload_background_write, NULL, &fn));
  CHECK(env, napi_set_named_property(env, exports, "backgroundWrite", fn));
  CHECK(env, napi_create_function(env, "backgroundSync", NAPI_AUTO_LENGTH, offload_background_sync, NULL, &fn));
  CHECK(env, napi_set_named_property(env, exports, "backgroundSync", fn));
  return exports;
}
