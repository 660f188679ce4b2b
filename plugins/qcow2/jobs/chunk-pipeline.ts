/**
 * The copy loop shared by stream and commit. The range [offset, size) is taken in JOB_CHUNK
 * chunks: the next AHEAD chunks are found and read while earlier ones are written, up to AHEAD
 * chunks are written at once, and chunks are checkpointed in order, so a saved offset never
 * passes a chunk that is not done. Memory is bounded by AHEAD chunks read and AHEAD written.
 */
import type { JobContext } from '../../../core/index.js';
import { JOB_CHUNK } from './resume.js';

const AHEAD = 4;

export interface ChunkPipeline<T> {
  offset: number;
  size: number;
  ctx: JobContext;
  /** Find and read what chunk [start, end) needs (no lock held: the write re-checks). */
  prepare(start: number, end: number): Promise<T>;
  /** Write a prepared chunk; the data bytes it moved. */
  apply(work: T): Promise<number>;
  /** Runs before each checkpoint is saved (e.g. write deferred metadata). */
  beforeCheckpoint?(): Promise<void>;
}

export async function runChunkPipeline<T>(p: ChunkPipeline<T>): Promise<void> {
  const { size, ctx } = p;
  const reading: Promise<T>[] = [];
  const writing: { start: number; end: number; moved: Promise<number> }[] = [];
  let nextRead = p.offset;
  const refill = () => {
    while (reading.length < AHEAD && nextRead < size) {
      const r = p.prepare(nextRead, Math.min(size, nextRead + JOB_CHUNK));
      r.catch(() => {}); // surfaces when awaited below
      reading.push(r);
      nextRead = Math.min(size, nextRead + JOB_CHUNK);
    }
  };
  const settle = async () => {
    const c = writing.shift()!;
    const moved = await c.moved;
    ctx.advance(c.end - c.start - moved);
    await p.beforeCheckpoint?.();
    await ctx.checkpoint(moved, { offset: c.end });
  };
  let offset = p.offset;
  try {
    refill();
    while (offset < size) {
      const end = Math.min(size, offset + JOB_CHUNK);
      const work = await reading.shift()!;
      refill();
      const moved = p.apply(work);
      moved.catch(() => {});
      writing.push({ start: offset, end, moved });
      if (writing.length >= AHEAD) await settle();
      offset = end;
    }
    while (writing.length > 0) await settle();
  } finally {
    // On failure or cancel, nothing may still be running when the caller closes the images.
    await Promise.allSettled([...reading, ...writing.map((c) => c.moved)]);
  }
}
