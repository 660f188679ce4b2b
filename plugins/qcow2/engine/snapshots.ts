import { AlreadyExists, Corrupt, InvalidArgument, NotFound, OutOfRange, Unsupported } from '../../../core/index.js';
import { setU64, view } from '../format/bytes.js';
import { MAX_SNAPSHOTS } from '../format/constants.js';
import { COPIED_HI, decodeL1, decodeL2, encodeL1, readEntry, writeEntry } from '../format/entries.js';
import { entriesPerBlock, setRefcount } from '../format/refcount-block.js';
import {
  encodeSnapshotTable, makeExtra, snapshotDiskSize, snapshotIcount, snapshotVmStateSize, type SnapshotEntry,
} from '../format/snapshot-table.js';
import { compressedClusters } from './cluster-map.js';
import type { Qcow2State } from './qcow2-state.js';
import type { SnapshotInfo, SnapshotOps } from './types.js';

/**
 * Internal snapshots in QEMU's format: a snapshot is a copy of the active L1, and every L2
 * table and data cluster counts one reference per L1 path that reaches it; COPIED is set
 * exactly where a refcount is 1. Unlike QEMU (which updates refcounts and COPIED flags in
 * place, leaving a window where `qemu-img check` sees corruption after a crash), create, apply
 * and delete build the new state beside the old and switch the header once (`switchState`).
 * On create, L2 tables whose data flags must change are copied for the active L1.
 */
export class SnapshotManager implements SnapshotOps {
  constructor(private readonly img: Qcow2State) {}

  async list(): Promise<SnapshotInfo[]> {
    this.img.checkOpen();
    return this.img.snapshotTable.map(toInfo);
  }

  private find(nameOrId: string): number {
    const t = this.img.snapshotTable;
    let i = t.findIndex((s) => s.id === nameOrId);
    if (i < 0) i = t.findIndex((s) => s.name === nameOrId);
    if (i < 0) throw new NotFound(`${this.img.path}: no snapshot ${JSON.stringify(nameOrId)}`, { ref: this.img.path, hint: 'list the snapshots with `snapshot -l`' });
    return i;
  }

  async create(name: string): Promise<SnapshotInfo> {
    const img = this.img;
    img.assertWritable();
    if (typeof name !== 'string' || name === '' || new TextEncoder().encode(name).length > 65535) {
      throw new InvalidArgument(`${img.path}: invalid snapshot name`, { ref: img.path });
    }
    if (img.h.refcountOrder === 0) {
      throw new Unsupported(`${img.path}: snapshots need refcounts of at least 2 bits (this image has refcount_bits=1)`, { ref: img.path });
    }
    return img.lock.exclusive(async () => {
      if (img.snapshotTable.some((s) => s.name === name)) {
        throw new AlreadyExists(`${img.path}: a snapshot named ${JSON.stringify(name)} already exists`, { ref: img.path });
      }
      if (img.snapshotTable.length >= MAX_SNAPSHOTS) throw new Unsupported(`${img.path}: too many snapshots`, { ref: img.path });
      const ids = img.snapshotTable.map((x) => Number.parseInt(x.id, 10)).filter((n) => Number.isFinite(n));
      const now = Date.now();
      const entry: SnapshotEntry = {
        l1TableOffset: 0, l1Size: img.l1Size, id: String(ids.length ? Math.max(...ids) + 1 : 1), name,
        dateSec: Math.floor(now / 1000), dateNsec: (now % 1000) * 1_000_000, vmClockNsec: 0, vmStateSize: 0,
        extra: makeExtra(0, img.h.size),
      };
      await switchState(img, img.l1.slice(), [...img.snapshotTable, entry], img.h.size, { entry, l1: img.l1.slice() });
      return toInfo(entry);
    });
  }

  async apply(nameOrId: string): Promise<void> {
    const img = this.img;
    img.assertWritable();
    await img.lock.exclusive(async () => {
      const sn = img.snapshotTable[this.find(nameOrId)]!;
      const snL1 = await img.file.readExact(sn.l1TableOffset, sn.l1Size * 8, 'snapshot L1 table');
      const size = snapshotDiskSize(sn) ?? img.h.size;
      const entries = Math.max(img.l1Size, sn.l1Size, Math.ceil(size / (img.cs * img.l2Entries)));
      const l1 = new Uint8Array(entries * 8);
      l1.set(snL1);
      const before = img.h.size;
      if (size !== before) img.bitmaps.assertResizable();
      await switchState(img, l1, img.snapshotTable, size);
      if (size !== before) img.bitmaps.resize(size);
      // The content changed wherever the two states differ: every bitmap that records says all.
      img.bitmaps.markAll();
    });
  }

