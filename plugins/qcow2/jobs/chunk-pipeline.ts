/**
 * The copy loop shared by stream and commit. The range [offset, size) is taken in JOB_CHUNK
 * chunks: the next AHEAD chunks with work are found and read while earlier ones are written, up
 * to AHEAD chunks are written at once, and chunks are checkpointed in order, so a saved offset
 * never passes a chunk that is not done. Memory is bounded by AHEAD chunks read and AHEAD written:
 * each chunk is read into one of at most 2 × AHEAD buffers that the pipeline reuses (fresh buffers
 * per chunk became garbage faster than V8 collects external memory: 135 MiB peak on a 16 GiB
 * stream).
 *
 * Nothing is written without a pause point just before it (ctx.pace(0), then the lease's
 * own-clock check): a pause holds the next write, not the checkpoint AHEAD chunks later, and a
 * process stopped by the system between a chunk's read and its write wakes to LeaseLost instead of
 * writing over the runner that took the job over meanwhile.
 *
 * Stretches without work (nextWork) are skipped as one step: on a large, sparsely written image
 * most chunks are empty, and a chunk each would both cost time and keep the read-ahead from
 * reaching the next chunk that has data.
 */
import type { JobContext } from '../../../core/index.js';
import { uninitialized } from '../engine/index.js';

const AHEAD = 4;

/** Chunk of guest bytes a job examines between checkpoints (a multiple of every cluster size). */
export const JOB_CHUNK = 4 << 20;

export interface ChunkPipeline<T> {
  offset: number;
  size: number;
  ctx: JobContext;
  /**
   * Find and read what chunk [start, end) needs (no lock held: the write re-checks). `buf`
   * (JOB_CHUNK bytes, byte i for offset start + i) is the chunk's own until its apply resolves.
   */
  prepare(start: number, end: number, buf: Uint8Array): Promise<T>;
  /** Write a prepared chunk; the data bytes it moved. */
  apply(work: T): Promise<number>;
  /**
   * The first offset ≥ `from` where prepare could find work, or any offset past `from` up to which
   * there is none (size: none at all). Optional; without it every chunk is prepared.
   */
  nextWork?(from: number): Promise<number>;
}

/** One step of the walk: a chunk to prepare, or (without `work`) a stretch with nothing to do. */
interface Step<T> { start: number; end: number; work?: Promise<T>; buf?: Uint8Array }

export async function runChunkPipeline<T>(p: ChunkPipeline<T>): Promise<void> {
  const { size, ctx } = p;
  const reading: Step<T>[] = [];
  const writing: { start: number; end: number; moved: Promise<number>; buf?: Uint8Array }[] = [];
  const free: Uint8Array[] = [];
  let nextRead = p.offset;
  let chunksAhead = 0;
  const refill = async () => {
    while (chunksAhead < AHEAD && nextRead < size) {
      if (p.nextWork) {
        const found = Math.min(size, await p.nextWork(nextRead));
        const at = Math.max(nextRead, found - (found % JOB_CHUNK));
        if (at > nextRead) {
          reading.push({ start: nextRead, end: at });
          nextRead = at;
          continue;
        }
      }
      const end = Math.min(size, nextRead + JOB_CHUNK);
      const buf = free.pop() ?? uninitialized(JOB_CHUNK);
      const work = p.prepare(nextRead, end, buf);
      work.catch(() => {}); // surfaces when awaited below
      reading.push({ start: nextRead, end, work, buf });
      chunksAhead++;
      nextRead = end;
    }
  };
  const settle = async () => {
    const c = writing.shift()!;
    const moved = await c.moved;
    if (c.buf) free.push(c.buf);
    ctx.advance(c.end - c.start - moved);
    await ctx.checkpoint(moved, { offset: c.end });
  };
  try {
    await refill();
    while (reading.length > 0) {
      const step = reading.shift()!;
      let moved: Promise<number>;
      if (step.work) {
        const work = await step.work;
        chunksAhead--;
        await refill();
        // A pause point before each write (a pause holds the writes, not only the next
        // checkpoint, AHEAD chunks later), which also stops a runner that lost its lease meanwhile.
        await (ctx.pace ? ctx.pace(0) : ctx.checkpoint(0));
        ctx.checkLease();
        moved = p.apply(work);
        moved.catch(() => {});
      } else {
        await refill();
        moved = Promise.resolve(0);
      }
      writing.push({ start: step.start, end: step.end, moved, ...(step.buf ? { buf: step.buf } : {}) });
      if (writing.length >= AHEAD) await settle();
    }
    while (writing.length > 0) await settle();
  } finally {
    // On failure or cancel, nothing may still be running when the caller closes the images.
    await Promise.allSettled([...reading.map((s) => s.work), ...writing.map((c) => c.moved)]);
  }
}

/** How far one nextWork look reaches at most. */
const SCAN_WINDOW = 64 * JOB_CHUNK;

/**
 * A nextWork built from `probe(start, end)`, which says where in [start, end) the first work is
 * (undefined: none). It probes one chunk, then windows twice as large each time, up to
 * SCAN_WINDOW: a densely written image costs one small probe per chunk, a sparse one a few
 * large probes per window.
 */
export async function scanForWork(from: number, size: number, probe: (start: number, end: number) => Promise<number | undefined>): Promise<number> {
  const stop = Math.min(size, from + SCAN_WINDOW);
  for (let at = from, step = JOB_CHUNK; at < stop; at += step, step *= 2) {
    const found = await probe(at, Math.min(stop, at + step));
    if (found !== undefined) return found;
  }
  return stop;
}
