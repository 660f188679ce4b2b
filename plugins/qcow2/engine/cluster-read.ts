/** Reading a qcow2 image: guest bytes through the cluster map and the backing chain, and block status. */
import { Corrupt } from '../../../core/index.js';
import { ioBuffer } from '../format/bytes.js';
import type { L2Entry } from '../format/entries.js';
import { hostOf, runs, type Run } from './cluster-map.js';
import { decompressCluster } from './compressed.js';
import type { Qcow2State } from './qcow2-state.js';
import { mergeStatus } from './status.js';
import type { BlockStatus } from './types.js';

/**
 * Fill `out` with the guest bytes at `offset` (every byte is written). Caller holds the lock.
 * `background`: a bulk copy's read (data reads on the low-priority thread, see ImageFile).
 */
export async function readLocked(s: Qcow2State, out: Uint8Array, offset: number, background = false): Promise<void> {
  for (const run of await runs(s, offset, out.length)) {
    const dst = out.subarray(run.start - offset, run.start - offset + run.length);
    switch (run.entry.kind) {
      case 'normal': {
        const host = hostOf(s, run, run.start);
        if (host >= s.fileLen) {
          throw new Corrupt(`${s.path}: data cluster at 0x${run.entry.offset.toString(16)} lies past the end of the file`, {
            ref: s.path, hint: 'the image is truncated or damaged',
          });
        }
        // Past the end of the file reads as zeros (QEMU does the same for a short file).
        const n = await s.file.readInto(dst, host, background);
        if (n < dst.length) dst.fill(0, n);
        break;
      }
      case 'zero':
        dst.fill(0);
        break;
      case 'unallocated':
        await readBacking(s, dst, run.start, background);
        break;
      case 'compressed': {
        const data = await readCompressed(s, run.entry);
        const inOff = run.start % s.cs;
        dst.set(data.subarray(inOff, inOff + run.length));
        break;
      }
    }
  }
}

/** Fill `dst` from the backing chain; past its end (or with no backing file) with zeros. */
export async function readBacking(s: Qcow2State, dst: Uint8Array, guest: number, background = false): Promise<void> {
  const b = s.backing;
  const n = b ? Math.max(0, Math.min(dst.length, b.virtualSize - guest)) : 0;
  if (n > 0) await b!.readInto(dst.subarray(0, n), guest, background ? { background } : undefined);
  if (n < dst.length) dst.fill(0, n);
}

export async function readCompressed(s: Qcow2State, e: L2Entry): Promise<Uint8Array> {
  const off = e.compressedOffset!;
  const len = Math.min(e.compressedBytes!, Math.max(0, s.fileLen - off), 2 * s.cs);
  if (off >= s.fileLen) throw new Corrupt(`${s.path}: compressed cluster at 0x${off.toString(16)} lies past the end of the file`, { ref: s.path });
  const data = await s.file.read(off, len);
  return decompressCluster(s.h.compressionType, data, s.cs, s.path);
}

/** The current guest content of one whole cluster (for copy-on-write). */
export async function oldCluster(s: Qcow2State, gc: number, e: L2Entry): Promise<Uint8Array> {
  const buf = ioBuffer(s.cs);
  switch (e.kind) {
    case 'normal': await s.file.readInto(buf, e.offset); break;
    case 'compressed': return readCompressed(s, e);
    case 'zero': break;
    case 'unallocated': await readBacking(s, buf, gc * s.cs); break;
  }
  return buf;
}

/** Block status of [offset, offset+length), the backing chain's below unallocated runs. Caller holds the lock. */
export async function statusLocked(s: Qcow2State, offset: number, length: number): Promise<BlockStatus[]> {
  const out: BlockStatus[] = [];
  // Objects built whole (not spread from a base): this runs once per run of a large map.
  const status = (run: Run, present: boolean, zero: boolean, compressed: boolean, host?: number): BlockStatus => {
    const st: BlockStatus = { start: run.start, length: run.length, depth: 0, present, zero, data: present && !zero, compressed, filename: s.path };
    if (host !== undefined) st.offset = host;
    return st;
  };
  for (const run of await runs(s, offset, length)) {
    switch (run.entry.kind) {
      case 'normal':
        out.push(status(run, true, false, false, hostOf(s, run, run.start)));
        break;
      case 'compressed':
        out.push(status(run, true, false, true));
        break;
      case 'zero':
        out.push(status(run, true, true, false, run.entry.offset !== 0 ? hostOf(s, run, run.start) : undefined));
        break;
      case 'unallocated': {
        const b = s.backing;
        const inBacking = b ? Math.max(0, Math.min(run.length, b.virtualSize - run.start)) : 0;
        if (b && inBacking > 0) {
          for (const st of await b.blockStatus(run.start, inBacking)) out.push({ ...st, depth: st.depth + 1 });
        }
        if (inBacking < run.length) {
          out.push({ start: run.start + inBacking, length: run.length - inBacking, depth: 0, present: false, zero: true, data: false, compressed: false });
        }
        break;
      }
    }
  }
  return mergeStatus(out);
}
