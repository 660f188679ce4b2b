import { Corrupt } from '../../../core/index.js';
import { getU64, setU64, view } from '../format/bytes.js';
import { AUTOCLEAR_BITMAPS, EXT_BITMAPS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, MAX_L1_BYTES } from '../format/constants.js';
import { COPIED_HI, decodeL1, decodeL2, readEntry, writeEntry } from '../format/entries.js';
import { entriesPerBlock, reftableEntry, setRefcount } from '../format/refcount-block.js';
import { snapshotTableSize } from '../format/snapshot-table.js';
import type { Qcow2State } from './qcow2-state.js';
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
  /** Every index worth comparing: the file's clusters, then references past its end, in order. */
  *indices(): Generator<number> {
    for (let i = 0; i < this.n; i++) yield i;
    for (const k of [...this.big.keys()].filter((x) => x >= this.n).sort((a, b) => a - b)) yield k;
  }
}

interface State {
  img: Qcow2State;
  res: CheckResult;
  refs: RefArray;
  /** Set when the refcount structure itself is broken and must be rebuilt. */
  rebuild: boolean;
  nextContiguous: number;
}

const hex = (n: number) => n.toString(16);

function newResult(img: Qcow2State): CheckResult {
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
export async function checkImage(img: Qcow2State, opts: CheckOptions): Promise<CheckResult> {
  const first = await checkOnce(img, opts.repair);
  if (first.error === undefined && opts.repair && (first.corruptionsFixed > 0 || first.leaksFixed > 0 || first.rebuilt)) {
    const again = await checkOnce(img, undefined);
    again.corruptionsFixed = first.corruptionsFixed;
    again.leaksFixed = first.leaksFixed;
    again.rebuilt = first.rebuilt;
    again.messages = [...first.messages, ...again.messages];
    return again;
  }
  return first;
}

async function checkOnce(img: Qcow2State, repair: 'leaks' | 'all' | undefined): Promise<CheckResult> {
  const fixLeaks = repair !== undefined;
  const fixErrors = repair === 'all';
  const res = newResult(img);
  const fileClusters = Math.ceil((await img.file.size()) / img.cs);
  const st: State = { img, res, refs: new RefArray(fileClusters), rebuild: false, nextContiguous: 0 };
  await calculate(st, true);
  // As QEMU: compare once without fixing; then either rebuild, or compare again fixing.
  const pre = { ...res, messages: [...res.messages] };
  let highest = { v: -1 };
  await compare(st, false, false, highest, true);

  if (st.rebuild && fixErrors) {
    const old = { corruptions: res.corruptions, leaks: res.leaks };
    res.messages.push('Rebuilding refcount structure');
    await rebuildRefcounts(st);
    res.rebuilt = true;
    res.corruptions = 0;
    res.leaks = 0;
    const st2: State = { img, res, refs: new RefArray(Math.ceil((await img.file.size()) / img.cs)), rebuild: false, nextContiguous: 0 };
    res.allocatedClusters = 0;
    res.fragmentedClusters = 0;
    res.compressedClusters = 0;
    await calculate(st2, true);
    // Leaks the rebuild itself left are fixed here and not reported (QEMU does the same).
    const scratch: State = { ...st2, res: newResult(img) };
    highest = { v: -1 };
    await compare(scratch, true, false, highest, true);
    res.messages.push(...scratch.res.messages);
    if (scratch.rebuild) res.messages.push('ERROR rebuilt refcount structure is still broken');
    if (res.corruptions < old.corruptions) res.corruptionsFixed += old.corruptions - res.corruptions;
    if (res.leaks < old.leaks) res.leaksFixed += old.leaks - res.leaks;
    res.leaks += scratch.res.leaks;
  } else if (repair) {
    if (st.rebuild) {
      res.messages.push('ERROR need to rebuild refcount structures');
      res.checkErrors++;
      res.error = 'the refcount structure must be rebuilt (repair with -r all)';
      return res;
    }
    if (res.leaks || res.corruptions) {
      Object.assign(res, pre);
      highest = { v: -1 };
      await compare(st, fixLeaks, fixErrors, highest, true);
    }
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
  await countBitmaps(st);
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

/**
 * Persistent dirty bitmaps are counted only while the autoclear bit says they are consistent
 * (QEMU ignores the extension otherwise): directory, each bitmap table, each data cluster.
 */
async function countBitmaps(st: State): Promise<void> {
  const { img } = st;
  if (!(img.h.autoclearFeatures & AUTOCLEAR_BITMAPS)) return;
  const ext = img.h.extensions.find((e) => e.type === EXT_BITMAPS);
  if (!ext || ext.data.length < 24) return;
  const dv = view(ext.data);
  const nb = dv.getUint32(0);
  const dirSize = getU64(dv, 8);
  const dirOffset = getU64(dv, 16);
  if (dirSize > 64 << 20 || dirOffset + dirSize > st.refs.n * img.cs) {
    st.res.messages.push('ERROR bitmap directory lies outside the image');
    st.res.corruptions++;
    return;
  }
  incRange(st, dirOffset, dirSize);
  const dir = await img.file.read(dirOffset, dirSize);
  const dd = view(dir);
  let off = 0;
  for (let i = 0; i < nb && off + 24 <= dir.length; i++) {
    const tableOffset = getU64(dd, off);
    const tableSize = dd.getUint32(off + 8);
    const nameSize = dd.getUint16(off + 18);
    const extra = dd.getUint32(off + 20);
    incRange(st, tableOffset, tableSize * 8);
    if (tableSize * 8 <= 64 << 20 && tableOffset + tableSize * 8 <= st.refs.n * img.cs) {
      const table = await img.file.read(tableOffset, tableSize * 8);
      for (let j = 0; j < tableSize; j++) {
        const [hi, lo] = readEntry(table, j);
        const data = (hi & 0x00ff_ffff) * 0x1_0000_0000 + ((lo & 0xffff_fe00) >>> 0);
        if (data !== 0) incRange(st, data, img.cs);
      }
    }
    off += Math.ceil((24 + extra + nameSize) / 8) * 8;
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
  // QEMU's next_contiguous_offset is local to each L2 table.
  st.nextContiguous = 0;
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
  for (const i of refs.indices()) {
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
        await img.meta.setL1(i, e.l2Offset, rc === 1);
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
      img.meta.forget(e.l2Offset);
      res.corruptions -= dirty;
      res.corruptionsFixed += dirty;
    }
  }
}

/**
 * Rebuild the refcount structure from the computed references, as QEMU's
 * rebuild_refcount_structure places it: each needed refcount block, then the table, in the
 * lowest free clusters of the in-memory counts (the old structure stays counted there, so it
 * is left as leaks that the caller fixes). Blocks are written before the header points at them.
 */
async function rebuildRefcounts(st: State): Promise<void> {
  const { img, refs } = st;
  const cs = img.cs;
  const order = img.h.refcountOrder;
  const epb = entriesPerBlock(cs, order);
  if (refs.size > refs.n) {
    throw new Corrupt(`${img.path}: clusters are referenced past the end of the file; the refcounts cannot be rebuilt`, {
      ref: img.path, hint: 'the mapping tables are damaged beyond repair; recover the data with `convert`',
    });
  }
  let firstFree = 0;
  const alloc = (n: number): number => {
    let run = 0;
    let c = firstFree;
    let gapSeen = false;
    for (; run < n; c++) {
      if (refs.get(c) === 0) {
        if (!gapSeen) { firstFree = c; gapSeen = true; }
        run++;
      } else {
        run = 0;
      }
    }
    const start = c - n;
    for (let k = start; k < c; k++) refs.inc(k);
    return start;
  };
  const blocks = new Map<number, number>();
  const hasRefs = (bi: number): boolean => {
    for (let k = bi * epb; k < (bi + 1) * epb && k < refs.size; k++) if (refs.get(k) !== 0) return true;
    return false;
  };
  const placeBlocks = () => {
    for (let changed = true; changed;) {
      changed = false;
      const nb = Math.ceil(refs.size / epb);
      for (let bi = 0; bi < nb; bi++) {
        if (!blocks.has(bi) && hasRefs(bi)) {
          blocks.set(bi, alloc(1));
          changed = true;
        }
      }
    }
  };
  placeBlocks();
  let tableClusters = 0;
  let tableStart = 0;
  for (;;) {
    const entries = Math.max(...blocks.keys()) + 1;
    const need = Math.ceil((entries * 8) / cs);
    if (need <= tableClusters) break;
    tableClusters = need;
    tableStart = alloc(need);
    placeBlocks();
  }
  const table = new Uint8Array(tableClusters * cs);
  for (const [bi, c] of [...blocks].sort((x, y) => x[0] - y[0])) {
    const block = new Uint8Array(cs);
    for (let k = 0; k < epb; k++) {
      const v = refs.get(bi * epb + k);
      if (v) setRefcount(block, k, order, Math.min(v, img.refcounts.max));
    }
    await img.file.write(c * cs, block);
    img.fileLen = Math.max(img.fileLen, (c + 1) * cs);
    setU64(view(table), bi * 8, c * cs);
  }
  await img.file.write(tableStart * cs, table);
  img.fileLen = Math.max(img.fileLen, (tableStart + tableClusters) * cs);
  await img.file.sync();
  const hb = new Uint8Array(12);
  setU64(view(hb), 0, tableStart * cs);
  view(hb).setUint32(8, tableClusters);
  await img.file.write(48, hb);
  img.h.refcountTableOffset = tableStart * cs;
  img.h.refcountTableClusters = tableClusters;
  img.refcounts.reset(table, tableStart * cs, Math.ceil(img.fileLen / cs));
}
