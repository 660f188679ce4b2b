/**
 * Deleting the oldest of several snapshots (a rotation) commits the next snapshot's layer down into
 * the deleted one's — what changed between the two — and the merged file takes that layer's name,
 * instead of streaming the whole disk up into the next layer under the pool's change lock.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdirSync, mkdtempSync, renameSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { JobRun, type BlockDevice } from '../../core/index.js';
import { Qcow2Pool } from '../../plugins/qcow2/pool/pool-backend.js';
import type { PoolOptions } from '../../plugins/qcow2/pool/pool-state.js';
import { tsChild } from '../support/ts-child.js';
import { failedChecks, HAVE_QEMU_IMG, layerFiles, MiB, pattern } from './pool-helpers.js';

const SIZE = 8 * MiB;
const dirs: string[] = [];
afterEach(() => { for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true }); });

function poolAt(dir?: string, hooks?: PoolOptions['hooks']): { pool: Qcow2Pool; dir: string } {
  let d = dir;
  if (!d) {
    const root = mkdtempSync(join(tmpdir(), 'offload-rotation-'));
    dirs.push(root);
    d = join(root, 'pool');
    mkdirSync(d);
  }
  return { pool: new Qcow2Pool({ name: 'local', dir: d, format: 'qcow2', clusterSize: 65536, allowBackingOutsidePool: false, ...(hooks ? { hooks } : {}) }), dir: d };
}

async function put(dev: BlockDevice, model: Buffer, off: number, data: Uint8Array): Promise<void> {
  await dev.write(off, data);
  model.set(data, off);
}

async function reads(pool: Qcow2Pool, volume: string, snapshot?: string): Promise<Buffer> {
  const dev = snapshot ? await pool.openSnapshot(volume, snapshot) : await pool.openVolume(volume, 'r');
  try {
    return Buffer.from(await dev.read(0, dev.sizeBytes));
  } finally {
    await dev.close();
  }
}

/** Writes through `v` opened read-write, into `model` too. */
async function edit(pool: Qcow2Pool, model: Buffer, writes: (dev: BlockDevice) => Promise<void>): Promise<void> {
  const dev = await pool.openVolume('v', 'rw');
  try {
    await writes(dev);
  } finally {
    await dev.close();
  }
}

/** `v` written in full: its model. */
async function filled(pool: Qcow2Pool): Promise<Buffer> {
  await pool.createVolume({ name: 'v', sizeBytes: SIZE });
  const v = Buffer.alloc(SIZE);
  await edit(pool, v, async (dev) => { for (let m = 0; m < SIZE / MiB; m++) await put(dev, v, m * MiB, pattern(m + 1, MiB)); });
  return v;
}

/** A few changes, `s2`, one more: after `s1` (twoSnapshots) or `s0`, `s1` (threeSnapshots). */
async function nextPoints(pool: Qcow2Pool, v: Buffer, discard: boolean): Promise<{ s2: Buffer; v: Buffer }> {
  await edit(pool, v, async (dev) => {
    await put(dev, v, 100_000, pattern(40, 200_000));
    await put(dev, v, 6 * MiB + 5, pattern(41, 9000));
    if (!discard) return;
    await dev.discard?.(2 * MiB, MiB); // a range the next layer reads as zeros over the base's data
    v.fill(0, 2 * MiB, 3 * MiB);
  });
  await pool.createSnapshot('v', 's2');
  const s2 = Buffer.from(v);
  await edit(pool, v, (dev) => put(dev, v, 3 * MiB, pattern(42, 4096)));
  return { s2, v };
}

/** `v` written in full, `s1`, a few changes, `s2`, a few more: the models of s1, s2 and v. */
async function twoSnapshots(pool: Qcow2Pool): Promise<{ s1: Buffer; s2: Buffer; v: Buffer }> {
  const v = await filled(pool);
  await pool.createSnapshot('v', 's1');
  const s1 = Buffer.from(v);
  return { s1, ...(await nextPoints(pool, v, true)) };
}

/** `v` written in full, `s0`, much changed, `s1`, a little changed, `s2`, more: the models of each point. */
async function threeSnapshots(pool: Qcow2Pool): Promise<{ s0: Buffer; s2: Buffer; v: Buffer }> {
  const v = await filled(pool);
  await pool.createSnapshot('v', 's0');
  const s0 = Buffer.from(v);
  await edit(pool, v, async (dev) => { for (let m = 0; m < 4; m++) await put(dev, v, m * MiB + 4096, pattern(30 + m, MiB - 8192)); });
  await pool.createSnapshot('v', 's1');
  return { s0, ...(await nextPoints(pool, v, false)) };
}

