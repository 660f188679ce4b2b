/**
 * `pool check`: compare the pool's metadata with its folder and its files.
 *
 * - a `pending` row whose writer is gone: a create interrupted between making the file and
 *   recording it (no volume refers to it) → repair deletes the file and the row;
 * - a `deleting` row: a delete interrupted after it was decided → repair finishes it;
 * - a `merged` row: a snapshot delete that committed a layer down into it, interrupted before its
 *   file replaced the layer's (layers.ts, commitChildDown) → repair finishes it (a pool object
 *   opened on the folder does too);
 * - a recorded layer whose file is missing, or which qemu-img check would call corrupt → error,
 *   reported only (a damaged volume is the user's to save or delete);
 * - leaked clusters → repair reclaims them (not in a layer this process has open for writing);
 * - a header whose backing file differs from the metadata: when it names a layer further down
 *   the recorded chain (a stream or merge that finished on disk but not in the metadata), repair
 *   records the header's view; anything else is an error;
 * - a frozen layer nothing uses (a merge stopped after re-pointing its child) → repair deletes it;
 * - a file the metadata does not name is not ours: reported, never touched.
 */
import { readdir, rm, stat } from 'node:fs/promises';
import { openImage } from '../engine/index.js';
import { finishMerge } from './layers.js';
import { METADATA_FILE } from './metadata.js';
import type { PoolState } from './pool-state.js';

export type IssueKind =
  | 'interrupted-create' | 'interrupted-delete' | 'interrupted-merge' | 'in-progress' | 'missing-file' | 'damaged' | 'leaks'
  | 'backing-mismatch' | 'unused-layer' | 'dangling-reference' | 'unknown-file';

export interface PoolIssue {
  kind: IssueKind;
  /** `error`: needs a human; `repairable`: `--repair` fixes it; `warning`: informational. */
  severity: 'error' | 'repairable' | 'warning';
  file: string;
  volume?: string;
  message: string;
  repaired: boolean;
}

export interface PoolCheckReport {
  backend: string;
  path: string;
  volumes: number;
  layers: number;
  issues: PoolIssue[];
  /** True when nothing needs attention any more (warnings aside). */
  clean: boolean;
}