  async delete(nameOrId: string): Promise<void> {
    const img = this.img;
    img.assertWritable();
    await img.lock.exclusive(async () => {
      const i = this.find(nameOrId);
      await switchState(img, img.l1.slice(), img.snapshotTable.filter((_, k) => k !== i), img.h.size);
    });
  }
}

function toInfo(s: SnapshotEntry): SnapshotInfo {
  const info: SnapshotInfo = {
    id: s.id, name: s.name, vmStateSize: snapshotVmStateSize(s), dateSec: s.dateSec, dateNsec: s.dateNsec,
    vmClockNsec: s.vmClockNsec, l1Size: s.l1Size,
  };
  const d = snapshotDiskSize(s);
  if (d !== undefined) info.diskSize = d;
  const ic = snapshotIcount(s);
  if (ic !== undefined) info.icount = ic;
  return info;
}

/**
 * Switch the image to a new active L1 and snapshot list in one header write (apply, delete).
 * Everything new — L2 copies whose COPIED flags change, the L1, the snapshot table and a
 * whole new refcount structure counting exactly the new state — is written past the end of
 * everything in use first; then bytes 24–72 of the header (size, L1, refcount table, snapshot
 * table) switch over at once. A crash before the switch leaves the old image untouched (the new
 * clusters are not even leaks); after it, the new image is exact (the old structures are
 * free). No instant shows a refcount and a COPIED flag that disagree.
 */
async function switchState(img: Qcow2State, l1: Uint8Array, snaps: SnapshotEntry[], size: number,
  pending?: { entry: SnapshotEntry; l1: Uint8Array }): Promise<void> {
  // The new state is built from the tables as they are now; deferred metadata goes first.
  await img.meta.writeThrough(() => buildAndSwitch(img, l1, snaps, size, pending));
}

