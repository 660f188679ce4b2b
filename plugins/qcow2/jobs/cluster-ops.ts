/**
 * Metadata edits the jobs need that the engine does not offer as public operations (yet):
 * copy-on-read into still-unallocated clusters, zero clusters without touching data, and
 * emptying an image. All run under the image's exclusive lock and follow the engine's write
 * order (data → L2 → refcount decrements), so a kill leaves leaks at most.
 */
import { decodeL1, decodeL2, encodeL2Zero, readEntry, writeEntry, type L2Entry } from '../format/entries.js';
import type { Qcow2Image } from '../engine/qcow2-image.js';

const ZERO_CHUNK = 1 << 20;

/** Index range of the L2 slice holding guest clusters [gc, gcEnd) that starts at gc. */
function sliceEnd(img: Qcow2Image, gc: number, gcEnd: number): number {
  return Math.min(gcEnd, (Math.floor(gc / img.l2Entries) + 1) * img.l2Entries);
}

/**
 * Make whole clusters [start, end) read as zeros (end may be the unaligned image end): the
 * zero flag on v3; zero bytes on v2, which has none. Caller holds the exclusive lock.
 */
export async function zeroClustersLocked(img: Qcow2Image, start: number, end: number): Promise<void> {
  if (img.h.version === 2) {
    for (let p = start; p < end; p += ZERO_CHUNK) await img.writeLocked(p, new Uint8Array(Math.min(ZERO_CHUNK, end - p)));
    return;
  }
  const cs = img.cs;
  let gc = Math.floor(start / cs);
  const gcEnd = Math.ceil(end / cs);
  while (gc < gcEnd) {
    const stop = sliceEnd(img, gc, gcEnd);
    const { offset: l2off, table } = await img.l2ForWrite(Math.floor(gc / img.l2Entries));
    const i0 = gc % img.l2Entries;
    const olds: L2Entry[] = [];
    for (let i = i0; i < i0 + (stop - gc); i++) {
      const e = decodeL2(...readEntry(table, i), img.h.clusterBits);
      if (e.kind === 'zero' && e.offset === 0) continue;
      writeEntry(table, i, ...encodeL2Zero());
      olds.push(e);
    }
    if (olds.length > 0) {
      await img.writeL2(l2off, table, i0, i0 + (stop - gc));
      for (const e of olds) await img.release(e);
    }
    gc = stop;
  }
}

/** Whether guest cluster gc is still unallocated in the image itself (no entry at all). */
export async function unallocatedLocked(img: Qcow2Image, gc: number): Promise<boolean> {
  return (await img.lookup(gc)).kind === 'unallocated';
}

/**
 * Unallocate every cluster of the active L1 (what qemu-img commit does to the top afterwards):
 * reads then fall through to the backing file. Internal snapshots keep their clusters.
 */
export async function makeEmptyLocked(img: Qcow2Image): Promise<void> {
  for (let l1i = 0; l1i < img.l1Size; l1i++) {
    if (decodeL1(...readEntry(img.l1, l1i)).l2Offset === 0) continue;
    const { offset: l2off, table } = await img.l2ForWrite(l1i);
    const olds: L2Entry[] = [];
    for (let i = 0; i < img.l2Entries; i++) {
      const [hi, lo] = readEntry(table, i);
      if (hi === 0 && lo === 0) continue;
      olds.push(decodeL2(hi, lo, img.h.clusterBits));
      writeEntry(table, i, 0, 0);
    }
    if (olds.length > 0) {
      await img.writeL2(l2off, table, 0, img.l2Entries);
      await releaseAll(img, olds);
    }
  }
}

/** Drop the references of many entries, host-contiguous data clusters in one refcount update each. */
async function releaseAll(img: Qcow2Image, olds: L2Entry[]): Promise<void> {
  const cs = img.cs;
  let runStart = -1;
  let runLen = 0;
  const flush = async () => {
    if (runLen > 0) await img.refcounts.update(runStart / cs, runLen, -1);
    runLen = 0;
  };
  for (const e of olds) {
    if ((e.kind === 'normal' || e.kind === 'zero') && e.offset !== 0) {
      if (runLen > 0 && e.offset === runStart + runLen * cs) { runLen++; continue; }
      await flush();
      runStart = e.offset;
      runLen = 1;
    } else {
      await img.release(e);
    }
  }
  await flush();
}
