import { setU64, view } from '../format/bytes.js';
import { INCOMPAT_CORRUPT, INCOMPAT_DIRTY, MAX_L1_BYTES } from '../format/constants.js';
import { COPIED_HI, decodeL1, decodeL2, readEntry, writeEntry } from '../format/entries.js';
import { entriesPerBlock, reftableEntry, setRefcount } from '../format/refcount-block.js';
import { snapshotTableSize } from '../format/snapshot-table.js';
import type { Qcow2Image } from './qcow2-image.js';
import type { CheckOptions, CheckResult } from './types.js';

/**
 * Computed reference counts, one per host cluster of the file; references past the end of the
 * file (damage) go to a sparse map so memory follows the real file, not untrusted fields.
 */
class RefArray {
  private readonly small: Uint16Array;
  private readonly big = new Map<number, number>();
  constructor(readonly n: number) { this.small = new Uint16Array(n); }
  get(i: number): number {
    const v = this.big.get(i);
    return v ?? (i < this.n ? this.small[i]! : 0);
  }
  inc(i: number): void {
    const v = this.get(i) + 1;
    if (i < this.n && v <= 0xffff) this.small[i] = v; else this.big.set(i, v);
  }
  /** One past the highest index with a reference. */
  get size(): number {
    let m = this.n;
    for (const k of this.big.keys()) m = Math.max(m, k + 1);
    return m;
  }
}

interface State {
  img: Qcow2Image;
  res: CheckResult;
  refs: RefArray;
  /** Set when the refcount structure itself is broken and must be rebuilt. */
  rebuild: boolean;
  nextContiguous: number;
}

const hex = (n: number) => n.toString(16);

function newResult(img: Qcow2Image): CheckResult {
  return {
    checkErrors: 0, corruptions: 0, leaks: 0, corruptionsFixed: 0, leaksFixed: 0, imageEndOffset: 0,
    totalClusters: Math.ceil(img.h.size / img.cs), allocatedClusters: 0, fragmentedClusters: 0,
    compressedClusters: 0, messages: [], rebuilt: false,
  };
}

/**
 * `qemu-img check` for one image: the same walk, counters and messages as QEMU's
 * qcow2_check_refcounts (refcounts computed from every reference, compared with the stored
 * ones, then OFLAG_COPIED). With `repair`, fixes what qemu-img fixes; if anything was fixed the
 * counts of a fresh check are returned with the fixed counters kept, as qemu-img reports them.
 */
export async function checkImage(img: Qcow2Image, opts: CheckOptions): Promise<CheckResult> {
  const first = await checkOnce(img, opts.repair);
  if (opts.repair && (first.corruptionsFixed > 0 || first.leaksFixed > 0 || first.rebuilt)) {
    const again = await checkOnce(img, undefined);
    again.corruptionsFixed = first.corruptionsFixed;
    again.leaksFixed = first.leaksFixed;
    again.rebuilt = first.rebuilt;
    again.messages = [...first.messages, ...again.messages];
    return again;
  }
  return first;
}

async function checkOnce(img: Qcow2Image, repair: 'leaks' | 'all' | undefined): Promise<CheckResult> {
  const fixLeaks = repair !== undefined;
  const fixErrors = repair === 'all';
  const res = newResult(img);
  const fileClusters = Math.ceil((await img.file.size()) / img.cs);
  const st: State = { img, res, refs: new RefArray(fileClusters), rebuild: false, nextContiguous: 0 };
  await calculate(st, true);
  let highest = { v: -1 };
  await compare(st, fixLeaks, fixErrors, highest, true);

  if (st.rebuild && fixErrors) {
    res.messages.push('Rebuilding refcount structure');
    await rebuildRefcounts(st);
    res.rebuilt = true;
    res.corruptions = 0;
    res.leaks = 0;
    const st2: State = { img, res: newResult(img), refs: new RefArray(Math.ceil((await img.file.size()) / img.cs)), rebuild: false, nextContiguous: 0 };
    await calculate(st2, true);
    highest = { v: -1 };
    await compare(st2, true, false, highest, false);
    res.messages.push(...st2.res.messages);
    res.corruptionsFixed += 1;
  } else if (st.rebuild) {
    // Without -r all we can only report it (qemu-img does the same).
  }

  await checkCopied(st, fixErrors);
  res.imageEndOffset = (highest.v + 1) * img.cs;

  if (repair && res.checkErrors === 0 && res.corruptions === 0) {
    const h = img.h;
    if (h.incompatibleFeatures & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT)) {
      h.incompatibleFeatures &= ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
      await img.writeHeader();
    }
  }
  if (!img.readOnly) await img.file.sync();
  return res;
}

