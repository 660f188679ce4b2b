/**
 * block-commit / qemu-img commit: write what `top` and the layers between it and `base` allocate
 * into `base`. Intermediate commit then re-points the layer above `top` at `base`; active commit
 * (top = the image in use) runs as a mirror until completed, then pivots the open image onto base.
 */
import { FailedPrecondition, InvalidArgument, type JobContext } from '../../../core/index.js';
import { openImage } from '../engine/open.js';
import { Qcow2Image } from '../engine/qcow2-image.js';
import { decodeL1, decodeL2, readEntry } from '../format/entries.js';
import type { Image } from '../engine/types.js';
import { asQcow2, assertAbove, assertWritable, backingNameFor, findLayer, layersOf } from './chain-layers.js';
import { relinkChains, switchBacking } from './backing-switch.js';
import { makeEmptyLocked } from './cluster-ops.js';
import { DirtyMap, LiveGate } from './live-gate.js';
import { runChunkPipeline, scanForWork } from './chunk-pipeline.js';
import { JOB_CHUNK, resumeOffset } from './resume.js';

export interface CommitOptions {
  /** The layer to commit (default: the image itself). */
  top?: string | undefined;
  /** Where to commit to (default: top's backing file). */
  base?: string | undefined;
  /** The image is in use: run as a mirror (ready, then pivot on complete). Only with top = image. */
  active?: boolean | undefined;
}

/** What commit reads from the committed layers. */
type Source = Pick<Image, 'read' | 'readInto' | 'blockStatus'>;

/** The prototype's own I/O, bypassing a live gate installed on the object. */
function direct(img: Image): Source {
  const proto = Object.getPrototypeOf(img) as Image;
  return {
    read: (o, l) => proto.read.call(img, o, l),
    readInto: (b, o) => proto.readInto.call(img, b, o),
    blockStatus: (o, l) => proto.blockStatus.call(img, o, l),
  };
}

/**
 * Commit. Resolves with the base image (open read-write) after an active commit pivoted — the
 * `image` object then forwards to it too — and with undefined otherwise.
 */
export async function runCommit(image: Image, opts: CommitOptions, ctx: JobContext): Promise<Image | undefined> {
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
  const limit = b - t;

  const dirty = opts.active ? new DirtyMap(Math.max(top.clusterSize, 64 << 10), top.virtualSize) : undefined;
  const gate = dirty ? new LiveGate(image, dirty) : undefined;
  gate?.install();
  let pivoted = false;
  const base = await openImage(baseLayer.path, { readOnly: false, format: baseLayer.format, deferMetadata: true, writeBehind: true }).catch((e) => {
    gate?.uninstall();
    throw e;
  });
  try {
    const src = direct(top);
    const size = top.virtualSize;
    if (base.virtualSize < size) await base.resize(size);
    ctx.setTotal(size);
    const offset = resumeOffset(ctx.resumeFrom, size, JOB_CHUNK);
    if (offset > 0) ctx.setProgress(offset, size);
    await runChunkPipeline({
      offset, size, ctx,
      prepare: (start, end, buf) => readRange(top, src, limit, start, end, buf),
      apply: (pieces) => writePieces(base, pieces),
      nextWork: (from) => nextAllocated(top, src, limit, from, size),
      // What a checkpoint says is copied must be in base's file first.
      beforeCheckpoint: () => base.flushMetadata(),
    });
    await base.flush();

    if (gate && dirty) {
      await mirror(top, src, limit, base, dirty, ctx);
      // Pivot: hold the writers, drain what is left, make base durable, then switch.
      await gate.quiesce();
      try {
        await syncDirty(top, src, limit, base, dirty, undefined);
        await base.flush();
      } catch (e) {
        gate.uninstall();
        throw e;
      }
      // The top (and its old chain) closes before the switch: nothing is in flight, calls are held.
      await (Object.getPrototypeOf(top) as Image).close.call(top).catch(() => {});
      gate.switchTo(base);
      pivoted = true;
      gate.release();
      return base;
    }

    if (t > 0) {
      // Re-point the layer above top at base; it may be an intermediate opened read-only.
      const above = asQcow2(layers[t - 1]!, 'commit');
      const name = backingNameFor(above, layers[b - 1], baseLayer, image.chain[b - 1]?.backingFilename);
      const writer = above.readOnly ? asQcow2(await openImage(above.path, { readOnly: false, noBacking: true }), 'commit') : above;
      const next = await openImage(baseLayer.path, { readOnly: true, format: baseLayer.format });
      try {
        await switchBacking(above, { name, format: baseLayer.format, image: next }, writer);
      } catch (e) {
        await next.close();
        throw e;
      } finally {
        if (writer !== above) await writer.close();
      }
      relinkChains(image);
    }
    return undefined;
  } catch (e) {
    gate?.uninstall();
    throw e;
  } finally {
    if (!pivoted) await base.close();
  }
}

/** A range the committed layers allocate: data to copy, or zeros. */
interface Allocated { start: number; length: number; zero: boolean }

/**
 * The ranges of [start, end) allocated in the `limit` layers from `top` down. Committing into the
 * direct backing (the usual case) needs only top's own mapping, not a walk of the whole chain.
 */
async function allocatedAbove(top: Image, src: Pick<Image, 'blockStatus'>, limit: number, start: number, end: number): Promise<Allocated[]> {
  if (limit === 1 && top instanceof Qcow2Image) return top.lock.shared(() => ownAllocations(top, start, end));
  return (await src.blockStatus(start, end - start)).filter((s) => s.present && s.depth < limit);
}

