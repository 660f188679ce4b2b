/**
 * block-commit / qemu-img commit: write what `top` and the layers between it and `base` allocate
 * into `base`. Intermediate commit then re-points the layer above `top` at `base`; active commit
 * (top = the image in use) runs as a mirror until completed, then pivots the open image onto base.
 */
import { closeAfter, FailedPrecondition, InvalidArgument, resumeOffset, type JobContext } from '../../../core/index.js';
import { openImage, type DirtyMap, type Image } from '../engine/index.js';
import { assertAbove, assertQcow2, assertWritable, backingNameFor, findLayer, layersOf } from './chain-layers.js';
import { JOB_CHUNK, runChunkPipeline, scanForWork } from './chunk-pipeline.js';

export interface CommitOptions {
  /** The layer to commit (default: the image itself). */
  top?: string | undefined;
  /** Where to commit to (default: top's backing file). */
  base?: string | undefined;
  /** The image is in use: run as a mirror (ready, then pivot on complete). Only with top = image. */
  active?: boolean | undefined;
  /** Active commit: pivot as soon as base is in sync, without waiting for complete (virsh blockcommit --pivot). */
  pivotWhenReady?: boolean | undefined;
  /**
   * Active commit: how the pivot runs (the caller's lock around it, say); `pivot` holds the
   * writers, drains the old top into base, makes base durable, calls `record`, then switches.
   */
  aroundPivot?: ((pivot: () => Promise<void>) => Promise<void>) | undefined;
  /**
   * Active commit: called while the writers are held, base in sync and durable, before the image
   * switches to base: the caller records that base is the active layer now (a crash after it
   * finds every acknowledged write in base). If it throws, the image stays on top.
   */
  record?: (() => void | Promise<void>) | undefined;
}

/** The committed layers: `top` and those above `base` (a layer of top's chain). */
interface Committed { top: Image; base: Image }

/**
 * Commit. Resolves with true after an active commit pivoted (the `image` object then serves the
 * base, opened read-write), false otherwise.
 */
export async function runCommit(image: Image, opts: CommitOptions, ctx: JobContext): Promise<boolean> {
  const layers = layersOf(image);
  const t = opts.top !== undefined && opts.top !== '' ? findLayer(image, opts.top, 'top') : 0;
  const top = layers[t]!;
  if (t + 1 >= layers.length) {
    throw new FailedPrecondition(`commit ${top.path}: Image does not have a backing file`, {
      ref: top.path, hint: 'commit needs an overlay (an image with a backing file)',
    });
  }
  const b = opts.base !== undefined && opts.base !== '' ? findLayer(image, opts.base, 'base') : t + 1;
  assertAbove(image, t, b);
  if (opts.active && t !== 0) {
    throw new InvalidArgument(`commit ${image.path}: active commit needs top = the active image (it was ${top.path})`, {
      ref: image.path, hint: 'leave out top, or run an intermediate commit without active',
    });
  }
  if (t > 0 || opts.active) assertWritable(image, 'commit');
  const baseLayer = layers[b]!;
  const from: Committed = { top, base: baseLayer };

  // Writes are tracked from before the first copy, so nothing written meanwhile is missed.
  const dirty = opts.active ? image.trackWrites(Math.max(top.clusterSize, 64 << 10)) : undefined;
  let pivoted = false;
  let base: Image | undefined;
  let undo: (() => void) | undefined;
  try {
    base = await openImage(baseLayer.path, { readOnly: false, format: baseLayer.format, deferMetadata: true, writeBehind: true });
    const into = base;
    // What a saved checkpoint says is copied must be in base's file first.
    undo = ctx.beforeSave(() => into.flushMetadata());
    const size = top.virtualSize;
    if (into.virtualSize < size) await into.resize(size);
    ctx.setTotal(size);
    // An active commit starts over when resumed, as QEMU's mirror does: the writes its last run
    // tracked were in that process's memory only, so a saved offset would skip what they changed.
    const offset = opts.active ? 0 : resumeOffset(ctx.resumeFrom, size, JOB_CHUNK);
    if (offset > 0) ctx.setProgress(offset, size);
    await runChunkPipeline({
      offset, size, ctx,
      prepare: (start, end, buf) => readRange(from, start, end, buf),
      apply: (pieces) => writePieces(into, pieces, ctx),
      nextWork: (at) => scanForWork(at, size, async (start, end) => (await from.top.allocatedAbove(start, end - start, from.base))[0]?.start),
    });
    await into.flush();

    if (dirty) {
      await mirror(from, into, dirty, ctx, opts.pivotWhenReady === true);
      await ctx.confirmLease();
      // Pivot: hold the writers, drain what is left from the old top, make base durable, then switch.
      const pivot = () => image.pivot(into, async (old) => {
        await syncDirty({ top: old, base: baseLayer }, into, dirty, ctx, false);
        await into.flush();
        await opts.record?.();
      });
      await (opts.aroundPivot ? opts.aroundPivot(pivot) : pivot());
      pivoted = true;
      return true;
    }

    if (t > 0) {
      // Re-point the layer above top at base (the engine writes the header of a read-only layer itself).
      const above = layers[t - 1]!;
      assertQcow2(above, 'commit');
      const name = backingNameFor(above, layers[b - 1], baseLayer, image.chain[b - 1]?.backingFilename);
      await ctx.confirmLease();
      const next = await openImage(baseLayer.path, { readOnly: true, format: baseLayer.format });
      try {
        await above.setBacking({ name, format: baseLayer.format, image: next });
      } catch (e) {
        await next.close();
        throw e;
      }
    }
    return false;
  } finally {
    undo?.();
    dirty?.stop();
    if (!pivoted) await base?.close(closeAfter(ctx));
  }
}

