/** Changing the virtual size of a qcow2 image (and growing its L1 table to cover it). */
import { InvalidArgument, OutOfRange } from '../../../core/index.js';
import { setU64, view } from '../format/bytes.js';
import { MAX_L1_BYTES } from '../format/constants.js';
import { runs } from './cluster-map.js';
import { zeroLocked } from './cluster-write.js';
import type { Qcow2State } from './qcow2-state.js';

/** Grow; shrink only when nothing is allocated past the new end. Caller holds the exclusive lock, metadata written through. */
export async function resizeLocked(s: Qcow2State, newSize: number): Promise<void> {
  if (!Number.isSafeInteger(newSize) || newSize < 0) throw new InvalidArgument(`${s.path}: bad size ${newSize}`, { ref: s.path });
  if (newSize < s.h.size) {
    const from = Math.ceil(newSize / s.cs) * s.cs;
    if (from < s.h.size) {
      for (const r of await runs(s, from, s.h.size - from)) {
        if (r.entry.kind === 'normal' || r.entry.kind === 'compressed') {
          throw new OutOfRange(`${s.path}: cannot shrink to ${newSize}: data is allocated at ${r.start}`, {
            ref: s.path, hint: 'discard the tail first, or grow instead',
          });
        }
      }
    }
  }
  const need = Math.ceil(newSize / (s.cs * s.l2Entries));
  if (need > s.l1Size) await growL1Locked(s, need);
  const oldSize = s.h.size;
  const b = new Uint8Array(8);
  setU64(view(b), 0, newSize);
  await s.file.write(24, b);
  s.h.size = newSize;
  s.entry.virtualSize = newSize;
  // As QEMU does: a grown area reads as zeros even where a bigger backing file has data.
  const shadowEnd = Math.min(newSize, s.backing?.virtualSize ?? 0);
  if (shadowEnd > oldSize) await zeroLocked(s, oldSize, shadowEnd - oldSize, 'zero');
}

/** A bigger active L1: written fresh, header switched to it, then the old one freed. */
async function growL1Locked(s: Qcow2State, entries: number): Promise<void> {
  if (entries * 8 > MAX_L1_BYTES) throw new OutOfRange(`${s.path}: the L1 table would exceed ${MAX_L1_BYTES} bytes`, { ref: s.path });
  const cs = s.cs;
  const clusters = Math.ceil((entries * 8) / cs);
  const off = await s.refcounts.alloc(clusters);
  const nl1 = new Uint8Array(entries * 8);
  nl1.set(s.l1);
  await s.file.write(off, nl1);
  s.fileLen = Math.max(s.fileLen, off + nl1.length);
  await s.file.sync();
  const hb = new Uint8Array(12);
  view(hb).setUint32(0, entries);
  setU64(view(hb), 4, off);
  await s.file.write(36, hb);
  const oldOff = s.h.l1TableOffset;
  const oldClusters = Math.ceil(s.l1.length / cs);
  s.h.l1TableOffset = off;
  s.h.l1Size = entries;
  s.l1 = nl1;
  if (oldOff !== 0 && oldClusters > 0) await s.refcounts.free(oldOff, oldClusters);
}
