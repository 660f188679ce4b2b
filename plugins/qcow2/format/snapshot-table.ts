import { Corrupt } from '../../../core/index.js';
import { getU64, setU64, view } from './bytes.js';

/** One internal snapshot table entry. Extra data beyond the fields we know is kept. */
export interface SnapshotEntry {
  l1TableOffset: number;
  l1Size: number;
  id: string;
  name: string;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  vmStateSize: number;
  /** The extra data as stored (v3: ≥ 16 bytes: vm_state_size_large, disk_size, [icount]). */
  extra: Uint8Array;
}

const FIXED = 40;

export function snapshotDiskSize(e: SnapshotEntry): number | undefined {
  return e.extra.length >= 16 ? getU64(view(e.extra), 8) : undefined;
}

export function snapshotIcount(e: SnapshotEntry): number | undefined {
  if (e.extra.length < 24) return undefined;
  const v = view(e.extra).getBigInt64(16);
  return v < 0n ? undefined : Number(v);
}

export function snapshotVmStateSize(e: SnapshotEntry): number {
  return e.extra.length >= 8 ? Math.max(getU64(view(e.extra), 0), e.vmStateSize) : e.vmStateSize;
}

/** QEMU 7.2's extra data: vm_state_size_large, disk_size, icount (written as 0). */
export function makeExtra(vmStateSize: number, diskSize: number): Uint8Array {
  const extra = new Uint8Array(24);
  const dv = view(extra);
  setU64(dv, 0, vmStateSize);
  setU64(dv, 8, diskSize);
  return extra;
}

/** Decode `count` entries from the table bytes; every length is bounds-checked against `buf`. */
export function decodeSnapshotTable(input: Uint8Array, count: number, path = 'image'): SnapshotEntry[] {
  const buf = new Uint8Array(input.buffer, input.byteOffset, input.byteLength);
  const dv = view(buf);
  const out: SnapshotEntry[] = [];
  let off = 0;
  const dec = new TextDecoder();
  for (let i = 0; i < count; i++) {
    if (off + FIXED > buf.length) throw new Corrupt(`${path}: snapshot table entry ${i} is truncated`, { ref: path });
    const idLen = dv.getUint16(off + 12);
    const nameLen = dv.getUint16(off + 14);
    const extraSize = dv.getUint32(off + 36);
    const end = off + FIXED + extraSize + idLen + nameLen;
    if (extraSize > 1024 || end > buf.length) throw new Corrupt(`${path}: snapshot table entry ${i} overruns the table`, { ref: path });
    const e: SnapshotEntry = {
      l1TableOffset: getU64(dv, off),
      l1Size: dv.getUint32(off + 8),
      dateSec: dv.getUint32(off + 16),
      dateNsec: dv.getUint32(off + 20),
      vmClockNsec: getU64(dv, off + 24),
      vmStateSize: dv.getUint32(off + 32),
      extra: buf.slice(off + FIXED, off + FIXED + extraSize),
      id: dec.decode(buf.subarray(off + FIXED + extraSize, off + FIXED + extraSize + idLen)),
      name: dec.decode(buf.subarray(off + FIXED + extraSize + idLen, end)),
    };
    out.push(e);
    off = Math.ceil(end / 8) * 8;
  }
  return out;
}

export function snapshotTableSize(entries: SnapshotEntry[]): number {
  let n = 0;
  const enc = new TextEncoder();
  for (const e of entries) n += Math.ceil((FIXED + e.extra.length + enc.encode(e.id).length + enc.encode(e.name).length) / 8) * 8;
  return n;
}

export function encodeSnapshotTable(entries: SnapshotEntry[]): Uint8Array {
  const buf = new Uint8Array(snapshotTableSize(entries));
  const dv = view(buf);
  const enc = new TextEncoder();
  let off = 0;
  for (const e of entries) {
    const id = enc.encode(e.id);
    const name = enc.encode(e.name);
    setU64(dv, off, e.l1TableOffset);
    dv.setUint32(off + 8, e.l1Size);
    dv.setUint16(off + 12, id.length);
    dv.setUint16(off + 14, name.length);
    dv.setUint32(off + 16, e.dateSec);
    dv.setUint32(off + 20, e.dateNsec);
    setU64(dv, off + 24, e.vmClockNsec);
    dv.setUint32(off + 32, e.vmStateSize);
    dv.setUint32(off + 36, e.extra.length);
    buf.set(e.extra, off + FIXED);
    buf.set(id, off + FIXED + e.extra.length);
    buf.set(name, off + FIXED + e.extra.length + id.length);
    off += Math.ceil((FIXED + e.extra.length + id.length + name.length) / 8) * 8;
  }
  return buf;
}
