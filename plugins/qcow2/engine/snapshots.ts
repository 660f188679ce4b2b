import { AlreadyExists, InvalidArgument, NotFound, Unsupported } from '../../../core/index.js';
import { setU64, view } from '../format/bytes.js';
import { MAX_SNAPSHOTS } from '../format/constants.js';
import { COPIED_HI, decodeL1, decodeL2, encodeL1, readEntry, writeEntry } from '../format/entries.js';
import {
  encodeSnapshotTable, makeExtra, snapshotDiskSize, snapshotIcount, snapshotVmStateSize, type SnapshotEntry,
} from '../format/snapshot-table.js';
import type { Qcow2Image } from './qcow2-image.js';
import type { SnapshotInfo, SnapshotOps } from './types.js';

/**
 * Internal snapshots, QEMU's way: a snapshot is a copy of the active L1; every L2 table and
 * data cluster reachable through it gets one more reference; COPIED is cleared where a
 * refcount goes above 1 and set again where it returns to 1.
 */
export class SnapshotManager implements SnapshotOps {
  constructor(private readonly img: Qcow2Image) {}

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
      const cs = img.cs;
      // 1. One more reference to everything reachable from the active L1 (before anything points at it twice).
      await this.adjustTree(img.l1, 1);
      // 2. Nothing is exclusively ours any more.
      await this.fixCopied();
      // 3. The snapshot's copy of the L1.
      const l1Bytes = img.l1Size * 8;
      let l1Offset = 0;
      if (l1Bytes > 0) {
        l1Offset = await img.refcounts.alloc(Math.ceil(l1Bytes / cs));
        await img.file.write(l1Offset, img.l1.slice());
        img.fileLen = Math.max(img.fileLen, l1Offset + l1Bytes);
      }
      const ids = img.snapshotTable.map((s) => Number.parseInt(s.id, 10)).filter((n) => Number.isFinite(n));
      const now = Date.now();
      const entry: SnapshotEntry = {
        l1TableOffset: l1Offset, l1Size: img.l1Size, id: String(ids.length ? Math.max(...ids) + 1 : 1), name,
        dateSec: Math.floor(now / 1000), dateNsec: (now % 1000) * 1_000_000, vmClockNsec: 0, vmStateSize: 0,
        extra: makeExtra(0, img.h.size),
      };
      await this.writeTable([...img.snapshotTable, entry]);
      return toInfo(entry);
    });
  }

  async apply(nameOrId: string): Promise<void> {
    const img = this.img;
    img.assertWritable();
    await img.lock.exclusive(async () => {
      const sn = img.snapshotTable[this.find(nameOrId)]!;
      const snL1 = await img.file.readExact(sn.l1TableOffset, sn.l1Size * 8, 'snapshot L1 table');
      const diskSize = snapshotDiskSize(sn);
      await this.adjustTree(snL1, 1);
      if (sn.l1Size > img.l1Size) await img.growL1Locked(sn.l1Size);
      const old = img.l1.slice();
      const next = new Uint8Array(img.l1.length);
      next.set(snL1.subarray(0, Math.min(snL1.length, next.length)));
      await img.file.write(img.h.l1TableOffset, next);
      img.l1 = next;
      if (diskSize !== undefined && diskSize !== img.h.size) {
        const b = new Uint8Array(8);
        setU64(view(b), 0, diskSize);
        await img.file.write(24, b);
        img.h.size = diskSize;
      }
      await this.adjustTree(old, -1);
      await this.fixCopied();
    });
  }

  async delete(nameOrId: string): Promise<void> {
    const img = this.img;
    img.assertWritable();
    await img.lock.exclusive(async () => {
      const i = this.find(nameOrId);
      const sn = img.snapshotTable[i]!;
      const snL1 = await img.file.readExact(sn.l1TableOffset, sn.l1Size * 8, 'snapshot L1 table');
      await this.writeTable(img.snapshotTable.filter((_, k) => k !== i));
      await this.adjustTree(snL1, -1);
      if (sn.l1Size > 0) await img.refcounts.free(sn.l1TableOffset, Math.ceil((sn.l1Size * 8) / img.cs));
      await this.fixCopied();
    });
  }

  /** Write a new snapshot table in fresh clusters, switch the header to it, free the old one. */
  private async writeTable(entries: SnapshotEntry[]): Promise<void> {
    const img = this.img;
    const cs = img.cs;
    const bytes = encodeSnapshotTable(entries);
    let offset = 0;
    if (entries.length > 0) {
      offset = await img.refcounts.alloc(Math.ceil(bytes.length / cs));
      await img.file.write(offset, bytes);
      img.fileLen = Math.max(img.fileLen, offset + bytes.length);
    }
    const oldOffset = img.h.snapshotsOffset;
    const oldBytes = encodeSnapshotTable(img.snapshotTable).length;
    const hb = new Uint8Array(12);
    view(hb).setUint32(0, entries.length);
    setU64(view(hb), 4, offset);
    await img.file.write(60, hb);
    img.h.nbSnapshots = entries.length;
    img.h.snapshotsOffset = offset;
    img.snapshotTable = entries;
    if (oldOffset !== 0 && oldBytes > 0) await img.refcounts.free(oldOffset, Math.ceil(oldBytes / cs));
  }

  /** Add delta to the refcount of every L2 table and data cluster reachable from an L1. */
  private async adjustTree(l1: Uint8Array, delta: number): Promise<void> {
    const img = this.img;
    const cs = img.cs;
    for (let i = 0; i < l1.length / 8; i++) {
      const e = decodeL1(...readEntry(l1, i));
      if (e.l2Offset === 0) continue;
      const t = await img.l2Table(e.l2Offset);
      let runStart = -1;
      let runLen = 0;
      const flush = async () => {
        if (runLen > 0) await img.refcounts.update(runStart, runLen, delta);
        runLen = 0;
      };
      for (let j = 0; j < img.l2Entries; j++) {
        const d = decodeL2(...readEntry(t, j), img.h.clusterBits);
        if ((d.kind === 'normal' || d.kind === 'zero') && d.offset !== 0) {
          const c = d.offset / cs;
          if (runLen > 0 && c === runStart + runLen) { runLen++; continue; }
          await flush();
          runStart = c;
          runLen = 1;
        } else if (d.kind === 'compressed') {
          await flush();
          const [c0, n] = img.compressedClusters(d);
          await img.refcounts.update(c0, n, delta);
        }
      }
      await flush();
      await img.refcounts.update(e.l2Offset / cs, 1, delta);
    }
  }

  /** Set COPIED exactly where the refcount is 1, in the active L1 and its L2 tables. */
  private async fixCopied(): Promise<void> {
    const img = this.img;
    const cs = img.cs;
    let l1Changed = false;
    for (let i = 0; i < img.l1Size; i++) {
      const e = decodeL1(...readEntry(img.l1, i));
      if (e.l2Offset === 0) continue;
      const rc = await img.refcounts.get(e.l2Offset / cs);
      if ((rc === 1) !== e.copied) {
        writeEntry(img.l1, i, ...encodeL1(e.l2Offset, rc === 1));
        l1Changed = true;
      }
      const t = await img.l2Table(e.l2Offset);
      let changed = false;
      for (let j = 0; j < img.l2Entries; j++) {
        const [hi, lo] = readEntry(t, j);
        const d = decodeL2(hi, lo, img.h.clusterBits);
        if (!((d.kind === 'normal' || d.kind === 'zero') && d.offset !== 0)) continue;
        const drc = await img.refcounts.get(d.offset / cs);
        if ((drc === 1) !== d.copied) {
          writeEntry(t, j, drc === 1 ? (hi | COPIED_HI) >>> 0 : (hi & ~COPIED_HI) >>> 0, lo);
          changed = true;
        }
      }
      if (changed) await img.file.write(e.l2Offset, t);
    }
    if (l1Changed) await img.file.write(img.h.l1TableOffset, img.l1);
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
