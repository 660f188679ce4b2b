/*
 * copyRanges(srcFd, dstFd, ops, opts) -> Promise<Float64Array>
 *
 * Copies byte ranges from one file to another off the main thread, with a reader thread running
 * ahead of the writer through a ring of buffers, so that reading (a copy out of the page cache)
 * and writing (a copy into it, the dearer half) run on two cores at once. From JavaScript, the
 * same copy through Node's thread pool pays a round trip through the event loop for every read
 * and every write: on a 2-core VM that was ~350 ms for 512 MiB, against ~220 ms here.
 *
 *   ops: Float64Array of [srcPos, dstPos, length] triples (whole numbers, length > 0).
 *   opts.block: zero detection, in bytes (a power of two, 512 .. 2 MiB), or 0 for none.
 *   opts.alloc: absent, or a host offset for sequential allocation (see below).
 *
 * Without `alloc`, bytes go to dstPos; blocks (of `block` bytes, counted from each op's start)
 * that are all zero are not written, so the target must already read as zero there (a new
 * sparse file, qemu-img's `-S`). The result is empty.
 *
 * With `alloc` (qcow2 targets), dstPos is a guest offset and only echoed back: every block that
 * is not all zero is written to the next host offset, starting at `alloc` and going up by
 * `block`, and the result holds one [dstPos of the block, host offset] pair per block written.
 * The last block of an op may be short: it is written zero-padded to a whole block.
 *
 * With `alloc` and opts.entries (a Uint8Array of 8 bytes per block of the ops, in op order), each
 * block's entry is written there as it goes: big-endian, its host offset with opts.entryHigh in
 * the high 32 bits, or 0 for a block left out (qcow2 L2 entries, copied into the tables with one
 * `set` per range instead of a JavaScript loop per cluster).
 *
 * opts.until (a Float64Array of at least one element): the copy writes nothing once this host's
 * clock (CLOCK_REALTIME, ms since the epoch) reaches until[0], read again before every piece's
 * write; the promise is then rejected with code ETIMEDOUT and a message starting "fence". Its
 * owner moves until[0] on as it may (a job's lease, renewed): a process stopped while the copy
 * runs (SIGSTOP, a frozen VM) and woken past its lease writes no more of it, where the runner that
 * took the job over may be allocating the same host offsets. The module's `copyRangesUntil` is
 * true where this is honoured.
 *
 * Reads past the end of the source read as zeros. The first error stops both threads; the
 * promise is rejected with an Error whose `code` is the errno name (ENOSPC, EIO, ...). Data
 * written before the error stays written.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "fileio.h"

#define RING 4
#define PIECE (1 << 20) /* bytes per read; qemu-img's convert reads 1 MiB at a time too */
#define SKEW 2048       /* see format/bytes.ts: page-aligned buffers copy slowly on some CPUs */
#define MAX_BLOCK (2 << 20)

typedef struct {
  int64_t src, dst, len; /* one piece: at most `piece` bytes, within one op */
} piece_t;

typedef struct {
  /* input */
  int src_fd, dst_fd;
  int64_t block;     /* 0: no zero detection */
  int64_t alloc;     /* -1: write at dst; else the next host offset to allocate */
  piece_t *pieces;
  size_t npieces;
  int64_t piece;     /* buffer size */
  /* pipeline */
  uint8_t *bufs[RING];
  void *mem;
  size_t got[RING];  /* bytes in each buffer (the piece's length) */
  size_t produced, consumed; /* atomics: see await_turn */
  int failed;                 /* atomic; set once, under mu */
  int waiting;                /* atomic: threads blocked (or about to block) on cv */
  int err;
  const char *what;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  /* output (alloc mode) */
  double *pairs;
  size_t npairs;
  uint8_t *entries;  /* opts.entries' memory (kept alive by entries_ref), or NULL */
  size_t nentries;
  uint32_t entry_high;
  napi_ref entries_ref;
  /* opts.until: no write once the clock reaches until[0] (kept alive by until_ref), or NULL */
  double *until;
  napi_ref until_ref;
  /* N-API */
  napi_async_work work;
  napi_deferred deferred;
} copy_t;

