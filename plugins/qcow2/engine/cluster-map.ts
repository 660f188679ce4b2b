/**
 * The guest-to-host cluster map of a qcow2 image: lookups over the L1 and L2 tables, the L2 table
 * a write may change, and dropping the references of entries that no longer point somewhere.
 */
import { Corrupt } from '../../../core/index.js';
import { decodeL1, decodeL2, entryWords, readEntry, type L2Entry } from '../format/entries.js';
import type { Qcow2State } from './qcow2-state.js';
import type { Allocation } from './types.js';

/** A run of guest clusters with the same kind of mapping (and contiguous host offsets). */
export interface Run {
  start: number;
  length: number;
  entry: L2Entry;
}

/** L2 tables read at once by a lookup over a large range (prefetchL2). */
const PREFETCH_L2_BYTES = 1 << 20;

const UNALLOCATED: L2Entry = { kind: 'unallocated', offset: 0, copied: false, reserved: false };

/** The L2 table offset L1 entry l1i points at (0: none). */
export function l2OffsetAt(s: Qcow2State, l1i: number): number {
  return l1i < s.l1Size ? decodeL1(...readEntry(s.l1, l1i)).l2Offset : 0;
}

export async function lookup(s: Qcow2State, gc: number): Promise<L2Entry> {
  const l2Offset = l2OffsetAt(s, Math.floor(gc / s.l2Entries));
  if (l2Offset === 0) return UNALLOCATED;
  const t = await s.meta.l2Table(l2Offset);
  return decodeL2(...readEntry(t, gc % s.l2Entries), s.h.clusterBits);
}

/**
 * Split [offset, offset+length) into runs of one mapping kind (host-contiguous for data).
 * Walks each L2 table in a plain loop: only a table that is not cached costs an await.
 */
export async function runs(s: Qcow2State, offset: number, length: number): Promise<Run[]> {
  const out: Run[] = [];
  const cs = s.cs;
  const l2e = s.l2Entries;
  const end = offset + length;
  let cur: Run | undefined;
  const add = (start: number, len: number, e: L2Entry) => {
    const contiguous = cur && cur.entry.kind === e.kind && e.kind !== 'compressed' &&
      cur.entry.copied === e.copied &&
      (e.kind !== 'normal' || cur.entry.offset + (start - cur.start) + (cur.start % cs) === e.offset);
    if (cur && contiguous) {
      cur.length += len;
    } else {
      cur = { start, length: len, entry: e };
      out.push(cur);
    }
  };
  let p = offset;
  while (p < end) {
    const l1i = Math.floor(p / cs / l2e);
    const sliceEnd = Math.min(end, (l1i + 1) * l2e * cs);
    const l2Offset = l2OffsetAt(s, l1i);
    if (l2Offset === 0) {
      // No L2 table: the whole range it would cover is unallocated (one step, not per cluster).
      add(p, sliceEnd - p, UNALLOCATED);
      p = sliceEnd;
      continue;
    }
    if (!s.meta.has(l2Offset)) await prefetchL2(s, l1i, end);
    const table = await s.meta.l2Table(l2Offset);
    // The table's entries for this slice as [lo, hi] words. The loop runs once per cluster,
    // usually before the JIT has warmed up (a short-lived CLI), so an entry that continues
    // the current run costs only a compare against the raw entry that would continue it
    // (nextHi/nextLo, -1: none can): a run's length is settled when it ends, not per cluster.
    const base = l1i * l2e * cs;
    const i0 = Math.floor(p / cs) - l1i * l2e;
    const words = entryWords(table, i0, Math.ceil(sliceEnd / cs) - l1i * l2e);
    const n = words.length / 2;
    let nextHi = -1;
    let nextLo = -1;
    let step = 0;
    for (let j = 0; j < n; j++) {
      const lo = words[2 * j]!;
      const hi = words[2 * j + 1]!;
      if (lo === nextLo && hi === nextHi) {
        nextLo += step;
        if (nextLo >= 0x1_0000_0000) { // the offset carries into the high word
          nextLo -= 0x1_0000_0000;
          nextHi += 1;
        }
        continue;
      }
      const pos = j === 0 ? p : base + (i0 + j) * cs;
      if (cur) cur.length = pos - cur.start; // everything up to here continued it
      const e = decodeL2(hi, lo, s.h.clusterBits);
      if (s.h.version === 2 && e.kind === 'zero') {
        throw new Corrupt(`${s.path}: zero flag set in a version 2 image (cluster ${Math.floor(pos / cs)})`, { ref: s.path });
      }
      add(pos, Math.min(sliceEnd, base + (i0 + j + 1) * cs) - pos, e);
      nextHi = e.kind === 'compressed' ? -1 : hi;
      step = e.kind === 'normal' ? cs : 0;
      nextLo = lo + step;
      if (nextLo >= 0x1_0000_0000) {
        nextLo -= 0x1_0000_0000;
        nextHi += 1;
      }
    }
    cur!.length = sliceEnd - cur!.start;
    p = sliceEnd;
  }
  return out;
}

