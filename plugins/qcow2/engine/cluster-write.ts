/**
 * Changing what a qcow2 image's clusters hold: guest writes (in place, or into new clusters with
 * copy-on-write of the edges), copy-on-read fills, zeroing, discarding and emptying. Every path
 * keeps the crash-safe order of Qcow2State: refcounts → data → L2 → L1 → decrements.
 */
import { InvalidArgument } from '../../../core/index.js';
import { decodeL2, encodeL2Normal, encodeL2Zero, readEntry, writeEntry, type L2Entry } from '../format/entries.js';
import { hostOf, l2ForWrite, l2OffsetAt, lookup, release, releaseAll, runs } from './cluster-map.js';
import { oldCluster } from './cluster-read.js';
import type { Qcow2State } from './qcow2-state.js';

/** Largest single buffer used for zero-filling. */
const CHUNK = 1 << 20;

/** Entries whose cluster a write can replace without freeing anything: no host cluster behind them. */
const freesNothing = (e: L2Entry): boolean => e.kind === 'unallocated' || (e.kind === 'zero' && e.offset === 0);

/**
 * A guest write, taking the lock it needs: shared when it allocates nothing or when its new
 * clusters free nothing reused before an exclusive step, else exclusive. So writes into fresh
 * clusters go on beside reads, other such writes and a flush's fdatasync (a live copy's
 * write-blocking writes into the target waited out the copier's writes and a whole sync).
 * `background`: a bulk copy's write (its data on the low-priority thread, see ImageFile).
 */
export async function write(s: Qcow2State, offset: number, data: Uint8Array, background = false): Promise<void> {
  if (await s.lock.shared(() => writeInPlace(s, offset, data, false, background))) return;
  // With deferred metadata, clusters that are not ours may be freed too: a freed cluster is not
  // reused before the flush (which is exclusive). Written through, only clusters with nothing behind them.
  if (await writeAllocatingShared(s, offset, data, s.meta.deferred ? (e) => !(e.kind === 'normal' && e.copied) : freesNothing, background)) {
    if (s.meta.overLimit) await s.lock.exclusive(() => s.meta.flushIfFull());
    return;
  }
  await s.lock.exclusive(async () => {
    await writeLocked(s, offset, data, background);
    await s.meta.flushIfFull();
  });
}

/**
 * A guest write that resolves once it is durable, as write() then Image.flush() would be (NBD's
 * FUA), in as few thread-pool round trips as the native helper allows: in place, the data and the
 * fdatasync in one; allocating, the refcount update, the cluster, the L2 entry and the fdatasync
 * in one (ImageFile.batch). The file sees the same writes in the same order as through write(),
 * then the fdatasync of flush(). Written-through metadata only: with deferred metadata, durable
 * needs its flush (the caller writes, then flushes).
 */
export async function writeDurable(s: Qcow2State, offset: number, data: Uint8Array): Promise<void> {
  if (await s.lock.shared(() => writeInPlace(s, offset, data, true))) return;
  await s.lock.exclusive(() => s.file.batch(() => writeLocked(s, offset, data), true, () => s.reloadTables()));
}

/**
 * Fast path: every cluster is already ours (COPIED) — write without touching metadata; `durable`:
 * with the fdatasync, in one call. Not while a copy-on-read fill is pointing one of the clusters
 * at new space (`inflight`): its L2 entry may not be written yet, and the write would be durable
 * without it (false: the caller's exclusive path waits for the fill).
 */
async function writeInPlace(s: Qcow2State, offset: number, data: Uint8Array, durable = false, background = false): Promise<boolean> {
  const rs = await runs(s, offset, data.length);
  if (!rs.every((r) => r.entry.kind === 'normal' && r.entry.copied)) return false;
  if (durable) {
    if (s.inflight.size > 0) {
      for (let g = Math.floor(offset / s.cs); g < Math.ceil((offset + data.length) / s.cs); g++) if (s.inflight.has(g)) return false;
    }
    await s.file.writeBatch(rs.map((r) => [hostOf(s, r, r.start), data.subarray(r.start - offset, r.start - offset + r.length)] as const), true);
    return true;
  }
  for (const r of rs) {
    await s.file.write(hostOf(s, r, r.start), data.subarray(r.start - offset, r.start - offset + r.length), false, background);
  }
  return true;
}