function incRange(st: State, offset: number, bytes: number): void {
  if (bytes <= 0) return;
  const cs = st.img.cs;
  const c0 = Math.floor(offset / cs);
  const c1 = Math.floor((offset + bytes - 1) / cs);
  for (let c = c0; c <= c1; c++) st.refs.inc(c);
}

async function calculate(st: State, withActiveFrag: boolean): Promise<void> {
  const { img, res } = st;
  const h = img.h;
  incRange(st, 0, img.cs);
  await checkL1(st, h.l1TableOffset, img.l1Size, withActiveFrag, img.l1);
  for (const sn of img.snapshotTable) {
    if (sn.l1TableOffset % img.cs !== 0) {
      res.messages.push(`ERROR snapshot ${sn.id} (${sn.name}) l1_offset=${hex(sn.l1TableOffset)}: L1 table is not cluster aligned; snapshot table entry corrupted`);
      res.corruptions++;
      continue;
    }
    if (sn.l1Size * 8 > MAX_L1_BYTES) {
      res.messages.push(`ERROR snapshot ${sn.id} (${sn.name}) l1_size=${hex(sn.l1Size)}: L1 table is too large; snapshot table entry corrupted`);
      res.corruptions++;
      continue;
    }
    await checkL1(st, sn.l1TableOffset, sn.l1Size, false, undefined);
  }
  if (h.nbSnapshots > 0) incRange(st, h.snapshotsOffset, snapshotTableSize(img.snapshotTable));
  const rt = img.refcounts;
  incRange(st, rt.tableOffset, rt.table.length);
  // Refcount blocks last, so their own computed count is final when compared.
  for (let i = 0; i < rt.tableEntries; i++) {
    const off = reftableEntry(rt.table, i);
    if (off === 0) continue;
    if (off % img.cs !== 0) {
      res.messages.push(`ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
      res.corruptions++;
      st.rebuild = true;
      continue;
    }
    const c = off / img.cs;
    if (c >= st.refs.n) {
      res.messages.push(`ERROR refcount block ${i} is outside image`);
      res.corruptions++;
      st.rebuild = true;
      continue;
    }
    st.refs.inc(c);
    if (st.refs.get(c) !== 1) {
      res.messages.push(`ERROR refcount block ${i} refcount=${st.refs.get(c)}`);
      res.corruptions++;
      st.rebuild = true;
    }
  }
}

async function checkL1(st: State, l1Offset: number, l1Size: number, active: boolean, table: Uint8Array | undefined): Promise<void> {
  const { img, res } = st;
  if (l1Size === 0) return;
  incRange(st, l1Offset, l1Size * 8);
  let l1 = table;
  if (!l1) {
    l1 = await img.file.read(l1Offset, l1Size * 8);
  }
  for (let i = 0; i < l1Size; i++) {
    const e = decodeL1(...readEntry(l1, i));
    if (e.l2Offset === 0) continue;
    incRange(st, e.l2Offset, img.cs);
    if (e.l2Offset % img.cs !== 0) {
      res.messages.push(`ERROR l2_offset=${hex(e.l2Offset)}: Table is not cluster aligned; L1 entry corrupted`);
      res.corruptions++;
    }
    const l2 = await img.file.read(e.l2Offset, img.cs);
    checkL2(st, l2, active);
  }
}

function checkL2(st: State, l2: Uint8Array, active: boolean): void {
  const { img, res } = st;
  for (let j = 0; j < img.l2Entries; j++) {
    const [hi, lo] = readEntry(l2, j);
    if (hi === 0 && lo === 0) continue;
    const e = decodeL2(hi, lo, img.h.clusterBits);
    if (e.kind === 'compressed') {
      if (e.copied) {
        res.messages.push(`ERROR: coffset=${hex(e.compressedOffset!)}: copied flag must never be set for compressed clusters`);
        res.corruptions++;
      }
      const start = e.compressedOffset! - (e.compressedOffset! % 512);
      incRange(st, start, e.compressedBytes! + (e.compressedOffset! % 512));
      if (active) {
        res.allocatedClusters++;
        res.compressedClusters++;
        res.fragmentedClusters++;
      }
    } else if ((e.kind === 'normal' || e.kind === 'zero') && e.offset !== 0) {
      if (e.offset % img.cs !== 0) {
        res.messages.push(`ERROR offset=${hex(e.offset)}: Cluster is not properly aligned; L2 entry corrupted.`);
        res.corruptions++;
      }
      if (active) {
        res.allocatedClusters++;
        if (st.nextContiguous !== 0 && e.offset !== st.nextContiguous) res.fragmentedClusters++;
        st.nextContiguous = e.offset + img.cs;
      }
      incRange(st, e.offset, img.cs);
    }
  }
}

async function compare(st: State, fixLeaks: boolean, fixErrors: boolean, highest: { v: number }, markRebuild: boolean): Promise<void> {
  const { img, res, refs } = st;
  const n = Math.max(refs.size, 0);
  for (let i = 0; i < n; i++) {
    let stored: number;
    try {
      stored = await img.refcounts.get(i);
    } catch (e) {
      res.messages.push(`Can't get refcount for cluster ${i}: ${(e as Error).message}`);
      res.checkErrors++;
      continue;
    }
    const computed = refs.get(i);
    if (stored > 0 || computed > 0) highest.v = i;
    if (stored === computed) continue;
    let fixed: 'leaks' | 'corruptions' | undefined;
    if (stored === 0) {
      if (markRebuild) st.rebuild = true;
    } else if (stored > computed && fixLeaks) fixed = 'leaks';
    else if (stored < computed && fixErrors) fixed = 'corruptions';
    const word = fixed ? 'Repairing' : stored < computed ? 'ERROR' : 'Leaked';
    res.messages.push(`${word} cluster ${i} refcount=${stored} reference=${computed}`);
    if (fixed) {
      try {
        await img.refcounts.update(i, 1, computed - stored);
        if (fixed === 'leaks') res.leaksFixed++; else res.corruptionsFixed++;
        continue;
      } catch {
        // fall through: count it as unfixed
      }
    }
    if (stored < computed) res.corruptions++; else res.leaks++;
  }
}

async function checkCopied(st: State, fix: boolean): Promise<void> {
  const { img, res } = st;
  for (let i = 0; i < img.l1Size; i++) {
    const [hi, lo] = readEntry(img.l1, i);
    const e = decodeL1(hi, lo);
    if (e.l2Offset === 0) continue;
    let rc: number;
    try { rc = await img.refcounts.get(Math.floor(e.l2Offset / img.cs)); } catch { continue; }
    const l1entry = (BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0);
    if ((rc === 1) !== e.copied) {
      res.corruptions++;
      res.messages.push(`${fix ? 'Repairing' : 'ERROR'} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${l1entry.toString(16)} refcount=${rc}`);
      if (fix) {
        await img.setL1(i, e.l2Offset, rc === 1);
        res.corruptions--;
        res.corruptionsFixed++;
      }
    }
    const l2 = await img.file.read(e.l2Offset, img.cs);
    let dirty = 0;
    for (let j = 0; j < img.l2Entries; j++) {
      const [h2, l2lo] = readEntry(l2, j);
      const d = decodeL2(h2, l2lo, img.h.clusterBits);
      if (!((d.kind === 'normal' || d.kind === 'zero') && d.offset !== 0)) continue;
      let drc: number;
      try { drc = await img.refcounts.get(Math.floor(d.offset / img.cs)); } catch { continue; }
      if ((drc === 1) !== d.copied) {
        res.corruptions++;
        const entry = (BigInt(h2 >>> 0) << 32n) | BigInt(l2lo >>> 0);
        res.messages.push(`${fix ? 'Repairing' : 'ERROR'} OFLAG_COPIED data cluster: l2_entry=${entry.toString(16)} refcount=${drc}`);
        if (fix) {
          writeEntry(l2, j, drc === 1 ? (h2 | COPIED_HI) >>> 0 : (h2 & ~COPIED_HI) >>> 0, l2lo);
          dirty++;
        }
      }
    }
    if (dirty > 0) {
      await img.file.write(e.l2Offset, l2);
      img.l2cache.delete(e.l2Offset);
      res.corruptions -= dirty;
      res.corruptionsFixed += dirty;
    }
  }
}

/**
 * Write a whole new refcount structure from the computed references (minus the old refcount
 * structure) past the end of everything in use, then point the header at it.
 */
async function rebuildRefcounts(st: State): Promise<void> {
  const { img } = st;
  const cs = img.cs;
  const order = img.h.refcountOrder;
  const epb = entriesPerBlock(cs, order);
  const fresh: State = { img, res: newResult(img), refs: new RefArray(st.refs.n), rebuild: false, nextContiguous: 0 };
  // References without the old refcount table and blocks.
  incRange(fresh, 0, cs);
  await checkL1(fresh, img.h.l1TableOffset, img.l1Size, false, img.l1);
  for (const sn of img.snapshotTable) {
    if (sn.l1TableOffset % cs === 0 && sn.l1Size * 8 <= MAX_L1_BYTES) await checkL1(fresh, sn.l1TableOffset, sn.l1Size, false, undefined);
  }
  if (img.h.nbSnapshots > 0) incRange(fresh, img.h.snapshotsOffset, snapshotTableSize(img.snapshotTable));
  const used = fresh.refs.size;
  const start = Math.max(used, Math.ceil(img.fileLen / cs));
  let nb = 1;
  let t = 1;
  for (;;) {
    const total = start + nb + t;
    const nb2 = Math.ceil(total / epb);
    const t2 = Math.ceil((nb2 * 8) / cs);
    if (nb2 === nb && t2 === t) break;
    nb = nb2;
    t = t2;
  }
  const table = new Uint8Array(t * cs);
  for (let b = 0; b < nb; b++) {
    const block = new Uint8Array(cs);
    for (let k = 0; k < epb; k++) {
      const c = b * epb + k;
      const v = c < start ? fresh.refs.get(c) : c < start + nb + t ? 1 : 0;
      if (v) setRefcount(block, k, order, Math.min(v, img.refcounts.max));
    }
    await img.file.write((start + b) * cs, block);
    setU64(view(table), b * 8, (start + b) * cs);
  }
  await img.file.write((start + nb) * cs, table);
  img.fileLen = Math.max(img.fileLen, (start + nb + t) * cs);
  await img.file.sync();
  const hb = new Uint8Array(12);
  setU64(view(hb), 0, (start + nb) * cs);
  view(hb).setUint32(8, t);
  await img.file.write(48, hb);
  img.h.refcountTableOffset = (start + nb) * cs;
  img.h.refcountTableClusters = t;
  img.refcounts.reset(table, (start + nb) * cs, start + nb + t);
}