/** A piece to put into base: zeros, or data read from the committed layers. */
interface Piece { start: number; length: number; data?: Uint8Array }

/**
 * Find and read what [start, end) of the committed layers holds: into `buf` (byte i for offset
 * start + i) when given, else into new buffers.
 */
async function readRange(from: Committed, start: number, end: number, buf?: Uint8Array): Promise<Piece[]> {
  const out: Piece[] = [];
  for (const a of await from.top.allocatedAbove(start, end - start, from.base)) {
    if (a.zero) {
      out.push({ start: a.start, length: a.length });
    } else if (buf) {
      const data = buf.subarray(a.start - start, a.start - start + a.length);
      await from.top.readInto(data, a.start);
      out.push({ start: a.start, length: a.length, data });
    } else {
      out.push({ start: a.start, length: a.length, data: await from.top.read(a.start, a.length) });
    }
  }
  return out;
}

/** Write pieces into base, each right after a lease check (the reads before may have outlasted it). */
async function writePieces(base: Image, pieces: Piece[], ctx: JobContext): Promise<number> {
  let moved = 0;
  for (const p of pieces) {
    ctx.checkLease();
    if (p.data) {
      await base.write(p.start, p.data);
      moved += p.length;
    } else {
      await base.writeZeroes(p.start, p.length);
    }
  }
  return moved;
}

/** Copy the ranges of [start, end) allocated in the committed layers into base; data bytes moved. */
async function commitRange(from: Committed, base: Image, start: number, end: number, ctx: JobContext): Promise<number> {
  return writePieces(base, await readRange(from, start, end), ctx);
}

/** Progress of the mirror phase: the total grows by what writers dirty. */
interface MirrorProgress { total: number }

/**
 * Copy the ranges dirty now into base (growing base with the top); bytes moved. With `progress`,
 * counted in the job's progress and checkpointed after each run (not at the pivot, whose writers
 * are held).
 */
async function syncDirty(from: Committed, base: Image, dirty: DirtyMap, ctx: JobContext, progress: MirrorProgress | false): Promise<number> {
  const top = from.top;
  let moved = 0;
  ctx.checkLease();
  if (base.virtualSize < top.virtualSize) await base.resize(top.virtualSize);
  const runs = dirty.takeAll(JOB_CHUNK);
  if (progress) {
    progress.total += runs.reduce((n, r) => n + (r.end - r.start), 0);
    ctx.setTotal(progress.total);
  }
  for (const r of runs) {
    const end = Math.min(r.end, top.virtualSize);
    if (r.start >= end) continue;
    const n = await commitRange(from, base, r.start, end, ctx);
    moved += n;
    if (progress) {
      ctx.advance(r.end - r.start - n);
      await ctx.checkpoint(n);
    }
  }
  return moved;
}

/** Converge, report ready, then keep base in sync until the user completes (or cancels; or at once with `pivotWhenReady`). */
async function mirror(from: Committed, base: Image, dirty: DirtyMap, ctx: JobContext, pivotWhenReady: boolean): Promise<void> {
  const progress: MirrorProgress = { total: from.top.virtualSize };
  // Converge: a few passes over what writers dirtied meanwhile (writers may never stop).
  for (let pass = 0; pass < 3 && !dirty.empty(); pass++) await syncDirty(from, base, dirty, ctx, progress);
  await base.flush();
  ctx.ready();
  if (pivotWhenReady) return;
  let completed = false;
  const done = ctx.waitForComplete().then(() => { completed = true; });
  // A rejection (cancel) surfaces through the race below; keep it from being unhandled meanwhile.
  done.catch(() => {});
  while (!completed) {
    const changed = dirty.changed();
    if (dirty.empty()) await Promise.race([done, changed]);
    if (!completed) await syncDirty(from, base, dirty, ctx, progress);
  }
}

/** Unallocate every cluster of a qcow2 image (qemu-img commit without -d does this to the top). */
export async function makeEmpty(image: Image): Promise<void> {
  assertQcow2(image, 'make empty');
  assertWritable(image, 'make empty');
  await image.makeEmpty();
}