describe('qcow2 pool: deleting the oldest snapshot commits the next layer down into it', () => {
  it("the next snapshot's layer is committed down and its name kept; every point reads as before; qemu-img and pool check agree", async () => {
    const stages: string[] = [];
    const { pool, dir } = poolAt(undefined, { commitChildDown: (s) => { stages.push(s); } });
    const model = await twoSnapshots(pool);
    const [top, s2Layer, base] = pool.chainFiles('v').map((f) => basename(f));
    const baseSize = statSync(join(dir, base!)).size;
    expect(statSync(join(dir, s2Layer!)).size).toBeLessThan(baseSize);

    await pool.deleteSnapshot('v', 's1');
    expect(stages).toEqual(['copied', 'marked', 'renamed']);
    // The base's file, with s2's changes in it, is s2's layer now; the names above are unchanged.
    expect(pool.chainFiles('v').map((f) => basename(f))).toEqual([top, s2Layer]);
    expect(layerFiles(dir).sort()).toEqual([top, s2Layer].sort());
    expect(statSync(join(dir, s2Layer!)).size).toBeGreaterThanOrEqual(baseSize);
    expect((await pool.listSnapshots('v')).map((s) => s.name)).toEqual(['s2']);
    expect((await reads(pool, 'v', 's2')).equals(model.s2)).toBe(true);
    expect((await reads(pool, 'v')).equals(model.v)).toBe(true);
    expect((await pool.check()).issues).toEqual([]);
    if (HAVE_QEMU_IMG) expect(failedChecks(dir)).toEqual([]);
    await pool.close();
  });

  it('a middle snapshot: the next layer is committed into its layer, and the merged file names the older snapshot\'s layer', async () => {
    const stages: string[] = [];
    const { pool, dir } = poolAt(undefined, { commitChildDown: (s) => { stages.push(s); } });
    const model = await threeSnapshots(pool);
    const [top, s2Layer, , s0Layer] = pool.chainFiles('v').map((f) => basename(f));
    await pool.deleteSnapshot('v', 's1');
    expect(stages).toEqual(['copied', 'marked', 'renamed']);
    expect(pool.chainFiles('v').map((f) => basename(f))).toEqual([top, s2Layer, s0Layer]);
    for (const s of ['s0', 's2'] as const) expect((await reads(pool, 'v', s)).equals(model[s]), s).toBe(true);
    expect((await reads(pool, 'v')).equals(model.v)).toBe(true);
    expect((await pool.changedExtents('v', { since: 's0', until: 's2' })).extents.length).toBeGreaterThan(0);
    expect((await pool.check()).issues).toEqual([]);
    if (HAVE_QEMU_IMG) expect(failedChecks(dir)).toEqual([]);
    await pool.close();
  });

  it('a rotation: a snapshot a round, the oldest deleted, with the volume open and written throughout; each kept point reads as it was taken', async () => {
    let commits = 0;
    const { pool, dir } = poolAt(undefined, { commitChildDown: (s) => { if (s === 'renamed') commits++; } });
    await pool.createVolume({ name: 'v', sizeBytes: SIZE });
    const model = Buffer.alloc(SIZE);
    const dev = await pool.openVolume('v', 'rw');
    for (let m = 0; m < SIZE / MiB; m++) await put(dev, model, m * MiB, pattern(m + 1, MiB));
    const points = new Map<string, Buffer>();
    for (let round = 0; round < 6; round++) {
      await pool.createSnapshot('v', `d${round}`);
      points.set(`d${round}`, Buffer.from(model));
      for (let k = 0; k < 4; k++) await put(dev, model, ((round * 5 + k * 3) % 128) * 65536 + 512 * k, pattern(100 + round * 4 + k, 70_000));
      if (round >= 2) {
        // Keep two: the oldest goes while the volume is open here and written.
        const oldest = `d${round - 2}`;
        const writing = (async () => { for (let k = 0; k < 20; k++) await put(dev, model, (k * 7 + round) * 4096, pattern(500 + round * 20 + k, 4096)); })();
        await pool.deleteSnapshot('v', oldest);
        await writing;
        points.delete(oldest);
      }
      for (const [name, want] of points) expect((await reads(pool, 'v', name)).equals(want), name).toBe(true);
      expect(Buffer.from(await dev.read(0, SIZE)).equals(model)).toBe(true);
    }
    expect(commits).toBe(4); // each delete committed down
    expect(pool.chainFiles('v')).toHaveLength(3); // two kept snapshots and the active layer
    expect(layerFiles(dir)).toHaveLength(3);
    await dev.close();
    expect((await reads(pool, 'v')).equals(model)).toBe(true);
    expect((await pool.check()).issues).toEqual([]);
    if (HAVE_QEMU_IMG) expect(failedChecks(dir)).toEqual([]);
    await pool.close();
  });

  it('a reader of the next snapshot open during the delete reads it right before, during and after', async () => {
    const stages: string[] = [];
    let reads2 = 0;
    // Each stage waits for a whole read of the next snapshot made at that point.
    const { pool } = poolAt(undefined, { commitChildDown: async (s) => { stages.push(s); const n = reads2; while (reads2 < n + 1) await new Promise((r) => setTimeout(r, 1)); } });
    const model = await twoSnapshots(pool);
    const reader = await pool.openSnapshot('v', 's2');
    let reading = true;
    const reader2 = (async () => {
      for (; reading; reads2++) expect(Buffer.from(await reader.read(0, SIZE)).equals(model.s2)).toBe(true);
    })();
    await pool.deleteSnapshot('v', 's1');
    reading = false;
    await reader2;
    expect(stages).toEqual(['copied', 'marked', 'renamed']);
    expect(reads2).toBeGreaterThanOrEqual(3);
    await reader.close();
    expect((await reads(pool, 'v', 's2')).equals(model.s2)).toBe(true);
    await pool.close();
  });

  it('a reader of the deleted snapshot open here reads it as it was (its layer is merged up, not committed into)', async () => {
    const stages: string[] = [];
    const { pool } = poolAt(undefined, { commitChildDown: (s) => { stages.push(s); } });
    const model = await twoSnapshots(pool);
    const reader = await pool.openSnapshot('v', 's1');
    await pool.deleteSnapshot('v', 's1');
    expect(stages).toEqual([]);
    expect(Buffer.from(await reader.read(0, SIZE)).equals(model.s1)).toBe(true);
    await reader.close();
    expect((await reads(pool, 'v', 's2')).equals(model.s2)).toBe(true);
    await pool.close();
  });

  it('a reader of the deleted snapshot in another process (another pool object) keeps it from being committed into, whichever way the delete would go', async () => {
    const stages: string[] = [];
    const { pool, dir } = poolAt(undefined, { commitChildDown: (s) => { stages.push(s); } });
    const model = await twoSnapshots(pool);
    const { pool: other } = poolAt(dir);
    const reader = await other.openSnapshot('v', 's1');
    await pool.deleteSnapshot('v', 's1');
    expect(stages).toEqual([]);
    expect(Buffer.from(await reader.read(0, SIZE)).equals(model.s1)).toBe(true);
    // The only snapshot left, read there too: not committed down into either (merged up).
    const reader2 = await other.openSnapshot('v', 's2');
    const [, s2Layer] = pool.chainFiles('v').map((f) => basename(f));
    await pool.deleteSnapshot('v', 's2');
    expect(pool.chainFiles('v').map((f) => basename(f))).not.toContain(s2Layer);
    expect(Buffer.from(await reader2.read(0, SIZE)).equals(model.s2)).toBe(true);
    await reader.close();
    await reader2.close();
    // Once the readers are gone, the next rotation commits down again.
    await pool.createSnapshot('v', 's3');
    await pool.createSnapshot('v', 's4');
    const d = await pool.openVolume('v', 'rw');
    await d.write(0, pattern(80, 4096));
    model.v.set(pattern(80, 4096), 0);
    await d.close();
    await pool.deleteSnapshot('v', 's3');
    expect(stages).toEqual(['copied', 'marked', 'renamed']);
    expect((await reads(pool, 'v')).equals(model.v)).toBe(true);
    await other.close();
    await pool.close();
  });

  it('a reader of the deleted snapshot in another process keeps it from being committed into; once that process is killed, its registration no longer counts', async () => {
    const stages: string[] = [];
    const { pool, dir } = poolAt(undefined, { commitChildDown: (s) => { stages.push(s); } });
    const model = await twoSnapshots(pool);
    const child = spawn(process.execPath, [...tsChild(join(import.meta.dirname, 'snapshot-reader-child.ts')), dir, 'v', 's1'], { stdio: ['pipe', 'pipe', 'inherit'] });
    const lines: string[] = [];
    let out = '';
    child.stdout.on('data', (d: Buffer) => { out += d.toString(); while (out.includes('\n')) { lines.push(out.slice(0, out.indexOf('\n'))); out = out.slice(out.indexOf('\n') + 1); } });
    const line = async (n: number) => { while (lines.length < n) await new Promise((r) => setTimeout(r, 10)); return lines[n - 1]!; };
    expect(await line(1)).toBe('open');
    await pool.deleteSnapshot('v', 's1');
    expect(stages).toEqual([]); // merged up: the reader's layer is not written
    child.stdin.write('read\n');
    expect(await line(2)).toBe(createHash('sha256').update(model.s1).digest('hex'));
    // Killed, it never unregistered: a later delete finds its process gone and commits down.
    const r2 = spawn(process.execPath, [...tsChild(join(import.meta.dirname, 'snapshot-reader-child.ts')), dir, 'v', 's2'], { stdio: ['pipe', 'pipe', 'inherit'] });
    await new Promise<void>((resolve) => r2.stdout.once('data', () => resolve()));
    r2.kill('SIGKILL');
    await new Promise((r) => r2.once('exit', r));
    await pool.createSnapshot('v', 's3');
    await pool.deleteSnapshot('v', 's2');
    expect(stages).toEqual(['copied', 'marked', 'renamed']);
    expect((await reads(pool, 'v')).equals(model.v)).toBe(true);
    child.kill('SIGKILL');
    await pool.close();
  });

  it('the volume grown between the snapshots: the deleted layer grows with the commit', async () => {
    const stages: string[] = [];
    const { pool, dir } = poolAt(undefined, { commitChildDown: (s) => { stages.push(s); } });
    await pool.createVolume({ name: 'v', sizeBytes: SIZE });
    let dev = await pool.openVolume('v', 'rw');
    const model = Buffer.alloc(2 * SIZE);
    for (let m = 0; m < SIZE / MiB; m++) await put(dev, model, m * MiB, pattern(m + 1, MiB));
    await dev.close();
    await pool.createSnapshot('v', 's1');
    await pool.resizeVolume('v', 2 * SIZE);
    dev = await pool.openVolume('v', 'rw');
    await put(dev, model, SIZE + 4096, pattern(60, 65536)); // past the old end
    await dev.close();
    await pool.createSnapshot('v', 's2');
    await pool.deleteSnapshot('v', 's1');
    expect(stages).toEqual(['copied', 'marked', 'renamed']);
    expect(layerFiles(dir)).toHaveLength(2);
    expect((await reads(pool, 'v', 's2')).equals(model)).toBe(true);
    expect((await reads(pool, 'v')).equals(model)).toBe(true);
    if (HAVE_QEMU_IMG) expect(failedChecks(dir)).toEqual([]);
    await pool.close();
  });

  it('a linked clone made from the next snapshot reads right after the delete, and so do the volume and that snapshot', async () => {
    const stages: string[] = [];
    const { pool, dir } = poolAt(undefined, { commitChildDown: (s) => { stages.push(s); } });
    const model = await twoSnapshots(pool);
    await pool.createVolume({ name: 'kid', source: { volume: 'v', snapshot: 's2' }, mode: 'linked' });
    const kid = await pool.openVolume('kid', 'rw');
    const kidModel = Buffer.from(model.s2);
    await put(kid, kidModel, 5 * MiB, pattern(70, 8192));
    await pool.deleteSnapshot('v', 's1');
    expect(stages).toEqual(['copied', 'marked', 'renamed']);
    await put(kid, kidModel, 7 * MiB, pattern(71, 8192));
    expect(Buffer.from(await kid.read(0, SIZE)).equals(kidModel)).toBe(true);
    await kid.close();
    expect(layerFiles(dir)).toHaveLength(3); // s2's layer (the merged file), v's and kid's active layers
    expect((await reads(pool, 'kid')).equals(kidModel)).toBe(true);
    expect((await reads(pool, 'v', 's2')).equals(model.s2)).toBe(true);
    expect((await reads(pool, 'v')).equals(model.v)).toBe(true);
    expect((await pool.check()).issues).toEqual([]);
    if (HAVE_QEMU_IMG) expect(failedChecks(dir)).toEqual([]);
    await pool.close();
  });

  it('an error after the mark leaves the layer `merged`: the next structural change finishes it first (the next rotation reads right)', async () => {
    let fail = true;
    const { pool, dir } = poolAt(undefined, { commitChildDown: (s) => { if (s === 'marked' && fail) throw new Error('injected'); } });
    const model = await twoSnapshots(pool);
    await expect(pool.deleteSnapshot('v', 's1')).rejects.toThrow('injected');
    fail = false;
    await pool.createSnapshot('v', 's3');
    const dev = await pool.openVolume('v', 'rw');
    await put(dev, model.v, 4 * MiB, pattern(90, 65536));
    await pool.deleteSnapshot('v', 's2');
    await put(dev, model.v, 5 * MiB, pattern(91, 65536));
    expect(Buffer.from(await dev.read(0, SIZE)).equals(model.v)).toBe(true);
    await dev.close();
    expect((await reads(pool, 'v')).equals(model.v)).toBe(true);
    expect(layerFiles(dir)).toHaveLength(2);
    expect((await pool.check()).issues).toEqual([]);
    if (HAVE_QEMU_IMG) expect(failedChecks(dir)).toEqual([]);
    await pool.close();
  });

  for (const at of ['marked', 'renamed'] as const) {
    for (const which of ['oldest', 'middle'] as const) {
      it(`an error once ${at} (the ${which} snapshot) leaves the layer \`merged\`: pool check reports it and --repair finishes it, in whatever order its rows come`, async () => {
        let fail = true;
        const { pool, dir } = poolAt(undefined, { commitChildDown: (s) => { if (s === at && fail) throw new Error('injected'); } });
        const model: { s0?: Buffer; s2: Buffer; v: Buffer } = which === 'oldest' ? await twoSnapshots(pool) : await threeSnapshots(pool);
        const without = pool.chainFiles('v').map((f) => basename(f)).filter((_, i) => i !== 2);
        await expect(pool.deleteSnapshot('v', 's1')).rejects.toThrow('injected');
        fail = false;
        expect((await reads(pool, 'v', 's2')).equals(model.s2)).toBe(true); // by the headers meanwhile
        expect(pool.chainFiles('v').map((f) => basename(f))).toEqual(at === 'renamed' ? without : [...without.slice(0, 2), expect.any(String), ...without.slice(2)]);
        const found = await pool.check();
        expect(found.issues.map((i) => [i.kind, i.severity])).toEqual(at === 'marked'
          ? [['interrupted-merge', 'repairable']]
          : [['interrupted-merge', 'repairable'], ['backing-mismatch', 'repairable']]); // the renamed file names the parent already
        expect((await pool.check({ repair: true })).clean).toBe(true);
        expect((await pool.check()).issues).toEqual([]);
        expect(pool.chainFiles('v').map((f) => basename(f))).toEqual(without);
        expect(layerFiles(dir).sort()).toEqual([...without].sort());
        expect((await reads(pool, 'v', 's2')).equals(model.s2)).toBe(true);
        if (model.s0) expect((await reads(pool, 'v', 's0')).equals(model.s0)).toBe(true);
        expect((await reads(pool, 'v')).equals(model.v)).toBe(true);
        await pool.close();
      });
    }
  }

  it('a commit job started while a merge runs waits for it (it starts in a structural section), then runs on what the delete left', async () => {
    let job: Promise<unknown> | undefined;
    const { pool, dir } = poolAt(undefined, {
      commitChildDown: (s) => {
        // Not awaited: a job that did not wait would copy into the next layer's file as it moves.
        if (s === 'copied') job = pool.commitVolume('v', {}).then((t) => t.run(new JobRun({ jobId: 'commit v' }))).then(() => 'ran', (e: { code?: string }) => e.code);
      },
    });
    const model = await twoSnapshots(pool);
    // s2 deleted while the volume is open in another pool object: its layer stays, hidden.
    const { pool: other } = poolAt(dir);
    const there = await other.openVolume('v', 'rw');
    await pool.deleteSnapshot('v', 's2');
    await there.close();
    await other.close();
    expect(pool.chainFiles('v')).toHaveLength(3);
    await pool.deleteSnapshot('v', 's1');
    expect(await job).toBe('ran');
    expect((await reads(pool, 'v')).equals(model.v)).toBe(true);
    // And the hidden layer went too (the delete compacts the volume's leftovers): one layer.
    expect(pool.chainFiles('v')).toHaveLength(1);
    expect(layerFiles(dir)).toHaveLength(1);
    if (HAVE_QEMU_IMG) expect(failedChecks(dir)).toEqual([]);
    await pool.close();
  });

  it('a commit job into a hidden next layer, started while a merge waits to be finished, runs after it: the volume reads every write', async () => {
    let fail = true;
    const { pool, dir } = poolAt(undefined, { commitChildDown: (s) => { if (s === 'marked' && fail) throw new Error('injected'); } });
    const model = await twoSnapshots(pool);
    const { pool: other } = poolAt(dir);
    const there = await other.openVolume('v', 'rw');
    await pool.deleteSnapshot('v', 's2'); // open there: s2's layer stays, hidden
    await there.close();
    await other.close();
    const dev = await pool.openVolume('v', 'rw');
    await put(dev, model.v, 2 * MiB + 4096, pattern(95, 65536));
    await expect(pool.deleteSnapshot('v', 's1')).rejects.toThrow('injected');
    fail = false;
    // Nothing else between: the job is the first to change the pool after the error.
    await (await pool.commitVolume('v', {})).run(new JobRun({ jobId: 'commit v' }));
    await put(dev, model.v, 7 * MiB, pattern(96, 4096));
    expect(Buffer.from(await dev.read(0, SIZE)).equals(model.v)).toBe(true);
    await dev.close();
    expect((await reads(pool, 'v')).equals(model.v)).toBe(true);
    expect(pool.chainFiles('v')).toHaveLength(1);
    expect((await pool.check()).issues).toEqual([]);
    if (HAVE_QEMU_IMG) expect(failedChecks(dir)).toEqual([]);
    await pool.close();
  });

  it('a merge that cannot be finished holds up changes of its volume only; pool check reports it and repairs the rest; once it can, it is finished', async () => {
    let fail = true;
    const { pool, dir } = poolAt(undefined, { commitChildDown: (s) => { if (s === 'marked' && fail) throw new Error('injected'); } });
    const model = await twoSnapshots(pool);
    const s2Layer = basename(pool.chainFiles('v')[1]!);
    await pool.createVolume({ name: 'w', sizeBytes: MiB });
    await expect(pool.deleteSnapshot('v', 's1')).rejects.toThrow('injected');
    fail = false;
    // The next layer's file goes missing (a failing disk, a hand in the folder): the merge cannot be finished.
    renameSync(join(dir, s2Layer), join(dir, '..', 'aside'));
    await expect(pool.createSnapshot('v', 'x')).rejects.toMatchObject({ code: 'Busy' });
    await pool.createSnapshot('w', 'ok'); // the rest of the pool changes on
    await pool.deleteSnapshot('w', 'ok');
    const report = await pool.check({ repair: true });
    expect(report.issues.find((i) => i.kind === 'interrupted-merge')).toMatchObject({ severity: 'error', repaired: false });
    renameSync(join(dir, '..', 'aside'), join(dir, s2Layer));
    await pool.createSnapshot('v', 'x'); // finished first, then taken
    expect((await reads(pool, 'v', 's2')).equals(model.s2)).toBe(true);
    expect((await reads(pool, 'v', 'x')).equals(model.v)).toBe(true);
    expect((await pool.check()).issues).toEqual([]);
    await pool.close();
  });

  it("when the next layer is the larger, the deleted one is merged up as before (its file goes, the next layer's stays)", async () => {
    const stages: string[] = [];
    const { pool, dir } = poolAt(undefined, { commitChildDown: (s) => { stages.push(s); } });
    await pool.createVolume({ name: 'v', sizeBytes: SIZE });
    let dev = await pool.openVolume('v', 'rw');
    const model = Buffer.alloc(SIZE);
    await put(dev, model, 0, pattern(1, 65536));
    await dev.close();
    await pool.createSnapshot('v', 's1');
    dev = await pool.openVolume('v', 'rw');
    for (let m = 1; m < SIZE / MiB; m++) await put(dev, model, m * MiB, pattern(m + 1, MiB));
    await dev.close();
    await pool.createSnapshot('v', 's2');
    const [top, s2Layer] = pool.chainFiles('v').map((f) => basename(f));
    await pool.deleteSnapshot('v', 's1');
    expect(stages).toEqual([]);
    expect(pool.chainFiles('v').map((f) => basename(f))).toEqual([top, s2Layer]);
    expect((await reads(pool, 'v', 's2')).equals(model)).toBe(true);
    await pool.close();
  });
});

