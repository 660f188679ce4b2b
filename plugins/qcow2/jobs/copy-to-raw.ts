/**
 * Copying a chain into a raw file (the seed of streaming into a SAN LUN). A raw target has no
 * allocation metadata to tell what was already copied, so the copy keeps an external record
 * `<target>.progress` beside it: a JSON header naming the source and its size, and the offset
 * below which everything is copied, written only after that data is flushed to the target. An
 * interrupted copy resumes from the record (whatever its job context remembers); it is removed
 * when the copy is done. The copy itself is the core copier's.
 */
import { open, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import { copyData, InvalidArgument, type JobContext, type JobTask } from '../../../core/index.js';
import { fileError, imageDevice, openImage, type Image } from '../engine/index.js';

const MAGIC = 'offload-raw-progress';

interface ProgressRecord { magic: string; version: 2; source: string; size: number; offset: number }

/**
 * Data bytes the copier's native fast path takes at a time: each step ends in a checkpoint, which
 * moves the record on when its job context saves one (at most once a second in the broker; every
 * time in the kill tests).
 */
const STEP = 1 << 20;

export function progressPathFor(target: string): string {
  return `${target}.progress`;
}

/** The offset a record of this copy vouches for, or undefined (then the copy starts over). */
async function loadRecord(path: string, source: string, size: number): Promise<number | undefined> {
  try {
    const r = JSON.parse(await readFile(path, 'utf8')) as ProgressRecord;
    if (r.magic !== MAGIC || r.version !== 2 || r.source !== source || r.size !== size) return undefined;
    return Number.isSafeInteger(r.offset) && r.offset >= 0 && r.offset <= size ? r.offset : undefined;
  } catch {
    return undefined;
  }
}

/** Write the record durably (a new file renamed over the old one is more than we need: it is small and rewritten whole). */
async function saveRecord(path: string, record: ProgressRecord): Promise<void> {
  await writeFile(path, JSON.stringify(record));
  const fh = await open(path, 'r+');
  try { await fh.datasync(); } finally { await fh.close(); }
}

/**
 * Copy the whole chain content of `source` into the raw file `targetPath` (created sparse, or
 * resumed from its record). Zero ranges are left as holes. Progress is in data bytes.
 */
export async function copyToRaw(source: Image, targetPath: string, ctx: JobContext): Promise<void> {
  const size = source.virtualSize;
  const target = resolve(targetPath);
  if (resolve(source.path) === target) {
    throw new InvalidArgument(`copy ${source.path}: the target is the source`, { ref: target, hint: 'name another target file' });
  }
  const recordPath = progressPathFor(target);
  const base = { magic: MAGIC, version: 2 as const, source: resolve(source.path), size };
  const sameSize = await stat(target).then((s) => s.size === size, () => false);
  let start = sameSize ? await loadRecord(recordPath, base.source, size) : undefined;
  if (start === undefined) {
    // Fresh start: a sparse target first, then the record that vouches for it.
    try {
      const fh = await open(target, 'w+');
      try {
        await fh.truncate(size);
        await fh.datasync();
      } finally {
        await fh.close();
      }
    } catch (e) {
      throw fileError(e, target, 'create');
    }
    await saveRecord(recordPath, { ...base, offset: 0 });
    start = 0;
  }
  const out = await openImage(target, { format: 'raw', readOnly: false });
  // Each saved checkpoint moves the record on, after the data below it is on disk.
  const undo = ctx.beforeSave(async (state) => {
    const offset = (state as { offset?: unknown } | undefined)?.offset;
    if (typeof offset !== 'number') return;
    await out.flush();
    await saveRecord(recordPath, { ...base, offset });
  });
  try {
    await copyData(await imageDevice(source, { mode: 'r' }), await imageDevice(out, { mode: 'rw' }), ctx, { targetFresh: true, startAt: start, window: STEP });
  } finally {
    undo();
    await out.close();
  }
  await rm(recordPath, { force: true });
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
