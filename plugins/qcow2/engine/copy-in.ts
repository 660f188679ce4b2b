/**
 * The qcow2 side of the native copy (for `convert` into a new image): fill unallocated clusters
 * straight from another file in the native helper, then point the L2 tables at what it wrote.
 */
import { InvalidArgument } from '../../../core/index.js';
import { COPIED_HI } from '../format/entries.js';
import { l2ForWrite, runs } from './cluster-map.js';
import { assertWholeClusters } from './cluster-write.js';
import type { ImageFile } from './file.js';
import type { Qcow2State } from './qcow2-state.js';

/**
 * Fill unallocated clusters from `src` with the native copy (ImageFile.copyIn): `ops` are
 * [srcPos, guest, length] triples over whole clusters (a length may end at the virtual size
 * instead). Clusters that read as all zero stay unallocated; the others get new space in order,
 * from the end of the allocated area. Every cluster must be unallocated (InvalidArgument if not).
 * `until`: see ImageFile.copyIn.
 */
export async function copyFromFile(s: Qcow2State, src: ImageFile, ops: Float64Array, until?: Float64Array): Promise<void> {
  s.assertWritable();
  const cs = s.cs;
  for (let i = 0; i < ops.length; i += 3) {
    s.checkRange(ops[i + 1]!, ops[i + 2]!);
    assertWholeClusters(s, ops[i + 1]!, ops[i + 2]!, 'copyFromFile');
  }
  if (ops.length === 0) return;
  await s.lock.exclusive(async () => {
    await refuseAllocated(s, ops);
    // Past everything allocated: the native side hands these out in order, and nothing else
    // allocates while the exclusive lock is held. Only what it used is then claimed.
    const host = Math.ceil(Math.max(s.fileLen, s.refcounts.highWater * cs) / cs) * cs;
    // The helper writes each cluster's L2 entry (COPIED: refcount 1) into `entries`, in op
    // order; each op's run of them is then copied into its L2 table(s) at once. Clusters left
    // out (all zero) get entry 0: they were unallocated (refuseAllocated), and stay so.
    let clusters = 0;
    for (let i = 2; i < ops.length; i += 3) clusters += Math.ceil(ops[i]! / cs);
    const entries = new Uint8Array(clusters * 8);
    // Past `until` (a job's lease) it writes no more and throws: nothing it wrote is claimed (the
    // runner that holds the job now may be allocating the same space).
    const pairs = await s.file.copyIn(src, ops, { block: cs, alloc: host, entries, entryHigh: COPIED_HI, ...(until ? { until } : {}) });
    const used = pairs.length / 2;
    if (used > 0) await s.refcounts.claim(host, used);
    s.fileLen = Math.max(s.fileLen, host + used * cs);
    const l2e = s.l2Entries;
    // The L2 table being filled; awaited only when the ops move on to another (an await per
    // op was ~3 ms of a 512 MiB convert).
    let cur: { l1i: number; offset: number; table: Uint8Array; lo: number; hi: number } | undefined;
    let e = 0; // the next op's first entry
    for (let i = 0; i < ops.length; i += 3) {
      let gc = ops[i + 1]! / cs;
      const end = gc + Math.ceil(ops[i + 2]! / cs);
      while (gc < end) {
        const l1i = Math.floor(gc / l2e);
        const idx = gc - l1i * l2e;
        const n = Math.min(end - gc, l2e - idx);
        if (cur?.l1i !== l1i) {
          if (cur) await s.meta.writeL2(cur.offset, cur.table, cur.lo, cur.hi);
          cur = { l1i, ...(await l2ForWrite(s, l1i)), lo: idx, hi: idx + n };
        }
        cur.table.set(entries.subarray(e * 8, (e + n) * 8), idx * 8);
        cur.lo = Math.min(cur.lo, idx);
        cur.hi = Math.max(cur.hi, idx + n);
        e += n;
        gc += n;
      }
    }
    if (cur) await s.meta.writeL2(cur.offset, cur.table, cur.lo, cur.hi);
    await s.meta.flushIfFull();
  });
}

/**
 * copyFromFile only fills clusters that nothing is allocated in. Ops come in guest order (as
 * convert makes them): one lookup over their whole span, swept against the ops, instead of one
 * per op. Any other order is looked up op by op.
 */
async function refuseAllocated(s: Qcow2State, ops: Float64Array): Promise<void> {
  const refuse = (at: number) => new InvalidArgument(`${s.path}: copyFromFile into allocated clusters at ${at}`, { ref: s.path });
  let sorted = true;
  for (let i = 3; i < ops.length && sorted; i += 3) sorted = ops[i + 1]! >= ops[i - 2]! + ops[i - 1]!;
  if (!sorted) {
    for (let i = 0; i < ops.length; i += 3) {
      for (const r of await runs(s, ops[i + 1]!, ops[i + 2]!)) if (r.entry.kind !== 'unallocated') throw refuse(r.start);
    }
    return;
  }
  const first = ops[1]!;
  const rs = await runs(s, first, ops[ops.length - 2]! + ops[ops.length - 1]! - first);
  let i = 0;
  for (const r of rs) {
    if (r.entry.kind === 'unallocated') continue;
    // The first op that ends after the run starts: it overlaps the run if it starts before its end.
    while (i < ops.length && ops[i + 1]! + ops[i + 2]! <= r.start) i += 3;
    if (i < ops.length && ops[i + 1]! < r.start + r.length) throw refuse(Math.max(r.start, ops[i + 1]!));
  }
}
