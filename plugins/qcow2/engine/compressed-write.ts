/**
 * Compressed writes (`convert -c`): each whole cluster compressed (deflate or zstd, as the
 * header's compression type says) and packed at byte granularity into host clusters that
 * compressed clusters share, a host cluster's refcount counting the compressed clusters that touch
 * it — QEMU's layout (qcow2_alloc_bytes), so `qemu-img check` agrees with it. As in QEMU, a
 * compressed cluster goes only where nothing is allocated; one that compression does not shrink is
 * written as a normal cluster.
 */
import { FailedPrecondition } from '../../../core/index.js';
import { decodeL2, encodeL2Compressed, readEntry, writeEntry } from '../format/entries.js';
import { l2ForWrite, release } from './cluster-map.js';
import { assertWholeClusters, writeLocked } from './cluster-write.js';
import { compressCluster } from './compressed.js';
import type { Qcow2State } from './qcow2-state.js';

/** Write whole clusters at `offset` (the last may end at the virtual size), compressed where that saves space. */
export async function writeCompressed(s: Qcow2State, offset: number, data: Uint8Array): Promise<void> {
  assertWholeClusters(s, offset, data.length, 'a compressed write');
  const cs = s.cs;
  const n = Math.ceil(data.length / cs);
  const cluster = (i: number) => {
    const part = data.subarray(i * cs, Math.min(data.length, (i + 1) * cs));
    if (part.length === cs) return part;
    const padded = new Uint8Array(cs); // the last cluster, past the virtual size: zeros, as QEMU pads it
    padded.set(part);
    return padded;
  };
  // Compressed outside the lock (deflate on the thread pool: both cores for a convert).
  const packed = await Promise.all(Array.from({ length: n }, (_, i) => compressCluster(s.h.compressionType, cluster(i))));
  await s.lock.exclusive(async () => {
    for (let i = 0; i < n; i++) {
      const guest = offset + i * cs;
      const l1i = Math.floor(guest / cs / s.l2Entries);
      const idx = Math.floor(guest / cs) % s.l2Entries;
      const { offset: l2off, table } = await l2ForWrite(s, l1i);
      const old = decodeL2(...readEntry(table, idx), s.h.clusterBits);
      if (!(old.kind === 'unallocated' || (old.kind === 'zero' && old.offset === 0))) {
        throw new FailedPrecondition(`${s.path}: cannot write compressed data at ${guest}: the cluster is allocated`, {
          ref: s.path, hint: 'compressed clusters go only where nothing is allocated: write into a new image, or an empty one',
        });
      }
      const bytes = packed[i];
      if (!bytes) {
        await writeLocked(s, guest, data.subarray(i * cs, Math.min(data.length, (i + 1) * cs)));
        continue;
      }
      // Order as every write: refcounts → data → L2.
      const host = await allocBytes(s, bytes.length);
      await s.file.write(host, bytes, true);
      s.fileLen = Math.max(s.fileLen, host + bytes.length);
      writeEntry(table, idx, ...encodeL2Compressed(host, bytes.length, s.h.clusterBits));
      await s.meta.writeL2(l2off, table, idx, idx + 1);
      await release(s, old);
    }
    await s.meta.flushIfFull();
  });
}

/**
 * `size` bytes (< a cluster) for compressed data, refcounts taken: after the last compressed
 * cluster when its host cluster has room (or the next host cluster is the free one), else in a
 * new cluster. Every host cluster the bytes touch gains a reference.
 */
async function allocBytes(s: Qcow2State, size: number): Promise<number> {
  const cs = s.cs;
  let at = s.compressedTail; // 0 once its cluster is freed (Qcow2State)
  // A host cluster shared by as many compressed clusters as its refcount can count: start anew.
  if (at !== 0 && (await s.refcounts.get(Math.floor(at / cs))) >= s.refcounts.max) at = 0;
  if (at !== 0 && cs - (at % cs) >= size) {
    await s.refcounts.update(Math.floor(at / cs), 1, 1);
  } else {
    const fresh = await s.refcounts.alloc(1);
    if (at !== 0 && Math.ceil(at / cs) * cs === fresh) await s.refcounts.update(Math.floor(at / cs), 1, 1); // spans into it
    else at = fresh;
  }
  s.compressedTail = (at + size) % cs === 0 ? 0 : at + size;
  return at;
}
