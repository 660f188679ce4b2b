/*
 * backgroundRead(fd, buffer, position) -> Promise<number>     bytes read (fewer only at EOF)
 * backgroundWrite(fd, buffer, position) -> Promise<void>
 * backgroundSync(fd) -> Promise<void>                          the file written back, then fdatasync
 *
 * A pread or pwrite made whole on the addon's own background thread, which runs at the lowest
 * nice value (19, Linux; elsewhere at the process's priority). Bulk copies that must
 * not slow a guest (a live copy's passes) do their I/O here rather than in Node's thread pool:
 * there the kernel's copying of their megabytes (page cache in and out) held the pool's threads
 * and competed on equal terms with the guest's own small writes, which go through the same pool.
 * Measured with bench/live.ts (background mode, rounds alternating in one run): the guest's p50
 * write latency during the copy 0.43-0.60 ms here against 0.59-0.81 ms through the pool, the
 * copy no slower. A thread at nice 19 gives way to any normal one that wakes; alone on the
 * machine it runs at full speed.
 *
 * One thread, not two: a core is then always left to the guest's path (event loop, thread pool,
 * its own syscalls). bench/live.ts on 2 cores, 3 rounds twice each: the guest's p50 during the
 * copy was 0.19-0.20 ms (background) and 0.30-0.32 ms (write-blocking) with one thread, against
 * 0.35-0.37 and 0.51-0.53 ms with two, the copy as fast (ready in 1.80-1.98 s against 1.85-1.95 s).
 *
 * Not done here, measured and left: starting the copy's writeback as it goes (sync_file_range
 * every 16 MiB), so that the fdatasync before `ready` has less to write. The copy got faster
 * (0.54-0.71 s against 0.72-1.0 s) but the guest's p50 worse (background 0.53-0.62 ms against
 * 0.31-0.46 ms): the writeback's I/O then runs beside the guest for the whole copy. The sliced
 * writeback is made at the flush only (backgroundSync, BG_SYNC_SLICE).
 *
 * Node's thread pool is left alone: it serves everything else, and a thread's priority cannot
 * be raised again without privilege.
 *
 * The thread starts at the first call and lives as long as the process. Completions reach the
 * JavaScript thread that asked (one thread-safe function per environment, referenced only while
 * something is in flight, so an idle helper keeps no event loop alive). Errors reject with an
 * Error whose `code` is the errno name. The buffer is held until the promise settles; the caller
 * must not change it meanwhile (as with fs.write). An environment that ends with jobs in flight (a
 * worker thread terminated) drops those not started and waits for the one running, at most one
 * read or write (a sync stops between slices): its buffers are freed only after.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/syscall.h>
#endif
#include "fileio.h"

#define BG_THREADS 1
#define BG_NICE 19
/*
 * A write is made 64 KiB per pwrite. A buffered write holds its file's inode lock (ext4, XFS) for
 * the whole copy into the page cache, and a thread at nice 19 may be preempted while it holds it:
 * a guest's 4 KiB write into the same file (a live copy's write-blocking write into its target)
 * then waited for it. Measured with bench/live.ts (256 KiB copies, rounds alternating in one run):
 * the guest's p50 during the copy 0.46-0.53 ms against 0.60-0.69 ms (write-blocking) and
 * 0.34-0.40 against 0.37-0.44 ms (background), the copy no slower.
 */
#define BG_WRITE_SLICE (64 * 1024)
/*
 * A background sync (a live copy's flush of its target before `ready`, while the guest writes on)
 * writes the file back this much at a time (sync_file_range, Linux), each slice waited for, then
 * makes the fdatasync, which has only the journal left. One fdatasync of the whole bulk pass
 * (~570 MiB in the page cache) held a guest's write-blocking writes into the same file 30-50 ms,
 * in 4 of 8 rounds of bench/live.ts; sliced, no write during the flush took 10 ms in 8 rounds
 * (the longest write of the copy 5-10 ms against ~50 ms), for a flush ~30 % longer (250-360 ms
 * against 180-275 ms).
 */
#define BG_SYNC_SLICE (16 << 20)

enum { BG_READ, BG_WRITE, BG_SYNC };

typedef struct env_state {
  napi_threadsafe_function tsfn;
  /* Jobs not settled yet (the JavaScript thread's count: the tsfn is referenced while > 0). */
  size_t in_flight;
  /* Under mu: jobs queued or running whose buffer the helper may still touch. */
  size_t unfinished;
  /* Set (under mu) when the environment ends: its jobs are dropped, a sync stops between slices. */
  int closing;
} env_state;

typedef struct bg_job {
  struct bg_job *next;
  int op;
  int fd;
  uint8_t *buf;
  size_t len;
  int64_t pos;
  /* output */
  size_t done;
  int err;
  /* N-API, used on the JavaScript thread only */
  env_state *state;
  napi_ref buffer_ref;
  napi_deferred deferred;
} bg_job;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
/* Signalled when a job is finished with (its `unfinished` count went down). */
static pthread_cond_t finished_cv = PTHREAD_COND_INITIALIZER;
static bg_job *head, *tail;
static int started;

