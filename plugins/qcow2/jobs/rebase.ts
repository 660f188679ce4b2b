/**
 * qemu-img rebase. Safe: copy into the image every cluster it does not allocate whose content
 * differs between the old and the new backing chain, flush, then rewrite the header (so a kill
 * never leaves an image pointing at a backing that lacks its data — qemu-img 7.2's `-b ''` bug).
 * Unsafe (`-u`): the header only.
 */
import { dirname, isAbsolute, join, resolve } from 'node:path';
import { InvalidArgument, resumeOffset, type JobContext } from '../../../core/index.js';
import { probeFormat, type Image, type ImageFormat } from '../engine/index.js';
import { assertQcow2, assertWritable, layersOf, openBackingOf } from './chain-layers.js';
import { applyFills, groupClusters, readPadded, unallocatedRuns, type Fill } from './copy-on-read.js';
import { JOB_CHUNK } from './chunk-pipeline.js';

export interface RebaseOptions {
  /** New backing file name, stored as given (relative to the image's folder); '' = none. */
  backing: string;
  /** Format of the new backing file (probed when absent). */
  backingFormat?: string | undefined;
  /** Header only: do not compare or copy any data. */
  unsafe?: boolean | undefined;
}

export async function runRebase(img: Image, opts: RebaseOptions, ctx: JobContext): Promise<void> {
  assertQcow2(img, 'rebase');
  assertWritable(img, 'rebase');
  if (opts.backingFormat !== undefined && opts.backingFormat !== 'qcow2' && opts.backingFormat !== 'raw') {
    throw new InvalidArgument(`rebase ${img.path}: unknown backing format ${JSON.stringify(opts.backingFormat)}`, {
      ref: img.path, hint: 'use qcow2 or raw',
    });
  }
  const name = opts.backing === '' ? undefined : opts.backing;
  let fmt = opts.backingFormat as ImageFormat | undefined;
  let next: Image | undefined;
  if (name !== undefined) {
    const full = isAbsolute(name) ? name : join(dirname(img.path), name);
    if (opts.unsafe) {
      // The new backing may not exist yet (-u is how users fix paths); reads then see zeros.
      fmt ??= await probeFormat(full).catch(() => undefined);
      next = await openBackingOf(img, name, fmt).catch(() => undefined);
    } else {
      fmt ??= await probeFormat(full);
      next = await openBackingOf(img, name, fmt);
    }
  }
  const undo = ctx.beforeSave(() => img.flushMetadata());
  try {
    const size = img.virtualSize;
    ctx.setTotal(opts.unsafe ? 0 : size);
    if (!opts.unsafe) {
      let offset = resumeOffset(ctx.resumeFrom, size, JOB_CHUNK);
      if (offset > 0) ctx.setProgress(offset, size);
      const same = sharedDepth(img, next);
      while (offset < size) {
        const end = Math.min(size, offset + JOB_CHUNK);
        const moved = await rebaseChunk(img, next, same, offset, end, ctx);
        ctx.advance(end - offset - moved);
        await ctx.checkpoint(moved, { offset: end });
        offset = end;
      }
    }
    await img.setBacking({ name, format: fmt, image: next });
  } catch (e) {
    await next?.close();
    throw e;
  } finally {
    undo();
  }
}

/**
 * When the new backing is a layer of the old chain, ranges that come from it or below read the
 * same either way: the depth (in the old backing's status) from which that holds.
 */
function sharedDepth(img: Image, next: Image | undefined): number {
  if (!next) return Infinity;
  const layers = layersOf(img);
  const i = layers.findIndex((l, k) => k > 0 && resolve(l.path) === resolve(next.path));
  return i < 0 ? Infinity : i - 1;
}

async function rebaseChunk(img: Image, next: Image | undefined, same: number, start: number, end: number, ctx: JobContext): Promise<number> {
  const old = img.backing;
  const cs = img.clusterSize;
  const fills: Fill[] = [];
  for (const run of await unallocatedRuns(img, start, end)) {
    const oldStatus = old && run.start < old.virtualSize ? await old.blockStatus(run.start, Math.min(run.end, old.virtualSize) - run.start) : [];
    const newStatus = next && run.start < next.virtualSize ? await next.blockStatus(run.start, Math.min(run.end, next.virtualSize) - run.start) : [];
    const newZero = (c: number, ce: number) => zeroIn(newStatus, c, ce);
    const groups = groupClusters(run.start, run.end, cs, oldStatus, (over, c, ce) => {
      if (over.every((s) => !s.present || s.depth >= same)) return 'skip';
      const oldZero = over.every((s) => s.zero);
      if (oldZero && newZero(c, ce)) return 'skip';
      return oldZero ? 'zero' : 'data';
    });
    for (const g of groups) {
      if (g.kind === 'skip') continue;
      // Compare cluster by cluster; copy the old content only where the new chain differs.
      const oldData = g.kind === 'data' ? await readPadded(old!, g.start, g.end) : new Uint8Array(g.end - g.start);
      const newData = next ? await readPadded(next, g.start, g.end) : new Uint8Array(g.end - g.start);
      for (let c = g.start; c < g.end; c += cs) {
        const ce = Math.min(g.end, c + cs);
        const a = oldData.subarray(c - g.start, ce - g.start);
        if (equal(a, newData.subarray(c - g.start, ce - g.start))) continue;
        const kind = g.kind === 'zero' || a.every((x) => x === 0) ? 'zero' : 'data';
        const last = fills[fills.length - 1];
        if (last && last.end === c && last.kind === kind && last.start >= g.start) last.end = ce;
        else fills.push({ start: c, end: ce, kind });
      }
      for (const f of fills) {
        if (f.kind === 'data' && f.data === undefined && f.start >= g.start) f.data = oldData.subarray(f.start - g.start, f.end - g.start);
      }
    }
  }
  ctx.checkLease(); // the reads may have outlasted the lease (JobContext.checkLease)
  return applyFills(img, fills);
}

/** Whether the status list says [c, ce) reads as zeros (ranges past the list read as zeros too). */
function zeroIn(status: { start: number; length: number; zero: boolean }[], c: number, ce: number): boolean {
  return status.every((s) => s.start + s.length <= c || s.start >= ce || s.zero);
}

function equal(a: Uint8Array, b: Uint8Array): boolean {
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));
}