/**
 * A write whose clusters (in one L2 table) all need new space: allocate under `metaLock`, write
 * the data with only the shared lock held (other such writes proceed at the same time), then
 * point the L2 entries at it. False when the write does not qualify (mixed clusters, or one that
 * another write is allocating): the caller takes the exclusive path. Safe because every other
 * change of the mapping takes the exclusive lock, and in deferred mode freed clusters are only
 * reused after a flush, which is exclusive too (without deferral, only writes that free nothing
 * come here: guest writes and copy-on-read fills of clusters with no host cluster behind them).
 */
async function writeAllocatingShared(s: Qcow2State, offset: number, data: Uint8Array, qualifies: (e: L2Entry) => boolean,
  background: boolean): Promise<boolean> {
  const cs = s.cs;
  const gc0 = Math.floor(offset / cs);
  const gcEnd = Math.ceil((offset + data.length) / cs);
  const l1i = Math.floor(gc0 / s.l2Entries);
  if (Math.floor((gcEnd - 1) / s.l2Entries) !== l1i) return false;
  return s.lock.shared(async () => {
    const plan = await s.metaLock.exclusive(async () => {
      for (let g = gc0; g < gcEnd; g++) if (s.inflight.has(g)) return undefined;
      const { table } = await l2ForWrite(s, l1i);
      const olds: L2Entry[] = [];
      for (let g = gc0; g < gcEnd; g++) {
        const e = decodeL2(...readEntry(table, g % s.l2Entries), s.h.clusterBits);
        if (!qualifies(e)) return undefined;
        olds.push(e);
      }
      const host = await s.refcounts.alloc(olds.length);
      for (let g = gc0; g < gcEnd; g++) s.inflight.add(g);
      return { host, olds };
    });
    if (!plan) return false;
    try {
      const { host, olds } = plan;
      const n = olds.length;
      const buf = await withOldEdges(s, gc0, olds, offset, offset + data.length, data);
      await s.file.write(host, buf, false, background);
      s.fileLen = Math.max(s.fileLen, host + n * cs);
      await s.metaLock.exclusive(async () => {
        const { offset: l2off, table } = await l2ForWrite(s, l1i);
        const idx0 = gc0 % s.l2Entries;
        for (let i = 0; i < n; i++) writeEntry(table, idx0 + i, ...encodeL2Normal(host + i * cs, true));
        await s.meta.writeL2(l2off, table, idx0, idx0 + n);
        for (const e of olds) await release(s, e);
      });
    } finally {
      for (let g = gc0; g < gcEnd; g++) s.inflight.delete(g);
    }
    return true;
  });
}

/** Write with allocation; caller holds the exclusive lock. */
export async function writeLocked(s: Qcow2State, offset: number, data: Uint8Array, background = false): Promise<void> {
  const end = offset + data.length;
  const cs = s.cs;
  let p = offset;
  while (p < end) {
    const l1i = Math.floor(p / cs / s.l2Entries);
    const sliceEnd = Math.min(end, (l1i + 1) * s.l2Entries * cs);
    const { offset: l2off, table } = await l2ForWrite(s, l1i);
    while (p < sliceEnd) {
      const gc = Math.floor(p / cs);
      const idx = gc % s.l2Entries;
      const first = decodeL2(...readEntry(table, idx), s.h.clusterBits);
      if (first.kind === 'normal' && first.copied) {
        // In place: extend over host-contiguous owned clusters.
        let q = Math.min(sliceEnd, (gc + 1) * cs);
        const host = first.offset + (p - gc * cs);
        let expected = first.offset + cs;
        while (q < sliceEnd) {
          const e = decodeL2(...readEntry(table, Math.floor(q / cs) % s.l2Entries), s.h.clusterBits);
          if (!(e.kind === 'normal' && e.copied && e.offset === expected)) break;
          expected += cs;
          q = Math.min(sliceEnd, q + cs);
        }
        await s.file.write(host, data.subarray(p - offset, q - offset), true, background);
        s.fileLen = Math.max(s.fileLen, host + (q - p));
        p = q;
        continue;
      }
      // Allocate: extend over clusters that all need new space.
      const olds: L2Entry[] = [first];
      let q = Math.min(sliceEnd, (gc + 1) * cs);
      while (q < sliceEnd) {
        const e = decodeL2(...readEntry(table, Math.floor(q / cs) % s.l2Entries), s.h.clusterBits);
        if (e.kind === 'normal' && e.copied) break;
        olds.push(e);
        q = Math.min(sliceEnd, q + cs);
      }
      await allocAndWrite(s, gc, olds, p, q, data.subarray(p - offset, q - offset), l2off, table, background);
      p = q;
    }
  }
}

