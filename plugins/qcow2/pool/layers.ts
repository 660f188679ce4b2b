/**
 * The life cycle of the pool's layer files: made only after a pending row names them, deleted only
 * after their row turned `deleting`, and compacted when a frozen layer loses a user (see the
 * plugin's README: "snapshot model").
 */
import { randomBytes } from 'node:crypto';
import { existsSync, statSync } from 'node:fs';
import { open, rename, rm } from 'node:fs/promises';
import { closeAfter, Corrupt, JobRun, toOffloadError, type JobContext } from '../../../core/index.js';
import { createImage, openImage, type Image } from '../engine/index.js';
import { runCommit, runStream } from '../jobs/index.js';
import type { LayerRow } from './metadata.js';
import type { PoolState } from './pool-state.js';

/** Create a layer file, named by a pending row first (so a crash leaves a row pointing at it). */
export async function makeLayer(p: PoolState, volume: string, parent: string | null, size: number): Promise<string> {
  const { format, clusterSize } = p.opts;
  for (let attempt = 0; ; attempt++) {
    const file = `${volume}.${randomBytes(4).toString('hex')}.${format}`;
    if (p.meta.layer(file)) continue;
    p.meta.addLayer({ file, volume, parent, state: 'pending', pid: process.pid });
    p.inFlight.add(file);
    try {
      await createImage(p.abs(file), parent === null
        ? { format, size, ...(format === 'qcow2' ? { clusterSize } : {}) }
        : { format: 'qcow2', size, clusterSize, backingFile: parent, backingFormat: 'qcow2' });
    } catch (e) {
      p.meta.removeLayer(file);
      p.inFlight.delete(file);
      if ((e as { code?: string }).code === 'AlreadyExists' && attempt < 5) continue; // a foreign file has the name
      throw e;
    }
    await p.opts.hooks?.afterFileCreated?.(file);
    return file;
  }
}

/** Record layers made by makeLayer as ready, together with `change` (one transaction). */
export function commitLayers(p: PoolState, files: string[], change: () => void): void {
  p.meta.tx(() => {
    for (const f of files) p.meta.setLayerState(f, 'ready');
    change();
  });
  for (const f of files) p.inFlight.delete(f);
}

/** Undo a layer that was made but never recorded as ready. */
export async function abandonLayer(p: PoolState, file: string): Promise<void> {
  await rm(p.abs(file), { force: true });
  p.meta.removeLayer(file);
  p.inFlight.delete(file);
}

/** Delete files whose rows are `deleting`, then the rows. */
export async function unlinkLayers(p: PoolState, files: string[]): Promise<void> {
  for (const f of files) {
    await rm(p.abs(f), { force: true });
    p.meta.removeLayer(f);
  }
}

/**
 * A frozen layer that lost a user (its snapshot name, a child): delete it when nothing sits on
 * it, merge it into its one child, or keep it (hidden) while several layers sit on it.
 */
export async function compact(p: PoolState, file: string): Promise<void> {
  const row = p.meta.layer(file);
  if (!row || row.state !== 'ready') return;
  if (p.meta.snapshotsOnLayer(file).length > 0 || p.meta.volumeByActive(file)) return;
  const children = p.meta.children(file);
  if (children.length === 0) {
    p.meta.setLayerState(file, 'deleting');
    await unlinkLayers(p, [file]);
    if (row.parent !== null) await compact(p, row.parent);
    return;
  }
  if (children.length > 1) return;
  const child = children[0]!;
  // Not into a layer another process may be writing (the active layer of a volume open there),
  // nor under a volume a job here works on outside the change lock (the merge re-opens it).
  if (child.state !== 'ready' || p.isBusy(child.volume) || p.isOpenElsewhere(child.volume)) return;
  const affected = p.volumesAbove(child.file);
  if (affected.some((v) => p.isBusy(v))) return;
  // The volumes above are this change's until it ends: a job here (a commit into the child, which
  // takes no change lock when the child has no snapshot) would write into a file about to move.
  for (const v of affected) p.claim(v, 'snapshot delete');
  try {
    if (await commitChildDown(p, row, child)) return;
    // Merge into the child: it pulls the clusters it lacks from this layer, then skips it.
    await withWritable(p, child.volume, child.file, (img) =>
      runStream(img, row.parent === null ? {} : { base: p.abs(row.parent) }, new JobRun({ jobId: `merge ${file}` })));
    p.meta.tx(() => {
      p.meta.setParent(child.file, row.parent);
      p.meta.setLayerState(file, 'deleting');
    });
    await p.open.reopen(affected);
    await unlinkLayers(p, [file]);
  } finally {
    for (const v of affected) p.release(v);
  }
}