static void lower_priority(void) {
#if defined(__linux__)
  /* Linux: the nice value is the thread's own (the tid names it). Not SCHED_IDLE: a host whose
     vCPUs keep every core busy would starve the copy (weight 3 against 1024; nice 19 has 15). */
  setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), BG_NICE);
#endif
}

static void run_sync(bg_job *j) {
#if defined(__linux__)
  struct stat st;
  if (fstat(j->fd, &st) == 0) {
    for (off_t at = 0; at < st.st_size; at += BG_SYNC_SLICE) {
      /* Its environment is ending (a worker terminated): nobody waits for the result. */
      if (__atomic_load_n(&j->state->closing, __ATOMIC_ACQUIRE)) return;
      if (sync_file_range(j->fd, at, BG_SYNC_SLICE, SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER) != 0 && errno != EINTR) break;
    }
  }
#endif
  while (fdatasync(j->fd) != 0) {
    if (errno != EINTR) {
      j->err = errno;
      return;
    }
  }
}

static void run(bg_job *j) {
  if (j->op == BG_SYNC) return run_sync(j);
  while (j->done < j->len) {
    off_t at = (off_t)(j->pos + (int64_t)j->done);
    size_t want = j->len - j->done;
    if (j->op == BG_WRITE && want > BG_WRITE_SLICE) want = BG_WRITE_SLICE;
    ssize_t n = j->op == BG_WRITE ? pwrite(j->fd, j->buf + j->done, want, at) : pread(j->fd, j->buf + j->done, want, at);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      j->err = errno;
      return;
    }
    if (n == 0) {
      /* A read ends at EOF; a regular file never takes 0 bytes of a write without an error. */
      if (j->op == BG_WRITE) j->err = EIO;
      return;
    }
    j->done += (size_t)n;
  }
}

static void *worker(void *arg) {
  (void)arg;
  lower_priority();
  for (;;) {
    pthread_mutex_lock(&mu);
    while (!head) pthread_cond_wait(&cv, &mu);
    bg_job *j = head;
    head = j->next;
    if (!head) tail = NULL;
    pthread_mutex_unlock(&mu);
    run(j);
    env_state *s = j->state;
    /* An environment that is ending waits in env_ending() until this job is finished with. */
    if (__atomic_load_n(&s->closing, __ATOMIC_ACQUIRE) || napi_call_threadsafe_function(s->tsfn, j, napi_tsfn_blocking) != napi_ok) {
      /* Nobody is left to settle the promise. */
      free(j);
    }
    pthread_mutex_lock(&mu);
    s->unfinished--;
    pthread_cond_broadcast(&finished_cv);
    pthread_mutex_unlock(&mu);
  }
  return NULL;
}

/*
 * The helper thread runs this library's code for as long as the process lives, so the library
 * must never be unloaded: Node unloads an addon when the last environment that loaded it ends (a
 * worker thread that terminated), and the thread then ran in unmapped code. Loaded once more,
 * with RTLD_NODELETE, it stays.
 */
static void pin_library(void) {
  Dl_info info;
  if (dladdr((void *)&pin_library, &info) && info.dli_fname) dlopen(info.dli_fname, RTLD_NOW | RTLD_NODELETE);
}

/* Start the threads once; 0 if none could be started. */
static int start_threads(void) {
  pthread_mutex_lock(&mu);
  if (started == 0) pin_library();
  for (int i = started; i < BG_THREADS; i++) {
    pthread_t t;
    pthread_attr_t a;
    pthread_attr_init(&a);
    pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&t, &a, worker, NULL) == 0) started++;
    pthread_attr_destroy(&a);
  }
  int ok = started > 0;
  pthread_mutex_unlock(&mu);
  return ok;
}

/* On the JavaScript thread: settle the job's promise. env is NULL when the environment ends. */
static void settle(napi_env env, napi_value js_cb, void *context, void *data) {
  (void)js_cb;
  (void)context;
  bg_job *j = data;
  if (env) {
    if (j->err) {
      napi_reject_deferred(env, j->deferred, offload_errno_error(env, j->err, j->op == BG_READ ? "read" : j->op == BG_WRITE ? "write" : "fdatasync"));
    } else {
      napi_value v;
      if (j->op == BG_READ) napi_create_double(env, (double)j->done, &v);
      else napi_get_undefined(env, &v);
      napi_resolve_deferred(env, j->deferred, v);
    }
    if (j->buffer_ref) napi_delete_reference(env, j->buffer_ref);
    if (--j->state->in_flight == 0) napi_unref_threadsafe_function(env, j->state->tsfn);
  }
  free(j);
}

/*
 * The environment is ending (a worker thread terminated, or the process exiting): its jobs that
 * have not started are dropped, and the one running is waited for, so that the helper never
 * reads or writes a buffer, or calls a thread-safe function, that the ending frees. Runs before
 * the tsfn's own clean-up and the instance data's finalizer (hooks run last-added first).
 */