/**
 * Give clusters gc… new space, write [p, q) of guest data into it with the rest of the first
 * and last clusters copied from their old content, point the L2 entries at it, then drop
 * the old clusters. Order: refcounts → data → L2 → decrements.
 */
async function allocAndWrite(s: Qcow2State, gc: number, olds: L2Entry[], p: number, q: number, data: Uint8Array,
  l2off: number, table: Uint8Array, background: boolean): Promise<void> {
  const cs = s.cs;
  const n = olds.length;
  const host = await s.refcounts.alloc(n);
  const buf = await withOldEdges(s, gc, olds, p, q, data);
  await s.file.write(host, buf, true, background); // the caller's data, or made for this write
  s.fileLen = Math.max(s.fileLen, host + n * cs);
  const idx0 = gc % s.l2Entries;
  for (let i = 0; i < n; i++) writeEntry(table, idx0 + i, ...encodeL2Normal(host + i * cs, true));
  await s.meta.writeL2(l2off, table, idx0, idx0 + n);
  for (const e of olds) await release(s, e);
}

/**
 * Whole clusters gc… (old entries `olds`) holding guest bytes [p, q) = `data`: the head of the
 * first and the tail of the last cluster come from their old content (copy-on-write).
 */
async function withOldEdges(s: Qcow2State, gc: number, olds: L2Entry[], p: number, q: number, data: Uint8Array): Promise<Uint8Array> {
  const cs = s.cs;
  const n = olds.length;
  const base = gc * cs;
  if (p === base && q === base + n * cs) return data;
  const buf = new Uint8Array(n * cs);
  if (p > base) buf.set((await oldCluster(s, gc, olds[0]!)).subarray(0, p - base), 0);
  const lastStart = base + (n - 1) * cs;
  if (q < lastStart + cs) {
    const last = await oldCluster(s, gc + n - 1, olds[n - 1]!);
    buf.set(last.subarray(q - lastStart), q - base);
  }
  buf.set(data, p - base);
  return buf;
}

/**
 * Copy-on-read (Image.fillUnallocated): the whole clusters of the range go through the concurrent
 * allocating write, L2 table by L2 table, as long as all of a table's clusters are unallocated;
 * what remains (partial clusters at the edges, clusters a writer allocated meanwhile) is done
 * cluster by cluster under the exclusive lock, skipping every cluster that is allocated by then.
 */
export async function fillUnallocated(s: Qcow2State, offset: number, data: Uint8Array): Promise<number> {
  const cs = s.cs;
  const end = offset + data.length;
  const wholeStart = Math.min(end, Math.ceil(offset / cs) * cs);
  const wholeEnd = end === s.h.size ? end : Math.max(wholeStart, Math.floor(end / cs) * cs);
  const span = s.l2Entries * cs;
  let p = wholeStart;
  while (p < wholeEnd) {
    const q = Math.min(wholeEnd, (Math.floor(p / span) + 1) * span);
    if (!(await writeAllocatingShared(s, p, data.subarray(p - offset, q - offset), (e) => e.kind === 'unallocated', false))) break;
    p = q;
  }
  const fast = p - wholeStart;
  const rest: [number, number][] = [];
  if (offset < wholeStart) rest.push([offset, wholeStart]);
  if (p < end) rest.push([p, end]);
  if (rest.length === 0) {
    if (s.meta.overLimit) await s.lock.exclusive(() => s.meta.flushIfFull());
    return fast;
  }
  return fast + await s.lock.exclusive(async () => {
    let written = 0;
    await eachUnallocated(s, rest, async (a, b) => {
      await writeLocked(s, a, data.subarray(a - offset, b - offset));
      written += b - a;
    });
    await s.meta.flushIfFull();
    return written;
  });
}

