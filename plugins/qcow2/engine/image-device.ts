/**
 * A core BlockDevice over an engine Image: what the pool hands the broker as a volume's data path
 * and what `convert` copies between. Its copyFrom is the copier's native fast path: where the
 * source is an engine image too, whose bytes lie as they are in a file (raw data, uncompressed
 * qcow2 clusters), and this image takes a native copy (raw, or qcow2 over whole clusters that it
 * does not allocate yet), the bytes move in the native helper (ImageFile.copyIn) with no
 * JavaScript between a read and its write. Everything else is left to the copier.
 *
 * The native copy reads and writes the layers' files below their ImageHandles: its writes are not
 * counted in flight, tracked or held by a pivot. That is sound for what the copier gives it — a
 * target that reads as zeros where nothing was written, made for this copy and locked by its job,
 * and a point-in-time source that nobody writes meanwhile — and for nothing else.
 */
import { FailedPrecondition, OutOfRange, type BlockDevice, type ByteRange, type Extent, type IoOptions } from '../../../core/index.js';
import { nativeCopyAvailable, nativeCopyHonoursUntil, type ImageFile } from './file.js';
import { ImageHandle } from './image-handle.js';
import type { BlockStatus, CloseOptions, Image } from './types.js';

/** The engine's options for a device call: only the background hint carries over. */
const BACKGROUND = { background: true } as const;
const bg = (opts: IoOptions | undefined) => (opts?.background ? BACKGROUND : undefined);

/** Runs `fn` with the image a device works on now (the pool: under its volume lock, on the current top). */
export type ImageAccess = <T>(fn: (img: Image) => Promise<T>) => Promise<T>;

export interface ImageDeviceOptions {
  mode: 'r' | 'rw';
  /** Named in errors (a volume ref, a path). */
  ref?: string;
  /** Preferred I/O granularity (default: the image's cluster size). */
  blockSize?: number;
  /** Called once by close(), after a read-write device's flush (release a volume, close the image…), with close's options. */
  onClose?: (opts?: CloseOptions) => Promise<void>;
}

/** What copyFrom needs of a source device of this module. */
interface Source {
  access: ImageAccess;
  /** The block status its last extents() call saw, kept only for an image opened read-only (it cannot change). */
  status?: { start: number; end: number; list: BlockStatus[] };
}

/** Devices of this module, for copyFrom to recognise a source. */
const sources = new WeakMap<BlockDevice, Source>();

/** A device over `image` (an open Image, or an accessor that finds it for each call). */
export async function imageDevice(image: Image | ImageAccess, opts: ImageDeviceOptions): Promise<BlockDevice> {
  const access: ImageAccess = typeof image === 'function' ? image : (fn) => fn(image);
  let size = await access(async (img) => img.virtualSize);
  const blockSize = opts.blockSize ?? (await access(async (img) => img.clusterSize));
  const ref = opts.ref ?? (await access(async (img) => img.path));
  // The bitmaps' names, for NBD's qemu:dirty-bitmap contexts (dirtyBitmaps() answers at once):
  // read now, and again with each dirtyExtents call. An inconsistent one is not offered, as
  // qemu-nbd refuses to export it.
  const consistent = async (img: Image) => (await img.bitmaps.info()).filter((b) => !b.inconsistent).map((b) => b.name);
  let bitmapNames = await access(consistent);
  let closed = false;
  let deferring = false;
  const alive = () => {
    if (closed) throw new FailedPrecondition(`the device of ${ref} is closed`, { ref, hint: 'open it again' });
  };
  const range = (offset: number, length: number, what: string) => {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > size) {
      throw new OutOfRange(`${what} at ${offset}+${length} is outside ${ref} (${size} bytes)`, { ref });
    }
  };
  const writable = () => {
    if (opts.mode !== 'rw') throw new FailedPrecondition(`${ref} is open read-only`, { ref, hint: 'open it with mode "rw" to write' });
  };
  // Every call re-reads the size: a resize or revert behind the device changes it. Checks fail as
  // rejections, never as throws: callers await the promise.
  const io = async <T>(fn: (img: Image) => Promise<T>) => {
    alive();
    return access(async (img) => {
      size = img.virtualSize;
      return fn(img);
    });
  };
  const device: BlockDevice = {
    get sizeBytes() { return size; },
    blockSize,
    read: (offset, length, opts) => io(async (img) => { range(offset, length, 'read'); return img.read(offset, length, bg(opts)); }),
    readInto: (buf, offset, opts) => io(async (img) => { range(offset, buf.length, 'read'); await img.readInto(buf, offset, bg(opts)); }),
    write: async (offset, data, opts) => {
      writable();
      return io(async (img) => { range(offset, data.length, 'write'); await img.write(offset, data, bg(opts)); });
    },
    writeFua: async (offset, data) => {
      writable();
      return io(async (img) => { range(offset, data.length, 'write'); await img.write(offset, data, { fua: true }); });
    },
    writeZeroes: async (offset, length) => { writable(); return io(async (img) => { range(offset, length, 'write zeroes'); await img.writeZeroes(offset, length); }); },
    extents: (offset = 0, length?: number) => io(async (img) => {
      const len = length ?? size - offset;
      range(offset, len, 'extents');
      const status = await statusOf(img, offset, len);
      // A read-only image's map is what a copy from it will find: its native path reuses it.
      if (img.readOnly && img.format === 'qcow2') self.status = { start: offset, end: offset + len, list: status };
      return extentsFrom(status);
    }),
    discard: async (offset, length) => {
      writable();
      return io(async (img) => { range(offset, length, 'discard'); if (length > 0) await img.discard(offset, length); });
    },
    // Depth as NBD's qemu:allocation-depth counts it: 0 nowhere, 1 this image, 2 its backing file…
    allocationDepth: (offset, length) => io(async (img) => {
      range(offset, length, 'allocation depth');
      return (await statusOf(img, offset, length)).map((st) => ({ offset: st.start, length: st.length, depth: st.present ? st.depth + 1 : 0 }));
    }),
    dirtyBitmaps: () => [...bitmapNames],
    dirtyExtents: (name, offset, length) => io(async (img) => {
      range(offset, length, 'dirty bitmap');
      bitmapNames = await consistent(img);
      return img.bitmaps.dirtyExtents(name, offset, length);
    }),
    flush: async (o) => { alive(); if (opts.mode === 'rw') await io((img) => img.flush(o?.background ? { background: true } : undefined)); },
    deferMetadata: async (on) => {
      writable();
      await io((img) => img.setDeferMetadata(on));
      deferring = on;
    },
    async close(o) {
      if (closed) return;
      // The image may stay open for others (a pool volume's one shared image): it writes through
      // again — unless this closer no longer owns what it wrote (onClose passes writeNothing on).
      if (o?.writeNothing !== true) {
        if (deferring) await io((img) => img.setDeferMetadata(false)).catch(() => undefined);
        if (opts.mode === 'rw') await io((img) => img.flush()).catch(() => undefined);
      }
      closed = true;
      await opts.onClose?.(o);
    },
    async copyFrom(source: BlockDevice, ranges: ByteRange[], o?: { until?: Float64Array }): Promise<ByteRange[] | undefined> {
      writable();
      const from = sources.get(source);
      if (!from || !nativeCopyAvailable() || (o?.until && !nativeCopyHonoursUntil())) return undefined;
      return from.access((src) => io((dst) => nativeCopy(src, dst, ranges, from.status, o?.until)));
    },
  };
  const self: Source = { access };
  sources.set(device, self);
  return device;
}

