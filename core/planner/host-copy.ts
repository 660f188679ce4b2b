import type { BlockDevice } from '../backend/block-device.js';
import type { JobContext, JobTask } from '../jobs/job-task.js';
import type { Extent } from '../model/types.js';

/** Bytes per request: large enough to amortise a round trip, small enough to bound memory. */
export const COPY_CHUNK = 4 * 1024 * 1024;
/** Requests in flight at once (memory bound: DEPTH × COPY_CHUNK). */
export const COPY_DEPTH = 4;

export interface HostCopyParams extends Record<string, unknown> {
  source: string;
  target: string;
  /** The target was created empty for this copy: unallocated source ranges can be skipped. */
  targetFresh: boolean;
}

/** Opens a ref's data path; provided by the broker. */
export type DeviceOpener = (ref: string, mode: 'r' | 'rw') => Promise<BlockDevice>;

interface Piece {
  offset: number;
  length: number;
  kind: 'data' | 'zero';
}

/**
 * The host data mover: copies a volume's data between two data paths, moving only allocated
 * extents (zero ranges become zero writes, unallocated ranges are skipped on a fresh target),
 * in 4 MiB requests with 4 in flight. Its checkpoint is the offset below which everything is
 * copied, so a resumed copy starts there.
 */
export function hostCopyTask(params: HostCopyParams, open: DeviceOpener): JobTask {
  return {
    type: 'copy',
    params,
    async run(ctx: JobContext) {
      const src = await open(params.source, 'r');
      let dst: BlockDevice | undefined;
      try {
        dst = await open(params.target, 'rw');
        await copyDevice(src, dst, params.targetFresh, ctx);
        await dst.flush();
      } finally {
        await Promise.allSettled([src.close(), dst?.close()]);
      }
    },
  };
}

async function copyDevice(src: BlockDevice, dst: BlockDevice, targetFresh: boolean, ctx: JobContext): Promise<void> {
  const size = Math.min(src.sizeBytes, dst.sizeBytes);
  const resume = ctx.resumeFrom as { offset?: unknown } | undefined;
  const start = typeof resume?.offset === 'number' ? resume.offset : 0;
  const chunks = split(plan(await src.extents(0, size), size, targetFresh), start);
  ctx.setTotal(chunks.reduce((n, c) => n + (c.kind === 'data' ? c.length : 0), 0));

  const move = async (c: Piece) => {
    if (c.kind === 'data') await dst.write(c.offset, await src.read(c.offset, c.length));
    else if (dst.writeZeroes) await dst.writeZeroes(c.offset, c.length);
    else await dst.write(c.offset, new Uint8Array(c.length));
  };

  // Pipelined: up to COPY_DEPTH requests in flight; the checkpoint is the lowest unfinished offset.
  const inFlight = new Map<number, Promise<void>>();
  const done = new Set<number>();
  let failure: unknown;
  let next = 0;
  let lowest = 0;
  try {
    while (next < chunks.length || inFlight.size > 0) {
      while (next < chunks.length && inFlight.size < COPY_DEPTH) {
        const i = next++;
        // A failed chunk is never marked done, so the checkpoint cannot step over it.
        inFlight.set(i, move(chunks[i]!).then(
          () => void done.add(i),
          (e: unknown) => {
            failure ??= e;
            inFlight.delete(i);
          },
        ));
      }
      if (inFlight.size > 0) await Promise.race(inFlight.values());
      if (failure !== undefined) throw failure;
      for (const i of [...inFlight.keys()].filter((k) => done.has(k))) {
        inFlight.delete(i);
        while (done.has(lowest)) lowest++;
        const safe = lowest < chunks.length ? chunks[lowest]!.offset : size;
        await ctx.checkpoint(chunks[i]!.kind === 'data' ? chunks[i]!.length : 0, { offset: safe });
      }
    }
  } finally {
    // Never leave a request running behind a failure or a cancel.
    await Promise.allSettled(inFlight.values());
  }
}

/** What to do with each range: copy data, write zeros, or (fresh target) nothing. */
function plan(extents: Extent[], size: number, targetFresh: boolean): Piece[] {
  const out: Piece[] = [];
  let pos = 0;
  for (const e of [...extents].sort((a, b) => a.offset - b.offset)) {
    const s = Math.max(e.offset, pos);
    const t = Math.min(e.offset + e.length, size);
    if (t <= s) continue;
    if (s > pos && !targetFresh) out.push({ offset: pos, length: s - pos, kind: 'zero' });
    if (e.kind === 'data' || !targetFresh) out.push({ offset: s, length: t - s, kind: e.kind });
    pos = t;
  }
  if (pos < size && !targetFresh) out.push({ offset: pos, length: size - pos, kind: 'zero' });
  return out;
}

/** Cut pieces into requests of at most COPY_CHUNK bytes, dropping what lies below `start`. */
function split(pieces: Piece[], start: number): Piece[] {
  const out: Piece[] = [];
  for (const p of pieces) {
    const from = Math.max(p.offset, start);
    for (let off = from; off < p.offset + p.length; off += COPY_CHUNK) {
      out.push({ offset: off, length: Math.min(COPY_CHUNK, p.offset + p.length - off), kind: p.kind });
    }
  }
  return out;
}