/**
 * Image.zeroUnallocated: the clusters of [offset, end) that are still unallocated read as zeros
 * afterwards — the zero flag on v3 (whole clusters), zero bytes where v2 has no flag or only part
 * of a cluster is covered. Caller holds the exclusive lock.
 */
export async function zeroUnallocatedLocked(s: Qcow2State, offset: number, end: number): Promise<void> {
  const cs = s.cs;
  await eachUnallocated(s, [[offset, end]], async (a, b) => {
    const wholeStart = Math.min(b, Math.ceil(a / cs) * cs);
    const wholeEnd = b === s.h.size ? b : Math.max(wholeStart, Math.floor(b / cs) * cs);
    if (s.h.version === 2 || wholeStart >= wholeEnd) {
      await zeroFill(s, a, b);
      return;
    }
    if (a < wholeStart) await writeLocked(s, a, new Uint8Array(wholeStart - a));
    await setZeroFlags(s, wholeStart, wholeEnd);
    if (wholeEnd < b) await writeLocked(s, wholeEnd, new Uint8Array(b - wholeEnd));
  });
}

/** Call `fn` on each run of clusters of the ranges that is unallocated now (clipped to the ranges). */
async function eachUnallocated(s: Qcow2State, ranges: [number, number][], fn: (start: number, end: number) => Promise<void>): Promise<void> {
  const cs = s.cs;
  for (const [from, to] of ranges) {
    let p = from;
    while (p < to) {
      // Skip clusters a writer allocated meanwhile; gather the next run still unallocated.
      while (p < to && (await lookup(s, Math.floor(p / cs))).kind !== 'unallocated') p = Math.min(to, (Math.floor(p / cs) + 1) * cs);
      let q = p;
      while (q < to && (await lookup(s, Math.floor(q / cs))).kind === 'unallocated') q = Math.min(to, (Math.floor(q / cs) + 1) * cs);
      if (q > p) await fn(p, q);
      p = q;
    }
  }
}

/** The zero flag on whole v3 clusters [start, end) (end may be the unaligned image end), whatever they held. */
async function setZeroFlags(s: Qcow2State, start: number, end: number): Promise<void> {
  const cs = s.cs;
  let gc = Math.floor(start / cs);
  const gcEnd = Math.ceil(end / cs);
  while (gc < gcEnd) {
    const stop = Math.min(gcEnd, (Math.floor(gc / s.l2Entries) + 1) * s.l2Entries);
    const { offset: l2off, table } = await l2ForWrite(s, Math.floor(gc / s.l2Entries));
    const i0 = gc % s.l2Entries;
    const olds: L2Entry[] = [];
    for (let i = i0; i < i0 + (stop - gc); i++) {
      const e = decodeL2(...readEntry(table, i), s.h.clusterBits);
      if (e.kind === 'zero' && e.offset === 0) continue;
      writeEntry(table, i, ...encodeL2Zero());
      olds.push(e);
    }
    if (olds.length > 0) {
      await s.meta.writeL2(l2off, table, i0, i0 + (stop - gc));
      for (const e of olds) await release(s, e);
    }
    gc = stop;
  }
}

/**
 * Zero-write (Image.writeZeroes) or discard. Whole clusters change their L2 entry (zero flag on
 * v3; unallocated where that reads as zeros); partial clusters of a zero-write get zero bytes;
 * partial clusters of a discard are left alone (discard is advisory, as in QEMU). Caller holds
 * the exclusive lock.
 */