/**
 * The block status a device's extents come from. A raw image reports its file system's map when
 * that is cheap to know, else all data: scanning it for zeros would cost a full read, which a
 * copy does anyway.
 */
async function statusOf(img: Image, offset: number, length: number): Promise<BlockStatus[]> {
  if (length === 0) return [];
  if (img.format !== 'raw') return img.blockStatus(offset, length);
  const exact = await ImageHandle.nodeOf(img)?.exactBlockStatus?.(offset, length);
  return exact ?? [{ start: offset, length, depth: 0, present: true, zero: false, data: true, compressed: false }];
}

/** Allocated ranges, merged by kind. */
function extentsFrom(status: BlockStatus[]): Extent[] {
  const out: Extent[] = [];
  for (const s of status) {
    if (!s.present) continue;
    const kind = s.data ? 'data' : 'zero';
    const last = out[out.length - 1];
    if (last && last.kind === kind && last.offset + last.length === s.start) last.length += s.length;
    else out.push({ offset: s.start, length: s.length, kind });
  }
  return out;
}

/**
 * Bytes per native copy call: a qcow2 target reserves space for one call at a time, and the
 * helper returns a [guest, host] pair (16 bytes) per cluster it writes there: 2^16 clusters a
 * call, between 256 MiB and 1 GiB (both multiples of every cluster size). Each call starts the
 * helper's pipeline afresh and, into qcow2, updates the L2 tables before the next can start: 2
 * calls instead of 1 cost ~6 ms of a 512 MiB convert.
 */
const MIN_BATCH = 256 * 1024 * 1024;
const MAX_BATCH = 1024 * 1024 * 1024;

/**
 * Copy what it can of `ranges` from `src` into `dst` natively; the ranges it leaves: edges of
 * clusters that a qcow2 target can only take whole, compressed data, data past the end of its
 * file, clusters the target already allocates (a resumed copy), or everything when `dst` takes
 * no native copy.
 */