static void fail(copy_t *c, int err, const char *what) {
  pthread_mutex_lock(&c->mu);
  if (!c->failed) {
    c->err = err;
    c->what = what;
    __atomic_store_n(&c->failed, 1, __ATOMIC_SEQ_CST);
  }
  pthread_cond_broadcast(&c->cv);
  pthread_mutex_unlock(&c->mu);
}

/*
 * Hand-offs between the reader and the writer. A piece takes ~0.1-0.3 ms each side, so a wait is
 * usually short: the waiting thread spins for up to SPIN_NS before it blocks on the condition
 * variable. Blocking on every hand-off cost ~25 ms of a 512 MiB copy on this project's 2-core
 * VM: a vCPU that halted has to be woken by the host (and the other side pays a futex wake).
 * A thread that blocks says so in `waiting`, and only then does the other side take the lock
 * to wake it. Everything here is sequentially consistent: the waiter counts itself in `waiting`
 * before it looks at the counters one last time, and the other side moves its counter before
 * it looks at `waiting`, so a wake-up cannot be missed.
 */
#define SPIN_NS 200000

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static size_t load(size_t *v) { return __atomic_load_n(v, __ATOMIC_SEQ_CST); }

/* The reader may fill piece i once fewer than RING pieces are waiting to be written. */
static int reader_may_go(copy_t *c, size_t i) { return i - load(&c->consumed) < RING; }
/* The writer may write piece i once the reader has produced it. */
static int writer_may_go(copy_t *c, size_t i) { return load(&c->produced) > i; }

/* Wait until ready(c, i) or a failure; returns 0 to go on, 1 to stop. */
static int await_turn(copy_t *c, size_t i, int (*ready)(copy_t *, size_t)) {
  int64_t deadline = 0;
  for (unsigned n = 0;; n++) {
    if (__atomic_load_n(&c->failed, __ATOMIC_SEQ_CST)) return 1;
    if (ready(c, i)) return 0;
    if ((n & 63) == 63) { /* the clock, now and then */
      int64_t t = now_ns();
      if (deadline == 0) deadline = t + SPIN_NS;
      else if (t > deadline) break;
    }
    cpu_relax();
  }
  pthread_mutex_lock(&c->mu);
  __atomic_add_fetch(&c->waiting, 1, __ATOMIC_SEQ_CST);
  while (!__atomic_load_n(&c->failed, __ATOMIC_SEQ_CST) && !ready(c, i)) pthread_cond_wait(&c->cv, &c->mu);
  __atomic_sub_fetch(&c->waiting, 1, __ATOMIC_SEQ_CST);
  int stop = __atomic_load_n(&c->failed, __ATOMIC_SEQ_CST);
  pthread_mutex_unlock(&c->mu);
  return stop;
}

/* Move a counter on, and wake the other side if it is blocked. */
static void advance(copy_t *c, size_t *counter) {
  __atomic_add_fetch(counter, 1, __ATOMIC_SEQ_CST);
  if (__atomic_load_n(&c->waiting, __ATOMIC_SEQ_CST)) {
    pthread_mutex_lock(&c->mu);
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
  }
}

/* Read exactly len bytes at pos (zeros past the end of the file); 0 or an errno. */
static int read_full(int fd, uint8_t *buf, size_t len, int64_t pos) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = pread(fd, buf + done, len - done, (off_t)(pos + (int64_t)done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (n == 0) {
      memset(buf + done, 0, len - done);
      break;
    }
    done += (size_t)n;
  }
  return 0;
}

static int write_full(int fd, const uint8_t *buf, size_t len, int64_t pos) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = pwrite(fd, buf + done, len - done, (off_t)(pos + (int64_t)done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (n == 0) return EIO;
    done += (size_t)n;
  }
  return 0;
}

static const uint8_t zeros[64 * 1024];

