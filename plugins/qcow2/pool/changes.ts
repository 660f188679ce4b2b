/**
 * `data.dirty` for the pool: what changed between two points of a volume, read from the chain
 * itself rather than from a bitmap, so that no crash can make it wrong. Each point is a layer (a
 * snapshot's frozen layer, or the active one) whose chain is its content. Below their nearest
 * common layer both read the same; a range differs only where a layer above it, on either side,
 * allocates it (bdrv_is_allocated_above on each side). So snapshots deleted since, reverts and
 * streams in between all give a right answer (at worst a wider one), in clusters.
 */
import {
  InvalidArgument, NotFound, OutOfRange, type ChangedExtents, type ChangedExtentsRequest,
} from '../../../core/index.js';
import type { Allocation, Image } from '../engine/index.js';
import type { PoolState } from './pool-state.js';

export async function changedExtents(p: PoolState, volume: string, req: ChangedExtentsRequest): Promise<ChangedExtents> {
  p.needLayers('changed-block tracking');
  const v = p.mustVolume(volume);
  const snap = (name: string) => {
    const s = p.meta.snapshot(volume, name);
    const sref = `${p.ref(volume)}@${name}`;
    if (!s) throw new NotFound(`snapshot ${sref} does not exist`, { ref: sref, hint: `list them with \`offload snapshot list ${p.ref(volume)}\`` });
    return s;
  };
  const since = snap(req.since);
  const until = req.until !== undefined ? snap(req.until) : undefined;
  if (until && until.createdAt < since.createdAt) {
    throw new InvalidArgument(`${p.ref(volume)}@${req.until} was taken before ${p.ref(volume)}@${req.since}`, {
      ref: p.ref(volume), hint: 'give the earlier snapshot as since',
    });
  }
  const size = until ? until.sizeBytes : v.sizeBytes;
  const offset = req.offset ?? 0;
  const length = req.length ?? Math.max(0, size - offset);
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    throw new InvalidArgument(`changed extents of ${p.ref(volume)}: bad range ${String(offset)}+${String(length)}`, { ref: p.ref(volume) });
  }
  if (offset > size) throw new OutOfRange(`changed extents of ${p.ref(volume)}: offset ${offset} is past its end (${size} bytes)`, { ref: p.ref(volume) });
  const end = Math.min(size, offset + length);
  const granularity = p.opts.clusterSize;
  if (until?.layer === since.layer || end === offset) return { extents: [], granularity, sizeBytes: size };

  const topFile = until ? until.layer : v.active;
  const sinceChain = new Set(p.meta.chain(since.layer).map((l) => l.file));
  const common = p.meta.chain(topFile).find((l) => sinceChain.has(l.file))?.file;
  const ranges: Allocation[] = [];
  // The later side: the volume's open image when this process has it open (its writes are
  // there), else the layer read-only.
  const open = !until ? p.open.get(volume) : undefined;
  if (open) {
    await open.lock.shared(async () => ranges.push(...(await above(await open.current(), offset, end, common, p))));
  } else {
    await withLayer(p, topFile, async (img) => ranges.push(...(await above(img, offset, end, common, p))));
  }
  if (common !== since.layer) {
    await withLayer(p, since.layer, async (img) => ranges.push(...(await above(img, offset, end, common, p))));
  }
  return { extents: merge(ranges, offset, end, granularity), granularity, sizeBytes: size };
}

async function withLayer<T>(p: PoolState, file: string, fn: (img: Image) => Promise<T>): Promise<T> {
  const img = await p.openLayer(file, true);
  try {
    return await fn(img);
  } finally {
    await img.close();
  }
}

/** What the layers of `img`'s chain above the layer `base` (a file; undefined: none) allocate in [from, to). */
async function above(img: Image, from: number, to: number, base: string | undefined, p: PoolState): Promise<Allocation[]> {
  const stop = Math.min(to, img.virtualSize);
  if (stop <= from) return [];
  let layer: Image | undefined = img;
  while (layer && base !== undefined && layer.path !== p.abs(base)) layer = layer.backing;
  if (layer === img) return []; // the point is the common layer itself: nothing above it
  return img.allocatedAbove(from, stop - from, base !== undefined ? layer : undefined);
}

/** Sorted, merged, rounded out to whole granules and clipped to [from, to). */
function merge(list: Allocation[], from: number, to: number, g: number): { offset: number; length: number }[] {
  const spans = list.map((a) => [Math.max(from, Math.floor(a.start / g) * g), Math.min(to, Math.ceil((a.start + a.length) / g) * g)] as const)
    .filter(([s, e]) => e > s).sort((a, b) => a[0] - b[0]);
  const out: { offset: number; length: number }[] = [];
  for (const [s, e] of spans) {
    const last = out[out.length - 1];
    if (last && s <= last.offset + last.length) last.length = Math.max(last.length, e - last.offset);
    else out.push({ offset: s, length: e - s });
  }
  return out;
}