export async function zeroLocked(s: Qcow2State, offset: number, length: number, mode: 'zero' | 'discard'): Promise<void> {
  const cs = s.cs;
  const end = offset + length;
  // Whole clusters change their entry; the last cluster counts as whole when the range
  // reaches the end of the image.
  const wholeStart = Math.min(end, Math.ceil(offset / cs) * cs);
  const wholeEnd = end === s.h.size ? end : Math.max(wholeStart, Math.floor(end / cs) * cs);
  if (mode === 'zero') {
    if (offset < wholeStart) await writeLocked(s, offset, new Uint8Array(wholeStart - offset));
    if (wholeEnd < end) await writeLocked(s, wholeEnd, new Uint8Array(end - wholeEnd));
  }
  let p = wholeStart;
  while (p < wholeEnd) {
    const l1i = Math.floor(p / cs / s.l2Entries);
    const sliceEnd = Math.min(wholeEnd, (l1i + 1) * s.l2Entries * cs);
    const hasL2 = l2OffsetAt(s, l1i) !== 0;
    if (!hasL2 && !s.backing) { p = sliceEnd; continue; }
    if (s.h.version === 2 && (!hasL2 || (mode === 'zero' && s.backing))) {
      if (mode === 'zero') await zeroFill(s, p, sliceEnd);
      p = sliceEnd;
      continue;
    }
    const { offset: l2off, table } = await l2ForWrite(s, l1i);
    const idx0 = Math.floor(p / cs) % s.l2Entries;
    const n = Math.ceil((sliceEnd - p) / cs);
    const olds: L2Entry[] = [];
    for (let i = 0; i < n; i++) {
      const e = decodeL2(...readEntry(table, idx0 + i), s.h.clusterBits);
      const useZeroFlag = s.h.version === 3 && (s.backing !== undefined || e.kind !== 'unallocated');
      if (useZeroFlag) {
        if (e.kind === 'zero' && e.offset === 0) continue;
        writeEntry(table, idx0 + i, ...encodeL2Zero());
      } else {
        if (e.kind === 'unallocated') continue;
        writeEntry(table, idx0 + i, 0, 0);
      }
      olds.push(e);
    }
    if (olds.length > 0) {
      await s.meta.writeL2(l2off, table, idx0, idx0 + n);
      for (const e of olds) await release(s, e);
    }
    p = sliceEnd;
  }
}

async function zeroFill(s: Qcow2State, p: number, end: number): Promise<void> {
  for (let q = p; q < end; q += CHUNK) await writeLocked(s, q, new Uint8Array(Math.min(CHUNK, end - q)));
}

/**
 * Unallocate every cluster of the active L1 (what qemu-img commit does to the top afterwards):
 * reads then fall through to the backing file. Internal snapshots keep their clusters. Caller
 * holds the exclusive lock.
 */
export async function makeEmptyLocked(s: Qcow2State): Promise<void> {
  for (let l1i = 0; l1i < s.l1Size; l1i++) {
    if (l2OffsetAt(s, l1i) === 0) continue;
    const { offset: l2off, table } = await l2ForWrite(s, l1i);
    const olds: L2Entry[] = [];
    for (let i = 0; i < s.l2Entries; i++) {
      const [hi, lo] = readEntry(table, i);
      if (hi === 0 && lo === 0) continue;
      olds.push(decodeL2(hi, lo, s.h.clusterBits));
      writeEntry(table, i, 0, 0);
    }
    if (olds.length > 0) {
      await s.meta.writeL2(l2off, table, 0, s.l2Entries);
      await releaseAll(s, olds);
    }
  }
}

/** Reject ranges a whole-cluster operation cannot take. */
export function assertWholeClusters(s: Qcow2State, offset: number, length: number, what: string): void {
  if (offset % s.cs !== 0 || (length % s.cs !== 0 && offset + length !== s.h.size)) {
    throw new InvalidArgument(`${s.path}: ${what} needs whole clusters`, { ref: s.path });
  }
}