/**
 * Read the L2 tables for L1 entries l1i… (up to the guest offset `end`) that are not cached,
 * PREFETCH_L2_BYTES of them at once: a lookup over a large range (map, convert) then waits
 * for one round of reads instead of one read per table, which matters most when the file's
 * pages have left the page cache.
 */
async function prefetchL2(s: Qcow2State, l1i: number, end: number): Promise<void> {
  const last = Math.min(s.l1Size, Math.ceil(end / (s.cs * s.l2Entries)), l1i + Math.max(1, PREFETCH_L2_BYTES / s.cs));
  const wanted: number[] = [];
  for (let i = l1i; i < last; i++) {
    const off = l2OffsetAt(s, i);
    if (off !== 0 && !s.meta.has(off)) wanted.push(off);
  }
  await Promise.all(wanted.map((off) => s.meta.l2Table(off)));
}

/** Host offset of guest byte `p` inside a normal run. */
export function hostOf(s: Qcow2State, run: Run, p: number): number {
  return run.entry.offset + (p - run.start) + (run.start % s.cs);
}

/**
 * The image's own allocations in [start, end): data and zero clusters, merged by kind, from the
 * same run walk as every lookup (an entry that continues a run costs one compare). Caller holds
 * the lock (shared is enough).
 */
export async function ownAllocations(s: Qcow2State, start: number, end: number): Promise<Allocation[]> {
  const out: Allocation[] = [];
  for (const r of await runs(s, start, end - start)) {
    if (r.entry.kind === 'unallocated') continue;
    const zero = r.entry.kind === 'zero';
    const last = out[out.length - 1];
    if (last && last.zero === zero && last.start + last.length === r.start) last.length += r.length;
    else out.push({ start: r.start, length: r.length, zero });
  }
  return out;
}

/** An L2 table for index l1i that this image owns alone (allocated or copied as needed). */
export async function l2ForWrite(s: Qcow2State, l1i: number): Promise<{ offset: number; table: Uint8Array }> {
  if (l1i >= s.l1Size) throw new Corrupt(`${s.path}: L1 table too small for the virtual size`, { ref: s.path });
  const e = decodeL1(...readEntry(s.l1, l1i));
  if (e.l2Offset === 0) {
    const off = await s.refcounts.alloc(1);
    const t = new Uint8Array(s.cs);
    await s.meta.writeL2(off, t, 0, s.l2Entries);
    s.fileLen = Math.max(s.fileLen, off + s.cs);
    s.meta.remember(off, t);
    await s.meta.setL1(l1i, off, true);
    return { offset: off, table: t };
  }
  const t = await s.meta.l2Table(e.l2Offset);
  if (e.copied) return { offset: e.l2Offset, table: t };
  if ((await s.refcounts.get(e.l2Offset / s.cs)) === 1) {
    await s.meta.setL1(l1i, e.l2Offset, true);
    return { offset: e.l2Offset, table: t };
  }
  const off = await s.refcounts.alloc(1);
  const copy = t.slice();
  await s.meta.writeL2(off, copy, 0, s.l2Entries);
  s.fileLen = Math.max(s.fileLen, off + s.cs);
  s.meta.remember(off, copy);
  await s.meta.setL1(l1i, off, true);
  await s.refcounts.free(e.l2Offset, 1);
  return { offset: off, table: copy };
}

/** Host clusters a compressed entry touches, as QEMU counts them. */
export function compressedClusters(s: Qcow2State, e: L2Entry): [number, number] {
  const start = e.compressedOffset! - (e.compressedOffset! % 512);
  const bytes = e.compressedBytes! + (e.compressedOffset! % 512);
  const c0 = Math.floor(start / s.cs);
  const c1 = Math.floor((start + bytes - 1) / s.cs);
  return [c0, c1 - c0 + 1];
}

/** Drop the reference an L2 entry held (after the entry no longer points there). */
export async function release(s: Qcow2State, e: L2Entry): Promise<void> {
  if ((e.kind === 'normal' || e.kind === 'zero') && e.offset !== 0) {
    await s.refcounts.free(e.offset, 1);
  } else if (e.kind === 'compressed') {
    const [c0, n] = compressedClusters(s, e);
    await s.refcounts.update(c0, n, -1);
  }
}

/** Drop the references of many entries, host-contiguous data clusters in one refcount update each. */
export async function releaseAll(s: Qcow2State, olds: L2Entry[]): Promise<void> {
  const cs = s.cs;
  let runStart = -1;
  let runLen = 0;
  const flush = async () => {
    if (runLen > 0) await s.refcounts.update(runStart / cs, runLen, -1);
    runLen = 0;
  };
  for (const e of olds) {
    if ((e.kind === 'normal' || e.kind === 'zero') && e.offset !== 0) {
      if (runLen > 0 && e.offset === runStart + runLen * cs) { runLen++; continue; }
      await flush();
      runStart = e.offset;
      runLen = 1;
    } else {
      await release(s, e);
    }
  }
  await flush();
}