export async function checkPool(pool: PoolState, opts: { repair?: boolean } = {}): Promise<PoolCheckReport> {
  const repair = opts.repair ?? false;
  const meta = pool.meta;
  const issues: PoolIssue[] = [];
  const add = (i: Omit<PoolIssue, 'repaired'>, fix?: () => Promise<void>) => {
    const issue: PoolIssue = { ...i, repaired: false };
    issues.push(issue);
    return (async () => {
      if (repair && fix && issue.severity === 'repairable') {
        try {
          await fix();
          issue.repaired = true;
        } catch (e) {
          // Reported, and the other repairs go on.
          issue.severity = 'error';
          issue.message += `; the repair failed: ${(e as Error).message}`;
        }
      }
    })();
  };
  const exists = async (f: string) => stat(pool.abs(f)).then(() => true, () => false);

  // First, as every structural change does: the rows after it are read as the repair left them.
  for (const row of meta.layers().filter((l) => l.state === 'merged')) {
    await add({
      file: row.file, volume: row.volume, kind: 'interrupted-merge', severity: 'repairable',
      message: `${row.file}: a snapshot delete committed the layer above into it and was interrupted before its file replaced that layer's`,
    }, () => finishMerge(pool, row.file));
  }

  for (const row of meta.layers()) {
    const base = { file: row.file, volume: row.volume };
    if (row.state === 'pending') {
      if (!pool.isAbandoned(row)) {
        await add({ ...base, kind: 'in-progress', severity: 'warning', message: `${row.file}: being created by process ${row.pid}` });
        continue;
      }
      const there = await exists(row.file);
      await add({
        ...base, kind: 'interrupted-create', severity: 'repairable',
        message: `${row.file}: a create for volume ${row.volume} was interrupted (process ${row.pid} is gone); ${there ? 'the file is an orphan' : 'no file was made'}`,
      }, async () => {
        await rm(pool.abs(row.file), { force: true });
        meta.removeLayer(row.file);
      });
      continue;
    }
    if (row.state === 'merged') continue; // reported above
    if (row.state === 'deleting') {
      await add({ ...base, kind: 'interrupted-delete', severity: 'repairable', message: `${row.file}: a delete was interrupted; the file is no longer used` }, async () => {
        await rm(pool.abs(row.file), { force: true });
        meta.removeLayer(row.file);
      });
      continue;
    }
    if (!(await exists(row.file))) {
      await add({ ...base, kind: 'missing-file', severity: 'error', message: `${row.file}: recorded as a layer of ${pool.ref(row.volume)} but the file is missing` });
      continue;
    }
    if (pool.opts.format !== 'qcow2') continue;
    let img;
    try {
      img = await openImage(pool.abs(row.file), { readOnly: true, noBacking: true });
    } catch (e) {
      await add({ ...base, kind: 'damaged', severity: 'error', message: `${row.file}: cannot be opened: ${(e as Error).message}` });
      continue;
    }
    let leaks = 0;
    try {
      const header = img.header?.backingFile ?? null;
      if (header !== row.parent) await backingIssue(pool, row.file, row.volume, row.parent, header, add);
      const res = await img.check();
      if (res.corruptions > 0 || res.checkErrors > 0) {
        await add({ ...base, kind: 'damaged', severity: 'error', message: `${row.file}: ${res.corruptions} corruptions, ${res.checkErrors} check errors (${res.messages.slice(0, 3).join('; ')})` });
      }
      leaks = res.leaks;
    } finally {
      await img.close();
    }
    if (leaks > 0) {
      const busy = pool.isOpen(row.file);
      await add({
        ...base, kind: 'leaks', severity: busy ? 'warning' : 'repairable',
        message: `${row.file}: ${leaks} leaked clusters (space only; data is safe)${busy ? '; open for writing in this process, not repaired now' : ''}`,
      }, async () => {
        const rw = await openImage(pool.abs(row.file), { readOnly: false, noBacking: true });
        try { await rw.check({ repair: 'leaks' }); } finally { await rw.close(); }
      });
    }
  }

  // A frozen layer that nothing uses any more (a merge stopped after re-pointing its child).
  for (const row of meta.layers()) {
    if (row.state !== 'ready' || meta.children(row.file).length > 0 || meta.snapshotsOnLayer(row.file).length > 0 || meta.volumeByActive(row.file)) continue;
    await add({ file: row.file, volume: row.volume, kind: 'unused-layer', severity: 'repairable', message: `${row.file}: a layer of ${pool.ref(row.volume)} that no volume, snapshot or layer uses any more` }, async () => {
      meta.setLayerState(row.file, 'deleting');
      await rm(pool.abs(row.file), { force: true });
      meta.removeLayer(row.file);
    });
  }

  const rows = new Map(meta.layers().map((l) => [l.file, l]));
  for (const v of meta.volumes()) {
    if (rows.get(v.active)?.state !== 'ready') {
      await add({ file: v.active, volume: v.name, kind: 'dangling-reference', severity: 'error', message: `volume ${pool.ref(v.name)}: its active layer ${v.active} is not a ready layer` });
    }
    for (const s of meta.snapshots(v.name)) {
      if (rows.get(s.layer)?.state !== 'ready') {
        await add({ file: s.layer, volume: v.name, kind: 'dangling-reference', severity: 'error', message: `snapshot ${pool.ref(v.name)}@${s.name}: its layer ${s.layer} is not a ready layer` });
      }
    }
  }

  const known = new Set(meta.layers().map((l) => l.file));
  for (const f of (await readdir(pool.dir)).sort()) {
    if (f === METADATA_FILE || f.startsWith(`${METADATA_FILE}-`) || known.has(f)) continue;
    await add({ file: f, kind: 'unknown-file', severity: 'warning', message: `${f}: not recorded in the pool metadata (not ours); left alone` });
  }

  return {
    backend: pool.name, path: pool.dir, volumes: meta.volumes().length, layers: meta.layers().length, issues,
    clean: issues.every((i) => i.severity === 'warning' || i.repaired),
  };
}

async function backingIssue(pool: PoolState, file: string, volume: string, recorded: string | null, header: string | null,
  add: (i: Omit<PoolIssue, 'repaired'>, fix?: () => Promise<void>) => Promise<void>): Promise<void> {
  const below = recorded === null ? [] : pool.meta.chain(recorded).map((l) => l.file);
  // A stream or merge rewrote the header (to a layer further down, or to none) and stopped
  // before recording it: the file is right, the metadata follows it.
  const finishedOnDisk = header === null ? recorded !== null : below.includes(header);
  await add({
    file, volume, kind: 'backing-mismatch', severity: finishedOnDisk ? 'repairable' : 'error',
    message: `${file}: its header says backing ${header ?? '(none)'} but the metadata says ${recorded ?? '(none)'}${finishedOnDisk ? ' (a stream finished on disk; the metadata will follow the file)' : ''}`,
  }, async () => {
    pool.meta.setParent(file, header);
  });
}