describe('qcow2 pool: killed while it commits a layer down in a snapshot delete', () => {
  const when = { copied: 'copied, not marked', marked: 'marked merged, not renamed', renamed: 'renamed, not recorded' } as const;
  for (const which of ['oldest', 'middle'] as const) {
    for (const stage of ['copied', 'marked', 'renamed'] as const) {
      it(`the ${which} snapshot, ${when[stage]}: the next pool object finishes it; every point and acknowledged write reads back; pool check clean`, async () => {
        const { pool, dir } = poolAt();
        const model: { s0?: Buffer; s2: Buffer; v: Buffer } = which === 'oldest' ? await twoSnapshots(pool) : await threeSnapshots(pool);
        const kept = which === 'oldest' ? ['s2'] : ['s0', 's2'];
        const chain = pool.chainFiles('v').map((f) => basename(f));
        const without = chain.filter((_, i) => i !== 2); // s1's layer, third from the top either way
        await pool.close();
        const child = spawn(process.execPath, [...tsChild(join(import.meta.dirname, 'commit-child-down-child.ts')), dir, stage], { stdio: ['ignore', 'pipe', 'inherit'] });
        let out = '';
        child.stdout.on('data', (d: Buffer) => { out += d.toString(); });
        const code = await new Promise<number | null>((r) => child.on('exit', (c, s) => r(s === 'SIGKILL' ? -9 : c)));
        expect(code).toBe(-9);
        const acks = out.split('\n').filter((l) => l.startsWith('ack ')).map((l) => l.split(' ').map(Number) as [unknown, number, number]);
        expect(acks.length).toBeGreaterThanOrEqual(30);
        for (const [, off, seed] of acks) model.v.set(pattern(seed, 4096), off);

        const { pool: after } = poolAt(dir);
        // Killed before its mark, s1 is gone and its layer hidden (committed into, harmlessly);
        // after it, finished by the pool object's first change, before this check. What there is
        // to repair is a killed writer's leaked clusters, if any.
        const found = await after.check();
        expect(found.issues.filter((i) => i.kind !== 'leaks'), JSON.stringify(found.issues)).toEqual([]);
        expect((await after.check({ repair: true })).clean).toBe(true);
        expect(await after.listSnapshots('v').then((l) => l.map((s) => s.name).sort())).toEqual(kept);
        for (const name of kept) expect((await reads(after, 'v', name)).equals(model[name as 's0' | 's2']!), name).toBe(true);
        // The write under way at the kill, never acknowledged, may have landed or not.
        const got = await reads(after, 'v');
        const next = ((acks.length * 2654435761) % 2048) * 4096;
        if (got.subarray(next, next + 4096).equals(pattern(1000 + acks.length, 4096))) model.v.set(pattern(1000 + acks.length, 4096), next);
        expect(got.equals(model.v)).toBe(true);
        expect(after.chainFiles('v').map((f) => basename(f))).toEqual(stage === 'copied' ? chain : without);
        if (stage !== 'copied') expect(layerFiles(dir).sort()).toEqual([...without].sort());
        if (HAVE_QEMU_IMG) expect(failedChecks(dir, { killed: true })).toEqual([]);
        // The pool works on: the next rotation (a hidden layer a kill left goes with it).
        await after.createSnapshot('v', 's3');
        await after.deleteSnapshot('v', 's2');
        expect((await reads(after, 'v', 's3')).equals(model.v)).toBe(true);
        if (model.s0) expect((await reads(after, 'v', 's0')).equals(model.s0)).toBe(true);
        expect(layerFiles(dir)).toHaveLength(kept.length + 1);
        expect((await after.check()).issues).toEqual([]);
        await after.close();
      });
    }
  }
});
