/**
 * The core of stream and safe rebase: fill clusters the image does not allocate with the content
 * its chain shows there, copy-on-read style. Candidates are found and their data read without
 * holding the image's lock; then, under the exclusive lock, only clusters that are still
 * unallocated are written — a guest write that got there first wins, so live writers never
 * lose data to the job.
 */
import type { Qcow2Image } from '../engine/qcow2-image.js';
import type { BlockStatus, Image } from '../engine/types.js';
import { zeroClustersLocked } from './cluster-ops.js';

/** What to put in one run of clusters. */
export interface Fill {
  start: number;
  end: number;
  kind: 'data' | 'zero';
  data?: Uint8Array;
}

/** Per-cluster decision: nothing to copy, make it a zero cluster, or copy its data. */
export type ClusterDecision = 'skip' | 'zero' | 'data';

/**
 * The clusters of [start, end) that `img` leaves unallocated, as cluster-aligned runs
 * (end clipped to the image end).
 */
export async function unallocatedRuns(img: Qcow2Image, start: number, end: number): Promise<{ start: number; end: number }[]> {
  const runs = await img.lock.shared(() => img.runs(start, end - start));
  return runs.filter((r) => r.entry.kind === 'unallocated').map((r) => ({ start: r.start, end: r.start + r.length }));
}

/**
 * Walk the clusters of [start, end) against a sorted status list and group consecutive clusters
 * with the same decision. `decide` sees the status ranges overlapping one cluster.
 */
export function groupClusters(start: number, end: number, cs: number, status: BlockStatus[],
  decide: (overlapping: BlockStatus[], cStart: number, cEnd: number) => ClusterDecision): { start: number; end: number; kind: ClusterDecision }[] {
  const out: { start: number; end: number; kind: ClusterDecision }[] = [];
  let si = 0;
  for (let c = start; c < end; c += cs) {
    const ce = Math.min(end, c + cs);
    while (si < status.length && status[si]!.start + status[si]!.length <= c) si++;
    const over: BlockStatus[] = [];
    for (let j = si; j < status.length && status[j]!.start < ce; j++) over.push(status[j]!);
    const kind = decide(over, c, ce);
    const last = out[out.length - 1];
    if (last && last.kind === kind && last.end === c) last.end = ce;
    else out.push({ start: c, end: ce, kind });
  }
  return out;
}

/** Read [start, end) of `source` (zeros past its end). */
export async function readPadded(source: Image, start: number, end: number): Promise<Uint8Array> {
  const n = Math.max(0, Math.min(end, source.virtualSize) - start);
  if (n === end - start) return source.read(start, n);
  const out = new Uint8Array(end - start);
  if (n > 0) out.set(await source.read(start, n));
  return out;
}

/** Fill `buf` with `source` from offset `start` (zeros past its end); returns `buf`. */
export async function readPaddedInto(source: Pick<Image, 'readInto' | 'virtualSize'>, buf: Uint8Array, start: number): Promise<Uint8Array> {
  const n = Math.max(0, Math.min(buf.length, source.virtualSize - start));
  if (n > 0) await source.readInto(buf.subarray(0, n), start);
  if (n < buf.length) buf.fill(0, n);
  return buf;
}

/**
 * Write the fills into clusters that are still unallocated; returns the data bytes written.
 * Data fills go first through the engine's concurrent copy-on-read write; what it leaves (a
 * cluster a writer allocated meanwhile, zero fills, the last partial cluster) is done here
 * cluster by cluster under the exclusive lock.
 */
export async function applyFills(img: Qcow2Image, fills: Fill[]): Promise<number> {
  if (fills.length === 0) return 0;
  let written = 0;
  const rest: Fill[] = [];
  await Promise.all(fills.map(async (f) => {
    const whole = f.kind === 'data' && f.start % img.cs === 0 && (f.end % img.cs === 0 || f.end === img.virtualSize);
    const n = whole ? await img.fillUnallocated(f.start, f.data!.subarray(0, f.end - f.start)) : 0;
    written += n;
    if (f.start + n < f.end) rest.push(f);
  }));
  return written + await applyFillsLocked(img, rest);
}

async function applyFillsLocked(img: Qcow2Image, fills: Fill[]): Promise<number> {
  if (fills.length === 0) return 0;
  const cs = img.cs;
  return img.lock.exclusive(async () => {
    let written = 0;
    for (const f of fills) {
      let p = f.start;
      while (p < f.end) {
        // Skip clusters a writer allocated meanwhile; gather the next run still unallocated.
        while (p < f.end && (await img.lookup(Math.floor(p / cs))).kind !== 'unallocated') p = Math.min(f.end, p + cs);
        let q = p;
        while (q < f.end && (await img.lookup(Math.floor(q / cs))).kind === 'unallocated') q = Math.min(f.end, q + cs);
        if (q > p) {
          if (f.kind === 'data') {
            await img.writeLocked(p, f.data!.subarray(p - f.start, q - f.start));
            written += q - p;
          } else {
            await zeroClustersLocked(img, p, q);
          }
        }
        p = q;
      }
    }
    return written;
  });
}