async function buildAndSwitch(img: Qcow2State, l1: Uint8Array, snaps: SnapshotEntry[], size: number,
  pending?: { entry: SnapshotEntry; l1: Uint8Array }): Promise<void> {
  const cs = img.cs;
  const end = Math.max(img.refcounts.highWater, Math.ceil(img.fileLen / cs));
  const counts = new Uint32Array(end);
  const bump = (c: number, n = 1) => {
    if (c >= end) throw new Corrupt(`${img.path}: a table points past the end of the file (cluster ${c})`, { ref: img.path, hint: 'repair the image with `check -r all` first' });
    counts[c] = counts[c]! + n;
  };
  const walk = async (table: Uint8Array) => {
    for (let i = 0; i < table.length / 8; i++) {
      const e = decodeL1(...readEntry(table, i));
      if (e.l2Offset === 0) continue;
      bump(e.l2Offset / cs);
      const t = await img.meta.l2Table(e.l2Offset);
      for (let j = 0; j < img.l2Entries; j++) {
        const d = decodeL2(...readEntry(t, j), img.h.clusterBits);
        if ((d.kind === 'normal' || d.kind === 'zero') && d.offset !== 0) bump(d.offset / cs);
        else if (d.kind === 'compressed') {
          const [c0, n] = compressedClusters(img, d);
          for (let k = 0; k < n; k++) bump(c0 + k);
        }
      }
    }
  };
  await walk(l1);
  const snapL1s: [number, number][] = [];
  let next = end;
  const appended: [number, Uint8Array][] = [];
  if (pending) {
    // The new snapshot's copy of the L1 goes first in the new area.
    await walk(pending.l1);
    pending.entry.l1TableOffset = next * cs;
    if (pending.l1.length > 0) {
      appended.push([next * cs, pending.l1]);
      next += Math.ceil(pending.l1.length / cs);
    }
  }
  for (const s of snaps) {
    if (s === pending?.entry) continue;
    const t = await img.file.readExact(s.l1TableOffset, s.l1Size * 8, 'snapshot L1 table');
    await walk(t);
    snapL1s.push([s.l1TableOffset / cs, Math.ceil((s.l1Size * 8) / cs)]);
  }

  // New active L1. An L2 whose data COPIED flags are wrong for the new counts is copied for
  // the active L1 alone (the copy replaces the active's reference one for one, so no data
  // count changes); otherwise it is kept, with COPIED in the L1 iff only the active uses it.
  for (let i = 0; i < l1.length / 8; i++) {
    const e = decodeL1(...readEntry(l1, i));
    if (e.l2Offset === 0) continue;
    const T = e.l2Offset / cs;
    const t = await img.meta.l2Table(e.l2Offset);
    const fixed = t.slice();
    let changed = false;
    for (let j = 0; j < img.l2Entries; j++) {
      const [hi, lo] = readEntry(fixed, j);
      const d = decodeL2(hi, lo, img.h.clusterBits);
      if (!((d.kind === 'normal' || d.kind === 'zero') && d.offset !== 0)) continue;
      const want = counts[d.offset / cs] === 1;
      if (want !== d.copied) {
        writeEntry(fixed, j, want ? (hi | COPIED_HI) >>> 0 : (hi & ~COPIED_HI) >>> 0, lo);
        changed = true;
      }
    }
    if (changed) {
      counts[T] = counts[T]! - 1;
      appended.push([next * cs, fixed]);
      writeEntry(l1, i, ...encodeL1(next * cs, true));
      next++;
    } else {
      writeEntry(l1, i, ...encodeL1(e.l2Offset, counts[T] === 1));
    }
  }
  const l1Start = next;
  const l1Clusters = Math.ceil(l1.length / cs);
  if (l1.length > 0) appended.push([l1Start * cs, l1]);
  next += l1Clusters;
  const table = encodeSnapshotTable(snaps);
  const tableStart = next;
  if (snaps.length > 0) {
    appended.push([tableStart * cs, table]);
    next += Math.ceil(table.length / cs);
  }
  counts[0] = counts[0]! + 1;
  for (const c of await img.bitmaps.clusters()) bump(c);
  for (const [c0, n] of snapL1s) for (let k = 0; k < n; k++) bump(c0 + k);

  // A refcount structure for exactly this state, placed after it.
  const order = img.h.refcountOrder;
  const epb = entriesPerBlock(cs, order);
  let nb = 1;
  let tc = 1;
  for (;;) {
    const total = next + nb + tc;
    const nb2 = Math.ceil(total / epb);
    const tc2 = Math.ceil((nb2 * 8) / cs);
    if (nb2 === nb && tc2 === tc) break;
    nb = nb2;
    tc = tc2;
  }
  const total = next + nb + tc;
  const max = img.refcounts.max;
  const reftable = new Uint8Array(tc * cs);
  for (const [off, data] of appended) {
    await img.file.write(off, data);
  }
  for (let b = 0; b < nb; b++) {
    const block = new Uint8Array(cs);
    for (let k = 0; k < epb; k++) {
      const c = b * epb + k;
      const v = c < end ? counts[c]! : c < total ? 1 : 0;
      if (v > max) throw new OutOfRange(`${img.path}: refcount of cluster ${c} would exceed ${max}`, { ref: img.path });
      if (v) setRefcount(block, k, order, v);
    }
    await img.file.write((next + b) * cs, block);
    setU64(view(reftable), b * 8, (next + b) * cs);
  }
  await img.file.write((next + nb) * cs, reftable);
  img.fileLen = Math.max(img.fileLen, total * cs);
  await img.file.sync();

  const hb = new Uint8Array(48);
  const dv = view(hb);
  setU64(dv, 0, size);
  dv.setUint32(8, img.h.cryptMethod);
  dv.setUint32(12, l1.length / 8);
  setU64(dv, 16, l1.length > 0 ? l1Start * cs : 0);
  setU64(dv, 24, (next + nb) * cs);
  dv.setUint32(32, tc);
  dv.setUint32(36, snaps.length);
  setU64(dv, 40, snaps.length > 0 ? tableStart * cs : 0);
  await img.file.write(24, hb);

  img.h.size = size;
  img.h.l1Size = l1.length / 8;
  img.h.l1TableOffset = l1.length > 0 ? l1Start * cs : 0;
  img.h.refcountTableOffset = (next + nb) * cs;
  img.h.refcountTableClusters = tc;
  img.h.nbSnapshots = snaps.length;
  img.h.snapshotsOffset = snaps.length > 0 ? tableStart * cs : 0;
  img.l1 = l1;
  img.snapshotTable = snaps;
  img.entry.virtualSize = size;
  img.meta.clear();
  img.refcounts.reset(reftable, (next + nb) * cs, total);
}