async function nativeCopy(src: Image, dst: Image, ranges: ByteRange[], known?: Source['status'], until?: Float64Array): Promise<ByteRange[]> {
  const target = ImageHandle.nodeOf(dst);
  if (!target?.copyFromFile || ranges.length === 0) return ranges;
  const align = dst.format === 'qcow2' ? dst.clusterSize : 1;
  const total = dst.virtualSize;
  const span = { start: ranges[0]!.offset, end: ranges[ranges.length - 1]!.offset + ranges[ranges.length - 1]!.length };
  const taken = dst.format === 'qcow2' ? await dst.allocatedAbove(span.start, span.end - span.start, dst.backing) : [];
  const left: ByteRange[] = [];
  const ops = new Map<ImageFile, number[]>(); // source file → [srcPos, guest, length]…
  for (const seg of await hostSegments(src, ranges, known)) {
    const end = seg.start + seg.length;
    // The target takes whole clusters: the edges of a range that cuts one are left.
    const a = Math.ceil(seg.start / align) * align;
    const b = end === total ? end : end - (end % align);
    if (!seg.host || a >= b) {
      left.push({ offset: seg.start, length: seg.length });
      continue;
    }
    if (a > seg.start) left.push({ offset: seg.start, length: a - seg.start });
    for (const [s, e] of minus(a, b, taken)) {
      const list = ops.get(seg.host.file) ?? ops.set(seg.host.file, []).get(seg.host.file)!;
      list.push(seg.host.offset + (s - seg.start), s, e - s);
    }
    for (const t of taken) {
      const s = Math.max(a, t.start);
      const e = Math.min(b, t.start + t.length);
      if (s < e) left.push({ offset: s, length: e - s });
    }
    if (b < end) left.push({ offset: b, length: end - b });
  }
  const batch = dst.format === 'qcow2' ? Math.min(MAX_BATCH, Math.max(MIN_BATCH, dst.clusterSize * 2 ** 16)) : MAX_BATCH;
  for (const [file, list] of ops) {
    for (const b of batches(list, batch)) await target.copyFromFile(file, b, until);
  }
  return left.sort((x, y) => x.offset - y.offset);
}

/** A range of the source, and where its bytes lie when one file holds them as they are. */
interface Segment { start: number; length: number; host?: { file: ImageFile; offset: number } }

/**
 * The source's status over the ranges (sorted, as the copier hands them), with the host location
 * of the data that lies plainly in a file: one block-status walk over their whole span, clipped to
 * each range (a walk per range cost ~20 ms of a 512-range convert).
 */
async function hostSegments(img: Image, ranges: ByteRange[], known?: Source['status']): Promise<Segment[]> {
  const layers: Image[] = [];
  for (let l: Image | undefined = img; l; l = l.backing) layers.push(l);
  const files = layers.map((l) => ImageHandle.nodeOf(l)?.file);
  const sizes = await Promise.all(files.map((f) => f?.size() ?? 0));
  const out: Segment[] = [];
  if (img.format === 'raw') {
    for (const r of ranges) {
      const file = files[0];
      const inFile = file !== undefined && r.offset + r.length <= sizes[0]!;
      out.push(inFile ? { start: r.offset, length: r.length, host: { file, offset: r.offset } } : { start: r.offset, length: r.length });
    }
    return out;
  }
  const first = ranges[0]!.offset;
  const last = ranges[ranges.length - 1]!.offset + ranges[ranges.length - 1]!.length;
  const status = known && known.start <= first && last <= known.end ? known.list : await img.blockStatus(first, last - first);
  let i = 0;
  for (const r of ranges) {
    const end = r.offset + r.length;
    while (i < status.length && status[i]!.start + status[i]!.length <= r.offset) i++;
    for (let j = i; j < status.length && status[j]!.start < end; j++) {
      const st = status[j]!;
      const from = Math.max(r.offset, st.start);
      const to = Math.min(end, st.start + st.length);
      const file = files[st.depth];
      const plain = file !== undefined && st.data && !st.compressed && st.offset !== undefined && st.offset + (to - st.start) <= sizes[st.depth]!;
      out.push(plain ? { start: from, length: to - from, host: { file, offset: st.offset! + (from - st.start) } } : { start: from, length: to - from });
    }
  }
  return out;
}

/** [start, end) without the ranges in `taken` (sorted), as [s, e) pairs. */
function minus(start: number, end: number, taken: { start: number; length: number }[]): [number, number][] {
  const out: [number, number][] = [];
  let p = start;
  for (const t of taken) {
    if (t.start + t.length <= p || t.start >= end) continue;
    if (t.start > p) out.push([p, t.start]);
    p = Math.max(p, t.start + t.length);
  }
  if (p < end) out.push([p, end]);
  return out;
}

/** Ops in calls of at most `limit` bytes (a long op is cut). */
function* batches(ops: number[], limit: number): Generator<Float64Array> {
  let cur: number[] = [];
  let bytes = 0;
  for (let i = 0; i < ops.length; i += 3) {
    let [srcPos, guest, len] = [ops[i]!, ops[i + 1]!, ops[i + 2]!];
    while (len > 0) {
      const n = Math.min(len, limit - bytes);
      cur.push(srcPos, guest, n);
      bytes += n;
      srcPos += n;
      guest += n;
      len -= n;
      if (bytes === limit) {
        yield Float64Array.from(cur);
        cur = [];
        bytes = 0;
      }
    }
  }
  if (cur.length > 0) yield Float64Array.from(cur);
}
