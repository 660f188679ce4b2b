/**
 * Streaming a chain into a raw file. Raw has no allocation metadata to tell what was already
 * copied, so the copy keeps an external progress bitmap `<target>.progress` beside the target:
 * a JSON header naming the source, its size and the granularity, then one bit per chunk. A bit
 * is set only after that chunk's data is flushed to the target, so an interrupted copy resumes
 * from the bitmap instead of starting over. The file is removed when the copy is done.
 */
import { open, rm, stat, type FileHandle } from 'node:fs/promises';
import { resolve } from 'node:path';
import { InvalidArgument, type JobContext, type JobTask } from '../../../core/index.js';
import { fileError, openImage, type Image } from '../engine/index.js';
import { JOB_CHUNK } from './resume.js';

const HEADER_BYTES = 4096;
const MAGIC = 'offload-raw-progress';
/** Chunks whose bits are persisted together (after one flush of the target). */
const PERSIST_EVERY = 4;

interface ProgressHeader { magic: string; version: 1; source: string; size: number; granularity: number }

export function progressPathFor(target: string): string {
  return `${target}.progress`;
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(() => true, () => false);
}

/** Load a bitmap that matches this copy, or undefined (then the copy starts over). */
async function loadBitmap(path: string, want: ProgressHeader, chunks: number): Promise<Uint8Array | undefined> {
  let fh: FileHandle | undefined;
  try {
    fh = await open(path, 'r');
    const head = new Uint8Array(HEADER_BYTES);
    await fh.read(head, 0, HEADER_BYTES, 0);
    const text = new TextDecoder().decode(head).replace(/[\s\0]+$/, '');
    const h = JSON.parse(text) as ProgressHeader;
    if (h.magic !== MAGIC || h.version !== 1 || h.source !== want.source || h.size !== want.size || h.granularity !== want.granularity) return undefined;
    const bits = new Uint8Array(Math.ceil(chunks / 8));
    await fh.read(bits, 0, bits.length, HEADER_BYTES);
    return bits;
  } catch {
    return undefined;
  } finally {
    await fh?.close();
  }
}

/**
 * Copy the whole chain content of `source` into the raw file `targetPath` (created sparse, or
 * resumed from its progress bitmap). Zero ranges are left as holes.
 */
export async function copyToRaw(source: Image, targetPath: string, ctx: JobContext): Promise<void> {
  const size = source.virtualSize;
  const target = resolve(targetPath);
  if (resolve(source.path) === target) {
    throw new InvalidArgument(`copy ${source.path}: the target is the source`, { ref: target, hint: 'name another target file' });
  }
  const chunks = Math.ceil(size / JOB_CHUNK);
  const header: ProgressHeader = { magic: MAGIC, version: 1, source: resolve(source.path), size, granularity: JOB_CHUNK };
  const bmPath = progressPathFor(target);
  let bits = (await exists(target)) && (await stat(target)).size === size ? await loadBitmap(bmPath, header, chunks) : undefined;

  let out: FileHandle;
  let bm: FileHandle;
  try {
    if (!bits) {
      // Fresh start: a sparse target first, then the bitmap that vouches for it.
      out = await open(target, 'w+');
      await out.truncate(size);
      await out.datasync();
      bits = new Uint8Array(Math.ceil(chunks / 8));
      bm = await open(bmPath, 'w+');
      const head = new Uint8Array(HEADER_BYTES).fill(0x20);
      head.set(new TextEncoder().encode(JSON.stringify(header)));
      await bm.write(head, 0, HEADER_BYTES, 0);
      await bm.write(bits, 0, bits.length, HEADER_BYTES);
      await bm.datasync();
    } else {
      out = await open(target, 'r+');
      bm = await open(bmPath, 'r+');
    }
  } catch (e) {
    throw fileError(e, target, 'create');
  }

  try {
    const done = (i: number) => (bits![i >> 3]! & (1 << (i & 7))) !== 0;
    let already = 0;
    for (let i = 0; i < chunks; i++) if (done(i)) already += Math.min(JOB_CHUNK, size - i * JOB_CHUNK);
    ctx.setTotal(size);
    if (already > 0) ctx.setProgress(already, size);
    let pending: number[] = [];
    const persist = async () => {
      if (pending.length === 0) return;
      await out.datasync();
      for (const i of pending) {
        bits![i >> 3]! |= 1 << (i & 7);
        await bm.write(bits!, i >> 3, 1, HEADER_BYTES + (i >> 3));
      }
      pending = [];
    };
    for (let i = 0; i < chunks; i++) {
      if (done(i)) continue;
      const start = i * JOB_CHUNK;
      const end = Math.min(size, start + JOB_CHUNK);
      let moved = 0;
      for (const s of await source.blockStatus(start, end - start)) {
        if (s.zero) continue;
        const data = await source.read(s.start, s.length);
        await out.write(data, 0, data.length, s.start);
        moved += data.length;
      }
      pending.push(i);
      if (pending.length >= PERSIST_EVERY) await persist();
      ctx.advance(end - start - moved);
      await ctx.checkpoint(moved, { chunk: i + 1 });
    }
    await persist();
    await out.datasync();
  } finally {
    await out.close();
    await bm.close();
  }
  await rm(bmPath, { force: true });
}

/** A JobTask copying the chain of `sourcePath` into the raw file `targetPath` (resumable). */
export function rawCopyTask(sourcePath: string, targetPath: string): JobTask {
  return {
    type: 'copy',
    params: { source: sourcePath, target: targetPath, format: 'raw' },
    run: async (ctx) => {
      const src = await openImage(sourcePath, { readOnly: true });
      try {
        await copyToRaw(src, targetPath, ctx);
      } finally {
        await src.close();
      }
    },
  };
}
