/*
 * writeBatch(fd, positions, buffers, sync) -> Promise<void>
 *
 * pwrite buffers[i] at positions[i], i = 0, 1, ... in order, then (sync) fdatasync: all in one
 * work item of Node's thread pool. The qcow2 engine's allocating write is a refcount update, the
 * cluster's data and its L2 entry, and, for a write with FUA, an fdatasync: through fs.write and
 * fs.fdatasync that is four round trips between the event loop and the pool, each waking a thread
 * on a vCPU that may have halted; here it is one. The order of the system calls is the caller's,
 * unchanged (the crash-safe order of the metadata), and so is every barrier: a caller that needs
 * one between two writes ends a batch there with sync.
 *
 *   positions: Float64Array of file offsets (whole numbers).
 *   buffers:   an Array of Uint8Arrays, one per position; held until the promise settles, and
 *              the caller must not change them meanwhile (as with fs.write).
 *   sync:      fdatasync once every write is made (fsync where there is no fdatasync, F_FULLFSYNC
 *              on macOS, as libuv does).
 *
 * The first failure stops: the writes after it are not made, nor the fdatasync. The promise is
 * then rejected with an Error whose `code` is the errno name (ENOSPC, EIO, ...), whose message
 * says which call failed, and whose `done` is the number of writes made whole before it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>
#include "fileio.h"

typedef struct {
  int fd;
  int sync;
  size_t n;
  int64_t *pos;
  uint8_t **data;
  size_t *len;
  /* output */
  size_t done;
  int err;
  const char *what;
  /* N-API */
  napi_ref buffers_ref;
  napi_async_work work;
  napi_deferred deferred;
} batch_t;

static int sync_data(int fd) {
#if defined(__APPLE__)
  if (fcntl(fd, F_FULLFSYNC) == 0) return 0;
  return fsync(fd);
#elif defined(__linux__) || defined(_POSIX_SYNCHRONIZED_IO)
  return fdatasync(fd);
#else
  return fsync(fd);
#endif
}

static void execute(napi_env env, void *data) {
  (void)env;
  batch_t *b = data;
  for (size_t i = 0; i < b->n; i++) {
    size_t off = 0;
    while (off < b->len[i]) {
      ssize_t w = pwrite(b->fd, b->data[i] + off, b->len[i] - off, (off_t)(b->pos[i] + (int64_t)off));
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) {
        /* A regular file never takes 0 bytes of a write without an error; say EIO if it does. */
        b->err = w < 0 ? errno : EIO;
        b->what = "write";
        return;
      }
      off += (size_t)w;
    }
    b->done = i + 1;
  }
  if (b->sync) {
    int r;
    do r = sync_data(b->fd); while (r != 0 && errno == EINTR);
    if (r != 0) {
      b->err = errno;
      b->what = "fdatasync";
    }
  }
}

static void release(batch_t *b) {
  free(b->pos);
  free(b->data);
  free(b->len);
  free(b);
}

static void complete(napi_env env, napi_status status, void *data) {
  batch_t *b = data;
  if (status != napi_ok) {
    napi_reject_deferred(env, b->deferred, offload_errno_error(env, ECANCELED, "writeBatch"));
  } else if (b->err) {
    napi_value error = offload_errno_error(env, b->err, b->what), done;
    if (error && napi_create_double(env, (double)b->done, &done) == napi_ok) napi_set_named_property(env, error, "done", done);
    napi_reject_deferred(env, b->deferred, error);
  } else {
    napi_value undef;
    napi_get_undefined(env, &undef);
    napi_resolve_deferred(env, b->deferred, undef);
  }
  napi_delete_reference(env, b->buffers_ref);
  napi_delete_async_work(env, b->work);
  release(b);
}

static napi_value invalid(napi_env env, const char *msg) {
  napi_throw_type_error(env, "EINVAL", msg);
  return NULL;
}

static int whole(double v) { return v >= 0 && v <= 9007199254740991.0 && v == (double)(int64_t)v; }

napi_value offload_write_batch(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  CHECK(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 4) return invalid(env, "writeBatch(fd, positions, buffers, sync): four arguments expected");
  int32_t fd;
  if (napi_get_value_int32(env, argv[0], &fd) != napi_ok || fd < 0) return invalid(env, "writeBatch: a file descriptor expected");
  bool is_ta = false, is_array = false, sync = false;
  napi_typedarray_type type;
  size_t n;
  uint32_t count;
  void *raw;
  if (napi_is_typedarray(env, argv[1], &is_ta) != napi_ok || !is_ta ||
      napi_get_typedarray_info(env, argv[1], &type, &n, &raw, NULL, NULL) != napi_ok || type != napi_float64_array)
    return invalid(env, "writeBatch: positions must be a Float64Array");
  if (napi_is_array(env, argv[2], &is_array) != napi_ok || !is_array ||
      napi_get_array_length(env, argv[2], &count) != napi_ok || count != n)
    return invalid(env, "writeBatch: buffers must be an Array of as many Uint8Arrays as there are positions");
  if (napi_get_value_bool(env, argv[3], &sync) != napi_ok) return invalid(env, "writeBatch: sync must be a boolean");
  const double *positions = raw;

  batch_t *b = calloc(1, sizeof *b);
  if (!b) return offload_throw_errno(env, ENOMEM, "writeBatch");
  b->fd = fd;
  b->sync = sync;
  b->n = n;
  b->pos = malloc((n ? n : 1) * sizeof *b->pos);
  b->data = malloc((n ? n : 1) * sizeof *b->data);
  b->len = malloc((n ? n : 1) * sizeof *b->len);
  if (!b->pos || !b->data || !b->len) {
    release(b);
    return offload_throw_errno(env, ENOMEM, "writeBatch");
  }
  for (size_t i = 0; i < n; i++) {
    napi_value v;
    void *p;
    size_t len;
    if (!whole(positions[i]) || napi_get_element(env, argv[2], (uint32_t)i, &v) != napi_ok ||
        napi_is_typedarray(env, v, &is_ta) != napi_ok || !is_ta ||
        napi_get_typedarray_info(env, v, &type, &len, &p, NULL, NULL) != napi_ok || type != napi_uint8_array) {
      release(b);
      return invalid(env, "writeBatch: every position must be a whole offset, every buffer a Uint8Array");
    }
    b->pos[i] = (int64_t)positions[i];
    b->data[i] = p;
    b->len[i] = len;
  }

  napi_value promise, name;
  /* The array holds the buffers: referenced until complete(), so none is collected meanwhile. */
  if (napi_create_reference(env, argv[2], 1, &b->buffers_ref) != napi_ok) {
    release(b);
    napi_throw_error(env, "EINVAL", "writeBatch: could not hold the buffers");
    return NULL;
  }
  if (napi_create_promise(env, &b->deferred, &promise) != napi_ok ||
      napi_create_string_utf8(env, "offload.writeBatch", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_async_work(env, NULL, name, execute, complete, b, &b->work) != napi_ok) {
    napi_delete_reference(env, b->buffers_ref);
    release(b);
    napi_throw_error(env, "EINVAL", "writeBatch: could not start the writes");
    return NULL;
  }
  if (napi_queue_async_work(env, b->work) != napi_ok) {
    napi_delete_async_work(env, b->work);
    napi_delete_reference(env, b->buffers_ref);
    release(b);
    napi_throw_error(env, "EINVAL", "writeBatch: could not start the writes");
    return NULL;
  }
  return promise;
}