static int is_zero(const uint8_t *p, size_t n) {
  /* Data usually shows a non-zero byte among its first few: settle that without memcmp. */
  for (size_t i = 0; i < n && i < 16; i++) if (p[i]) return 0;
  for (size_t off = 0; off < n; off += sizeof zeros) {
    size_t k = n - off < sizeof zeros ? n - off : sizeof zeros;
    if (memcmp(p + off, zeros, k) != 0) return 0;
  }
  return 1;
}

static void *reader(void *arg) {
  copy_t *c = arg;
  for (size_t i = 0; i < c->npieces; i++) {
    if (await_turn(c, i, reader_may_go)) break;
    piece_t *p = &c->pieces[i];
    int err = read_full(c->src_fd, c->bufs[i % RING], (size_t)p->len, p->src);
    if (err) {
      fail(c, err, "read");
      break;
    }
    c->got[i % RING] = (size_t)p->len;
    advance(c, &c->produced); /* publishes got[] and the buffer too (sequentially consistent) */
  }
  return NULL;
}

/* Write one piece at its destination, leaving out the blocks that are all zero. */
static int write_in_place(copy_t *c, const uint8_t *buf, size_t len, int64_t dst) {
  if (c->block == 0) return write_full(c->dst_fd, buf, len, dst);
  size_t b = (size_t)c->block;
  size_t run = 0, pos = 0; /* [run, pos) is a run of non-zero blocks */
  for (; pos < len; pos += b) {
    size_t n = len - pos < b ? len - pos : b;
    if (!is_zero(buf + pos, n)) continue;
    if (pos > run) {
      int err = write_full(c->dst_fd, buf + run, pos - run, dst + (int64_t)run);
      if (err) return err;
    }
    run = pos + n;
  }
  return run < len ? write_full(c->dst_fd, buf + run, len - run, dst + (int64_t)run) : 0;
}

/* The next block's entry (see opts.entries): its host offset with entry_high, or 0, big-endian. */
static void put_entry(copy_t *c, int64_t host) {
  uint64_t v = host ? (uint64_t)host | ((uint64_t)c->entry_high << 32) : 0;
  uint8_t *e = c->entries + 8 * c->nentries++;
  for (int k = 7; k >= 0; k--, v >>= 8) e[k] = (uint8_t)v;
}

/* Write the non-zero blocks of one piece to the next host offsets, noting where each went. */
static int write_allocating(copy_t *c, uint8_t *buf, size_t len, int64_t guest) {
  size_t b = (size_t)c->block;
  if (len % b) { /* a short last block: pad it (the buffer has room for whole blocks) */
    memset(buf + len, 0, b - len % b);
    len += b - len % b;
  }
  size_t run = 0, pos = 0;
  int64_t host = c->alloc;
  for (; pos <= len; pos += b) {
    int zero = pos == len || is_zero(buf + pos, b);
    if (c->entries && pos < len) put_entry(c, zero ? 0 : host + (int64_t)(pos - run));
    if (!zero) {
      c->pairs[c->npairs++] = (double)(guest + (int64_t)pos);
      c->pairs[c->npairs++] = (double)(host + (int64_t)(pos - run));
      continue;
    }
    if (pos > run) {
      int err = write_full(c->dst_fd, buf + run, pos - run, host);
      if (err) return err;
      host += (int64_t)(pos - run);
    }
    run = pos + b;
  }
  c->alloc = host;
  return 0;
}

/* Whether the clock has reached opts.until (the owner may move it on meanwhile, from JavaScript). */
static int fenced(copy_t *c) {
  if (!c->until) return 0;
  uint64_t bits = __atomic_load_n((uint64_t *)c->until, __ATOMIC_RELAXED);
  double until;
  memcpy(&until, &bits, sizeof until);
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6 >= until;
}