/**
 * The cheaper way round when the one child of a frozen layer that lost its last snapshot is a
 * frozen layer too (the oldest of several snapshots deleted: a rotation): the child's clusters are
 * committed down into the layer (QEMU's intermediate commit) rather than the layer — the whole disk,
 * when it is the base — streamed up into the child. Then the layer's file takes the child's name
 * (rename), so that the layers above, whose headers name the child as their backing file, read the
 * merged file without a header of theirs rewritten, in this process or another.
 *
 * While it copies, what every layer above reads is unchanged: only ranges the child holds are
 * written, and reads of those stop at the child. Once the layer is durable its row says `merged`
 * (its file holds its child's content too and replaces the child's); finishMerge renames it and
 * records the child on the layer's parent — a crash between is finished by the next pool object
 * that opens the pool, or by `pool check --repair` (the chain reads right meanwhile, by the
 * headers: the child's names the merged file before the rename, the merged file names the parent
 * after it). Chosen when the child's file is the smaller, both layers are the same volume's (as
 * commitDown: a stream of a linked clone writes its lowest own layer), and no snapshot reader, here or in
 * another process, reads the deleted layer. Returns false when it does not apply (the merge up then).
 */
export async function commitChildDown(p: PoolState, row: LayerRow, child: LayerRow): Promise<boolean> {
  if (p.opts.format !== 'qcow2' || p.meta.volumeByActive(child.file)) return false;
  if (row.volume !== child.volume || (row.parent !== null && p.meta.layer(row.parent)?.volume !== child.volume)) return false;
  if (p.isReadAsSnapshot(row.file)) return false;
  const affected = p.volumesAbove(child.file);
  if (affected.some((v) => p.isOpenElsewhere(v))) return false;
  try {
    if (statSync(p.abs(child.file)).size >= statSync(p.abs(row.file)).size) return false;
  } catch {
    return false;
  }
  const top = await p.openLayer(child.file, true);
  try {
    await runCommit(top, {}, new JobRun({ jobId: `commit ${child.file} into ${row.file}` }));
  } finally {
    await top.close();
  }
  await p.opts.hooks?.commitChildDown?.('copied');
  p.meta.setLayerState(row.file, 'merged');
  await p.opts.hooks?.commitChildDown?.('marked');
  await finishMerge(p, row.file);
  return true;
}

/**
 * A `merged` layer (commitChildDown): its file replaces its child's, and the child's row is
 * backed by the layer's parent. Each step is done again harmlessly: a file already renamed is not
 * there any more. Call under the change lock.
 */
export async function finishMerge(p: PoolState, file: string): Promise<void> {
  const row = p.meta.layer(file);
  if (row?.state !== 'merged') return;
  const there = existsSync(p.abs(file));
  const children = p.meta.children(file);
  // Renamed, and the child already recorded on the parent (pool check's repair of its header): only the row is left.
  if (children.length === 0 && !there) return p.meta.removeLayer(file);
  if (children.length !== 1) {
    throw new Corrupt(`pool ${p.name}: the merged layer ${file} has ${children.length} layers on it, not one`, { ref: p.name, hint: '`offload pool check` reports what else is wrong' });
  }
  const child = children[0]!;
  if (there) {
    // Only over the child that names this layer as its backing file: the one it was merged with.
    const header = await readBacking(p, child.file);
    if (header !== file) {
      throw new Corrupt(`pool ${p.name}: the merged layer ${file} is to replace ${child.file}, whose header names ${header ?? 'no backing file'}`, {
        ref: p.name, hint: '`offload pool check` reports what else is wrong',
      });
    }
    await rename(p.abs(file), p.abs(child.file));
    await syncDir(p.dir);
  }
  await p.opts.hooks?.commitChildDown?.('renamed');
  p.meta.tx(() => {
    p.meta.setParent(child.file, row.parent);
    p.meta.removeLayer(file);
  });
  // This process's images over it read the old files, rightly; opened again they let them go.
  await p.open.reopen(p.volumesAbove(child.file));
}

/**
 * The volume's hidden layers (no snapshot on them, not its active layer) that an earlier delete
 * left — killed before its merge, or skipped while the volume was open in another process — are
 * committed down or merged as a delete's own layer is; one that several layers sit on stays.
 */
export async function compactHidden(p: PoolState, volume: string): Promise<void> {
  for (const l of p.meta.layersOf(volume)) {
    if (l.state !== 'ready' || p.meta.snapshotsOnLayer(l.file).length > 0 || p.meta.volumeByActive(l.file)) continue;
    if (!(await commitDown(p, l.file))) await compact(p, l.file);
  }
}

