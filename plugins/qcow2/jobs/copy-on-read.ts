/**
 * The core of stream and safe rebase: fill clusters the image does not allocate with the content
 * its chain shows there, copy-on-read style. Candidates are found and their data read first; the
 * engine then writes only clusters that are still unallocated (Image.fillUnallocated,
 * zeroUnallocated) — a guest write that got there first wins, so live writers never lose data
 * to the job.
 */
import type { BlockStatus, Image } from '../engine/index.js';

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
export async function unallocatedRuns(img: Image, start: number, end: number): Promise<{ start: number; end: number }[]> {
  const out: { start: number; end: number }[] = [];
  let p = start;
  for (const a of await img.allocatedAbove(start, end - start, img.backing)) {
    if (a.start > p) out.push({ start: p, end: a.start });
    p = a.start + a.length;
  }
  if (p < end) out.push({ start: p, end });
  return out;
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
 * Write the fills into clusters that are still unallocated, all at once (the engine writes whole
 * clusters of different fills concurrently); returns the data bytes written.
 */
export async function applyFills(img: Image, fills: Fill[]): Promise<number> {
  let written = 0;
  await Promise.all(fills.map(async (f) => {
    if (f.kind === 'data') written += await img.fillUnallocated(f.start, f.data!.subarray(0, f.end - f.start));
    else await img.zeroUnallocated(f.start, f.end - f.start);
  }));
  return written;
}