static void execute(napi_env env, void *data) {
  (void)env;
  copy_t *c = data;
  pthread_t t;
  int err = pthread_create(&t, NULL, reader, c);
  if (err) {
    fail(c, err, "start the reader thread");
    return;
  }
  for (size_t i = 0; i < c->npieces; i++) {
    if (await_turn(c, i, writer_may_go)) break;
    piece_t *p = &c->pieces[i];
    uint8_t *buf = c->bufs[i % RING];
    if (fenced(c)) {
      fail(c, ETIMEDOUT, "fence: the copy's time to write ran out (opts.until)");
      break;
    }
    err = c->alloc < 0 ? write_in_place(c, buf, c->got[i % RING], p->dst)
                       : write_allocating(c, buf, c->got[i % RING], p->dst);
    if (err) {
      fail(c, err, "write");
      break;
    }
    advance(c, &c->consumed);
  }
  pthread_join(t, NULL);
}

static void release(copy_t *c) {
  free(c->mem);
  free(c->pieces);
  free(c->pairs);
  pthread_mutex_destroy(&c->mu);
  pthread_cond_destroy(&c->cv);
  free(c);
}

/* The references that keep opts.entries and opts.until alive while the copy runs. */
static void drop_refs(napi_env env, copy_t *c) {
  if (c->entries_ref) napi_delete_reference(env, c->entries_ref);
  if (c->until_ref) napi_delete_reference(env, c->until_ref);
  c->entries_ref = c->until_ref = NULL;
}

static void complete(napi_env env, napi_status status, void *data) {
  copy_t *c = data;
  napi_value result = NULL;
  if (status != napi_ok) {
    result = offload_errno_error(env, ECANCELED, "copyRanges");
    napi_reject_deferred(env, c->deferred, result);
  } else if (c->failed) {
    result = offload_errno_error(env, c->err, c->what);
    napi_reject_deferred(env, c->deferred, result);
  } else {
    napi_value ab;
    void *out;
    if (napi_create_arraybuffer(env, c->npairs * sizeof(double), &out, &ab) == napi_ok &&
        napi_create_typedarray(env, napi_float64_array, c->npairs, ab, 0, &result) == napi_ok) {
      if (c->npairs) memcpy(out, c->pairs, c->npairs * sizeof(double));
      napi_resolve_deferred(env, c->deferred, result);
    } else {
      napi_reject_deferred(env, c->deferred, offload_errno_error(env, ENOMEM, "copyRanges"));
    }
  }
  drop_refs(env, c);
  napi_delete_async_work(env, c->work);
  release(c);
}

static int whole(double v) { return v >= 0 && v <= 9007199254740991.0 && v == (double)(int64_t)v; }

static napi_value invalid(napi_env env, const char *msg) {
  napi_throw_type_error(env, "EINVAL", msg);
  return NULL;
}

/*
 * opts.entries / opts.entryHigh (alloc mode): the caller's Uint8Array of 8 bytes per block of
 * the ops, in op order, and the bits to put in the high half of each. Returns NULL when fine
 * (also when absent), else the message of the TypeError to throw.
 */
static const char *parse_entries(napi_env env, napi_value opts, copy_t *c, size_t nblocks, napi_value *out) {
  bool has = false;
  napi_value v;
  napi_valuetype t;
  if (napi_has_named_property(env, opts, "entries", &has) != napi_ok || !has) return NULL;
  if (napi_get_named_property(env, opts, "entries", &v) != napi_ok || napi_typeof(env, v, &t) != napi_ok) return "copyRanges: opts.entries unreadable";
  if (t == napi_undefined) return NULL;
  if (c->alloc < 0) return "copyRanges: opts.entries needs opts.alloc";
  bool is_ta = false;
  napi_typedarray_type type;
  size_t length;
  void *data;
  if (napi_is_typedarray(env, v, &is_ta) != napi_ok || !is_ta ||
      napi_get_typedarray_info(env, v, &type, &length, &data, NULL, NULL) != napi_ok || type != napi_uint8_array ||
      length != nblocks * 8) return "copyRanges: opts.entries must be a Uint8Array of 8 bytes per block of the ops";
  double high = 0;
  if (napi_has_named_property(env, opts, "entryHigh", &has) == napi_ok && has) {
    if (napi_get_named_property(env, opts, "entryHigh", &v) != napi_ok || napi_get_value_double(env, v, &high) != napi_ok ||
        !whole(high) || high > 4294967295.0) return "copyRanges: opts.entryHigh must be a 32-bit unsigned number";
  }
  c->entries = data;
  c->entry_high = (uint32_t)high;
  napi_get_named_property(env, opts, "entries", out);
  return NULL;
}