static void env_ending(void *arg) {
  env_state *s = arg;
  pthread_mutex_lock(&mu);
  __atomic_store_n(&s->closing, 1, __ATOMIC_RELEASE);
  bg_job *kept = NULL, *last = NULL;
  for (bg_job *j = head, *next; j; j = next) {
    next = j->next;
    if (j->state == s) {
      s->unfinished--;
      free(j);
      continue;
    }
    j->next = NULL;
    if (last) last->next = j;
    else kept = j;
    last = j;
  }
  head = kept;
  tail = last;
  while (s->unfinished > 0) pthread_cond_wait(&finished_cv, &mu);
  pthread_mutex_unlock(&mu);
}

static void finalize_state(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  free(data);
}

/* This environment's state, made at its first call. */
static env_state *state_of(napi_env env) {
  env_state *s = NULL;
  if (napi_get_instance_data(env, (void **)&s) == napi_ok && s) return s;
  s = calloc(1, sizeof *s);
  if (!s) return NULL;
  napi_value name;
  if (napi_create_string_utf8(env, "offload.backgroundIO", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_threadsafe_function(env, NULL, NULL, name, 0, 1, NULL, NULL, NULL, settle, &s->tsfn) != napi_ok) {
    free(s);
    return NULL;
  }
  napi_unref_threadsafe_function(env, s->tsfn);
  if (napi_set_instance_data(env, s, finalize_state, NULL) != napi_ok) {
    napi_release_threadsafe_function(s->tsfn, napi_tsfn_abort);
    free(s);
    return NULL;
  }
  /* Added after the tsfn (whose clean-up then runs after this one); s lives until the finalizer. */
  if (napi_add_env_cleanup_hook(env, env_ending, s) != napi_ok) return NULL;
  return s;
}

static int whole(double v) { return v >= 0 && v <= 9007199254740991.0 && v == (double)(int64_t)v; }

static const char *const names[] = {"backgroundRead", "backgroundWrite", "backgroundSync"};

static napi_value submit(napi_env env, napi_callback_info info, int op) {
  size_t argc = 3;
  napi_value argv[3];
  CHECK(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t fd;
  double pos;
  void *p = NULL;
  size_t n = 0;
  bool is_ta = false;
  napi_typedarray_type type;
  if (op == BG_SYNC) {
    if (argc < 1 || napi_get_value_int32(env, argv[0], &fd) != napi_ok || fd < 0) {
      napi_throw_type_error(env, "EINVAL", "backgroundSync(fd): a descriptor expected");
      return NULL;
    }
    pos = 0;
  } else if (argc < 3 || napi_get_value_int32(env, argv[0], &fd) != napi_ok || fd < 0 ||
      napi_is_typedarray(env, argv[1], &is_ta) != napi_ok || !is_ta ||
      napi_get_typedarray_info(env, argv[1], &type, &n, &p, NULL, NULL) != napi_ok || type != napi_uint8_array ||
      napi_get_value_double(env, argv[2], &pos) != napi_ok || !whole(pos)) {
    char msg[160];
    snprintf(msg, sizeof msg, "%s(fd, buffer, position): a descriptor, a Uint8Array and a whole offset expected", names[op]);
    napi_throw_type_error(env, "EINVAL", msg);
    return NULL;
  }
  env_state *s = state_of(env);
  if (!s || !start_threads()) return offload_throw_errno(env, EAGAIN, names[op]);
  bg_job *j = calloc(1, sizeof *j);
  if (!j) return offload_throw_errno(env, ENOMEM, names[op]);
  j->op = op;
  j->fd = fd;
  j->buf = p;
  j->len = n;
  j->pos = (int64_t)pos;
  j->state = s;
  napi_value promise;
  /* The buffer is referenced until settle(), so that it is not collected meanwhile. */
  if (op != BG_SYNC && napi_create_reference(env, argv[1], 1, &j->buffer_ref) != napi_ok) {
    free(j);
    napi_throw_error(env, "EINVAL", "background I/O: could not hold the buffer");
    return NULL;
  }
  if (napi_create_promise(env, &j->deferred, &promise) != napi_ok) {
    if (j->buffer_ref) napi_delete_reference(env, j->buffer_ref);
    free(j);
    napi_throw_error(env, "EINVAL", "background I/O: could not make a promise");
    return NULL;
  }
  if (s->in_flight++ == 0) napi_ref_threadsafe_function(env, s->tsfn);
  pthread_mutex_lock(&mu);
  s->unfinished++;
  if (tail) tail->next = j;
  else head = j;
  tail = j;
  pthread_cond_signal(&cv);
  pthread_mutex_unlock(&mu);
  return promise;
}

napi_value offload_background_read(napi_env env, napi_callback_info info) { return submit(env, info, BG_READ); }
napi_value offload_background_write(napi_env env, napi_callback_info info) { return submit(env, info, BG_WRITE); }
napi_value offload_background_sync(napi_env env, napi_callback_info info) { return submit(env, info, BG_SYNC); }