/** Finish what a process killed in commitChildDown left `merged`. Call under the change lock. */
export async function finishMerges(p: PoolState): Promise<void> {
  const merged = p.meta.hasMerged() ? p.meta.layers().filter((l) => l.state === 'merged') : [];
  // Finished meanwhile (pool check, another process): its volumes are free again.
  for (const f of p.stuckLayers()) if (!merged.some((l) => l.file === f)) p.unstick(f);
  for (const l of merged) {
    try {
      await finishMerge(p, l.file);
      p.unstick(l.file);
    } catch (e) {
      // Not the whole pool's changes held up by one: the volumes over it are Busy until it is finished.
      p.stick(l.file, [...new Set(p.meta.children(l.file).flatMap((c) => p.volumesAbove(c.file)))], toOffloadError(e).message);
    }
  }
}

/** The backing file a layer's header names (null: none). */
async function readBacking(p: PoolState, file: string): Promise<string | null> {
  const img = await openImage(p.abs(file), { readOnly: true, noBacking: true });
  try {
    return img.header?.backingFile ?? null;
  } finally {
    await img.close();
  }
}

/** Make a rename in `dir` durable. */
async function syncDir(dir: string): Promise<void> {
  const fd = await open(dir, 'r');
  try {
    await fd.sync();
  } finally {
    await fd.close();
  }
}

/**
 * Run `fn` on a read-write image of `file`: the volume's shared open image when `file` is its
 * active layer, else a private read-write open of that frozen layer.
 */
export async function withWritable(p: PoolState, volume: string, file: string, fn: (img: Image) => Promise<void>, ctx?: JobContext): Promise<void> {
  const v = p.mustVolume(volume);
  // A job's run that lost its lease writes nothing more at the close (closeAfter): another
  // runner writes the file now. The volume's shared image is kept as it is by its other users.
  const closing = () => (ctx ? closeAfter(ctx) : {});
  if (v.active === file) {
    const ov = p.open.acquire(volume);
    try {
      const img = await ov.lock.shared(() => ov.current());
      await fn(img);
    } finally {
      await p.open.release(ov, closing());
    }
    return;
  }
  const img = await p.openLayer(file, false);
  try {
    await fn(img);
    await img.flush();
  } finally {
    await img.close(closing());
  }
}

/**
 * The cheaper way round for a frozen layer that lost its last snapshot when its one child is its
 * own volume's active layer (the volume's only or newest snapshot deleted): the active layer's
 * clusters are committed down into it and it becomes the active layer (QEMU's active commit, as
 * `offload commit --base` runs it), copying what was written since the snapshot rather than
 * streaming the whole layer up. Chosen when the active layer's file is the smaller, the volume is
 * open in no other process and busy with no job here, the layer is read by no snapshot reader here
 * or in another process (openSnapshot: the snapshot was deleted under it), and the layer is not the volume's lowest own
 * layer over another volume's (a stream of the volume, here or elsewhere, writes that one). Runs
 * under the change lock, as a merge does, while the volume's writers go on; the switch holds them,
 * drains their last writes, and records the layer as active before the open image moves to it (a
 * crash before the record finds the volume on its old top, after it on the new one: every
 * acknowledged write in either). Returns false when it does not apply (compact then).
 */
export async function commitDown(p: PoolState, file: string): Promise<boolean> {
  const row = p.meta.layer(file);
  if (p.opts.format !== 'qcow2' || !row || row.state !== 'ready') return false;
  if (p.meta.snapshotsOnLayer(file).length > 0 || p.meta.volumeByActive(file)) return false;
  const children = p.meta.children(file);
  if (children.length !== 1) return false;
  const top = children[0]!;
  const v = p.meta.volume(top.volume);
  if (!v || v.active !== top.file || top.volume !== row.volume || top.state !== 'ready') return false;
  if (row.parent !== null && p.meta.layer(row.parent)?.volume !== v.name) return false;
  if (p.isBusy(v.name) || p.isOpenElsewhere(v.name) || p.isReadAsSnapshot(file)) return false;
  try {
    if (statSync(p.abs(top.file)).size >= statSync(p.abs(file)).size) return false;
  } catch {
    return false;
  }
  p.claim(v.name, 'snapshot delete');
  const ov = p.open.acquire(v.name);
  try {
    const img = await ov.lock.shared(() => ov.current());
    await p.opts.hooks?.activeCommit?.('copying');
    await runCommit(img, {
      base: p.abs(file), active: true, pivotWhenReady: true,
      record: async () => {
        await p.opts.hooks?.activeCommit?.('in-sync');
        p.meta.tx(() => {
          p.meta.updateVolume(v.name, { active: file });
          p.meta.setLayerState(top.file, 'deleting');
        });
        await p.opts.hooks?.activeCommit?.('recorded');
      },
    }, new JobRun({ jobId: `commit ${top.file} into ${file}` }));
    await p.opts.hooks?.activeCommit?.('switched');
    // The pivoted image runs as the commit opened its base (metadata deferred to flushes): opened
    // again as the pool opens an active layer on the next I/O.
    await ov.swap(async () => undefined);
    await unlinkLayers(p, [top.file]);
  } finally {
    await p.open.release(ov);
    p.release(v.name);
  }
  return true;
}
