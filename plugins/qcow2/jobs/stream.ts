/**
 * block-stream: make an image independent of the layers above `base` (or of its whole chain).
 * Runs on the open image while it is in use; see copy-on-read.ts for why writers win races.
 */
import { resumeOffset, type JobContext } from '../../../core/index.js';
import { openImage, type Image } from '../engine/index.js';
import { assertAbove, assertQcow2, assertWritable, backingNameFor, findLayer, layersOf } from './chain-layers.js';
import { applyFills, groupClusters, readPaddedInto, unallocatedRuns, type Fill } from './copy-on-read.js';
import { JOB_CHUNK, runChunkPipeline, scanForWork } from './chunk-pipeline.js';

export interface StreamOptions {
  /** Keep this layer (and those below it) as the backing; absent or '' = flatten the whole chain. */
  base?: string | undefined;
}

export async function runStream(img: Image, opts: StreamOptions, ctx: JobContext): Promise<void> {
  assertQcow2(img, 'stream');
  assertWritable(img, 'stream');
  const layers = layersOf(img);
  let baseIndex = layers.length;
  if (opts.base !== undefined && opts.base !== '') {
    baseIndex = findLayer(img, opts.base, 'base');
    assertAbove(img, 0, baseIndex);
  }
  const base = layers[baseIndex];
  // Depth in the backing's own status (0 = img.backing) below which a range is "above base".
  const limit = baseIndex - 1;
  const size = img.virtualSize;
  ctx.setTotal(size);
  const offset = resumeOffset(ctx.resumeFrom, size, JOB_CHUNK);
  if (offset > 0) ctx.setProgress(offset, size);

  // What a saved checkpoint says is copied must be referenced in the image's file first.
  const undo = ctx.beforeSave(() => img.flushMetadata());
  try {
    await runChunkPipeline({
      offset, size, ctx,
      prepare: (start, end, buf) => prepareChunk(img, start, end, buf, limit, base !== undefined),
      apply: (fills) => applyFills(img, fills),
      nextWork: (from) => nextToFill(img, from, limit),
    });
  } finally {
    undo();
  }

  // Switching the backing file is the step another runner must not see twice.
  await ctx.confirmLease();
  const above = layers[baseIndex - 1]!;
  const name = base ? backingNameFor(img, above, base, img.chain[baseIndex - 1]?.backingFilename) : undefined;
  const next = base ? await openImage(base.path, { readOnly: true, format: base.format }) : undefined;
  try {
    await img.setBacking({ name, format: base?.format, image: next });
  } catch (e) {
    await next?.close();
    throw e;
  }
}

/**
 * The first offset at or after `from` that may need filling: unallocated in the image, present
 * in a layer above base (or where the look stopped).
 */
function nextToFill(img: Image, from: number, limit: number): Promise<number> {
  const backing = img.backing;
  if (!backing || limit <= 0) return Promise.resolve(img.virtualSize);
  return scanForWork(from, img.virtualSize, async (start, end) => {
    for (const run of await unallocatedRuns(img, start, end)) {
      const inBacking = Math.min(run.end, backing.virtualSize);
      if (inBacking <= run.start) continue;
      const hit = (await backing.blockStatus(run.start, inBacking - run.start)).find((s) => s.present && s.depth < limit);
      if (hit) return hit.start;
    }
    return undefined;
  });
}

/**
 * What one chunk needs: the chain's data for the clusters the image leaves unallocated, read into
 * the chunk's buffer (`buf`, byte i for offset start + i).
 */
async function prepareChunk(img: Image, start: number, end: number, buf: Uint8Array, limit: number, keepBase: boolean): Promise<Fill[]> {
  const backing = img.backing;
  if (!backing || limit <= 0) return [];
  const fills: Fill[] = [];
  for (const run of await unallocatedRuns(img, start, end)) {
    const inBacking = Math.min(run.end, backing.virtualSize);
    if (inBacking <= run.start) continue;
    const status = await backing.blockStatus(run.start, inBacking - run.start);
    const groups = groupClusters(run.start, run.end, img.clusterSize, status, (over) => {
      if (!over.some((s) => s.present && s.depth < limit)) return 'skip';
      // Content that reads as zero: a zero cluster if a base stays below, else nothing at all.
      if (over.every((s) => s.zero)) return keepBase ? 'zero' : 'skip';
      return 'data';
    });
    for (const g of groups) {
      if (g.kind === 'skip') continue;
      if (g.kind === 'zero') fills.push({ start: g.start, end: g.end, kind: 'zero' });
      else fills.push({ start: g.start, end: g.end, kind: 'data', data: await readPaddedInto(backing, buf.subarray(g.start - start, g.end - start), g.start) });
    }
  }
  return fills;
}