/** Where the committed layers next allocate something at or after `from` (or where the look stopped). */
function nextAllocated(top: Image, src: Pick<Image, 'blockStatus'>, limit: number, from: number, size: number): Promise<number> {
  return scanForWork(from, size, async (start, end) => (await allocatedAbove(top, src, limit, start, end))[0]?.start);
}

/** A piece to put into base: zeros, or data read from the committed layers. */
interface Piece { start: number; length: number; data?: Uint8Array }

/**
 * Find and read what [start, end) of the committed layers holds: into `buf` (byte i for offset
 * start + i) when given, else into new buffers.
 */
async function readRange(top: Image, src: Source, limit: number, start: number, end: number, buf?: Uint8Array): Promise<Piece[]> {
  const out: Piece[] = [];
  for (const s of await allocatedAbove(top, src, limit, start, end)) {
    if (s.zero) out.push({ start: s.start, length: s.length });
    else if (buf) out.push({ start: s.start, length: s.length, data: await intoBuffer(src, buf.subarray(s.start - start, s.start - start + s.length), s.start) });
    else out.push({ start: s.start, length: s.length, data: await src.read(s.start, s.length) });
  }
  return out;
}

async function intoBuffer(src: Source, buf: Uint8Array, offset: number): Promise<Uint8Array> {
  await src.readInto(buf, offset);
  return buf;
}

async function writePieces(base: Image, pieces: Piece[]): Promise<number> {
  let moved = 0;
  for (const p of pieces) {
    if (p.data) {
      await base.write(p.start, p.data);
      moved += p.length;
    } else {
      await base.writeZeroes(p.start, p.length);
    }
  }
  return moved;
}

/** Top's own allocated ranges in [start, end), straight from its L2 tables (empty entries cost one compare). */
async function ownAllocations(top: Qcow2Image, start: number, end: number): Promise<Allocated[]> {
  const out: Allocated[] = [];
  const cs = top.cs;
  const push = (at: number, len: number, zero: boolean) => {
    const last = out[out.length - 1];
    if (last && last.zero === zero && last.start + last.length === at) last.length += len;
    else out.push({ start: at, length: len, zero });
  };
  let gc = Math.floor(start / cs);
  const gcEnd = Math.ceil(end / cs);
  while (gc < gcEnd) {
    const l1i = Math.floor(gc / top.l2Entries);
    const stop = Math.min(gcEnd, (l1i + 1) * top.l2Entries);
    const l2 = l1i < top.l1Size ? decodeL1(...readEntry(top.l1, l1i)).l2Offset : 0;
    if (l2 !== 0) {
      const table = await top.l2Table(l2);
      const dv = new DataView(table.buffer, table.byteOffset, table.byteLength);
      for (let c = gc; c < stop; c++) {
        const i = (c % top.l2Entries) * 8;
        const hi = dv.getUint32(i);
        const lo = dv.getUint32(i + 4);
        if (hi === 0 && lo === 0) continue;
        const kind = decodeL2(hi, lo, top.h.clusterBits).kind;
        if (kind === 'unallocated') continue;
        const at = Math.max(start, c * cs);
        push(at, Math.min(end, (c + 1) * cs) - at, kind === 'zero');
      }
    }
    gc = stop;
  }
  return out;
}

/** Copy the ranges of [start, end) allocated in the committed layers into base; data bytes moved. */
async function commitRange(top: Image, src: Source, limit: number, base: Image, start: number, end: number): Promise<number> {
  return writePieces(base, await readRange(top, src, limit, start, end));
}

/** Progress of the mirror phase: the total grows by what writers dirty. */
interface MirrorProgress { ctx: JobContext; total: number }

/** Copy the ranges dirty now into base (growing base with the top); bytes moved. */
async function syncDirty(top: Image, src: Source, limit: number, base: Image, dirty: DirtyMap,
  progress: MirrorProgress | undefined): Promise<number> {
  let moved = 0;
  if (base.virtualSize < top.virtualSize) await base.resize(top.virtualSize);
  const runs = dirty.takeAll(JOB_CHUNK);
  if (progress) {
    progress.total += runs.reduce((n, r) => n + (r.end - r.start), 0);
    progress.ctx.setTotal(progress.total);
  }
  for (const r of runs) {
    const end = Math.min(r.end, top.virtualSize);
    if (r.start >= end) continue;
    const n = await commitRange(top, src, limit, base, r.start, end);
    moved += n;
    if (progress) {
      progress.ctx.advance(r.end - r.start - n);
      await progress.ctx.checkpoint(n);
    }
  }
  return moved;
}

/** Converge, report ready, then keep base in sync until the user completes (or cancels). */
async function mirror(top: Image, src: Source, limit: number, base: Image, dirty: DirtyMap, ctx: JobContext): Promise<void> {
  const progress: MirrorProgress = { ctx, total: top.virtualSize };
  // Converge: a few passes over what writers dirtied meanwhile (writers may never stop).
  for (let pass = 0; pass < 3 && !dirty.empty(); pass++) await syncDirty(top, src, limit, base, dirty, progress);
  await base.flush();
  ctx.ready();
  let completed = false;
  const done = ctx.waitForComplete().then(() => { completed = true; });
  // A rejection (cancel) surfaces through the race below; keep it from being unhandled meanwhile.
  done.catch(() => {});
  while (!completed) {
    const changed = dirty.changed();
    if (dirty.empty()) await Promise.race([done, changed]);
    if (!completed) await syncDirty(top, src, limit, base, dirty, progress);
  }
}

/** Unallocate every cluster of a qcow2 image (qemu-img commit without -d does this to the top). */
export async function makeEmpty(image: Image): Promise<void> {
  const img = asQcow2(image, 'make empty');
  assertWritable(img, 'make empty');
  await img.lock.exclusive(() => makeEmptyLocked(img));
  await img.flush();
}