/* opts.until: NULL when fine (also when absent), else the message of the TypeError to throw. */
static const char *parse_until(napi_env env, napi_value opts, copy_t *c, napi_value *out) {
  bool has = false;
  napi_value v;
  napi_valuetype t;
  if (napi_has_named_property(env, opts, "until", &has) != napi_ok || !has) return NULL;
  if (napi_get_named_property(env, opts, "until", &v) != napi_ok || napi_typeof(env, v, &t) != napi_ok) return "copyRanges: opts.until unreadable";
  if (t == napi_undefined) return NULL;
  bool is_ta = false;
  napi_typedarray_type type;
  size_t length;
  void *data;
  if (napi_is_typedarray(env, v, &is_ta) != napi_ok || !is_ta ||
      napi_get_typedarray_info(env, v, &type, &length, &data, NULL, NULL) != napi_ok || type != napi_float64_array ||
      length < 1) return "copyRanges: opts.until must be a Float64Array of at least one element";
  c->until = data;
  *out = v;
  return NULL;
}

napi_value offload_copy_ranges(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  CHECK(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 4) return invalid(env, "copyRanges(srcFd, dstFd, ops, opts): four arguments expected");
  int32_t src_fd, dst_fd;
  if (napi_get_value_int32(env, argv[0], &src_fd) != napi_ok || napi_get_value_int32(env, argv[1], &dst_fd) != napi_ok ||
      src_fd < 0 || dst_fd < 0) return invalid(env, "copyRanges: file descriptors expected");
  bool is_ta = false;
  napi_typedarray_type type;
  size_t count;
  void *raw;
  if (napi_is_typedarray(env, argv[2], &is_ta) != napi_ok || !is_ta ||
      napi_get_typedarray_info(env, argv[2], &type, &count, &raw, NULL, NULL) != napi_ok ||
      type != napi_float64_array || count % 3 != 0) return invalid(env, "copyRanges: ops must be a Float64Array of [src, dst, length] triples");
  const double *ops = raw;
  napi_value v;
  double block = 0, alloc = -1;
  bool has;
  if (napi_get_named_property(env, argv[3], "block", &v) != napi_ok || napi_get_value_double(env, v, &block) != napi_ok)
    return invalid(env, "copyRanges: opts.block must be a number");
  if (block != 0 && (!whole(block) || block < 512 || block > MAX_BLOCK || ((int64_t)block & ((int64_t)block - 1))))
    return invalid(env, "copyRanges: opts.block must be 0 or a power of two from 512 to 2 MiB");
  if (napi_has_named_property(env, argv[3], "alloc", &has) != napi_ok) return NULL;
  if (has) {
    napi_valuetype t;
    if (napi_get_named_property(env, argv[3], "alloc", &v) != napi_ok || napi_typeof(env, v, &t) != napi_ok) return NULL;
    if (t != napi_undefined) {
      if (napi_get_value_double(env, v, &alloc) != napi_ok || !whole(alloc)) return invalid(env, "copyRanges: opts.alloc must be a file offset");
      if (block == 0) return invalid(env, "copyRanges: opts.alloc needs opts.block (the cluster size)");
    }
  }

  copy_t *c = calloc(1, sizeof *c);
  if (!c) return offload_throw_errno(env, ENOMEM, "copyRanges");
  pthread_mutex_init(&c->mu, NULL);
  pthread_cond_init(&c->cv, NULL);
  c->src_fd = src_fd;
  c->dst_fd = dst_fd;
  c->block = (int64_t)block;
  c->alloc = (int64_t)alloc;
  /* Pieces hold whole blocks so that blocks are counted from each op's start. */
  c->piece = c->block > PIECE ? c->block : PIECE;
  size_t npieces = 0, nblocks = 0;
  for (size_t i = 0; i < count; i += 3) {
    if (!whole(ops[i]) || !whole(ops[i + 1]) || !whole(ops[i + 2]) || ops[i + 2] == 0) {
      release(c);
      return invalid(env, "copyRanges: every op needs whole, non-negative offsets and a length > 0");
    }
    npieces += (size_t)((ops[i + 2] + (double)c->piece - 1) / (double)c->piece);
    if (c->block) nblocks += (size_t)((ops[i + 2] + block - 1) / block);
  }
  napi_value entries_value = NULL;
  napi_value until_value = NULL;
  const char *bad = parse_entries(env, argv[3], c, nblocks, &entries_value);
  if (!bad) bad = parse_until(env, argv[3], c, &until_value);
  if (bad) {
    release(c);
    return invalid(env, bad);
  }
  c->pieces = malloc((npieces ? npieces : 1) * sizeof(piece_t));
  c->pairs = c->alloc >= 0 ? malloc((nblocks ? nblocks : 1) * 2 * sizeof(double)) : NULL;
  /* +SKEW, and a block of slack for zero padding; buffers only as large as the pieces need. */
  int64_t largest = 0;
  for (size_t i = 0; i < count; i += 3) if ((int64_t)ops[i + 2] > largest) largest = (int64_t)ops[i + 2];
  int64_t bufsize = largest < c->piece ? largest : c->piece;
  if (c->block && bufsize % c->block) bufsize += c->block - bufsize % c->block;
  c->mem = malloc((size_t)RING * (size_t)(bufsize + SKEW + 64));
  if (!c->pieces || (c->alloc >= 0 && !c->pairs) || !c->mem) {
    release(c);
    return offload_throw_errno(env, ENOMEM, "copyRanges");
  }
  for (int i = 0; i < RING; i++) {
    uintptr_t base = (uintptr_t)c->mem + (uintptr_t)i * (uintptr_t)(bufsize + SKEW + 64);
    c->bufs[i] = (uint8_t *)(((base + 63) & ~(uintptr_t)63) + SKEW);
  }
  for (size_t i = 0; i < count; i += 3) {
    int64_t src = (int64_t)ops[i], dst = (int64_t)ops[i + 1], len = (int64_t)ops[i + 2];
    for (int64_t off = 0; off < len; off += c->piece) {
      piece_t *p = &c->pieces[c->npieces++];
      p->src = src + off;
      p->dst = dst + off;
      p->len = len - off < c->piece ? len - off : c->piece;
    }
  }

  napi_value promise, name;
  /* Last, so that no early return leaks it: keeps opts.entries alive until complete(). */
  if (entries_value && napi_create_reference(env, entries_value, 1, &c->entries_ref) != napi_ok) {
    release(c);
    napi_throw_error(env, "EINVAL", "copyRanges: could not hold opts.entries");
    return NULL;
  }
  if (until_value && napi_create_reference(env, until_value, 1, &c->until_ref) != napi_ok) {
    drop_refs(env, c);
    release(c);
    napi_throw_error(env, "EINVAL", "copyRanges: could not hold opts.until");
    return NULL;
  }
  if (napi_create_promise(env, &c->deferred, &promise) != napi_ok ||
      napi_create_string_utf8(env, "offload.copyRanges", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_async_work(env, NULL, name, execute, complete, c, &c->work) != napi_ok) {
    drop_refs(env, c);
    release(c);
    napi_throw_error(env, "EINVAL", "copyRanges: could not start the copy");
    return NULL;
  }
  if (napi_queue_async_work(env, c->work) != napi_ok) {
    napi_delete_async_work(env, c->work);
    drop_refs(env, c);
    release(c);
    napi_throw_error(env, "EINVAL", "copyRanges: could not start the copy");
    return NULL;
  }
  return promise;
}
