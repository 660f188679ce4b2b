/**
 * Crash consistency of the pool metadata: a process killed between creating a layer file and
 * recording it leaves no ghost volume, and `pool check` reports the orphan and (with repair)
 * removes it. Files the pool does not own and damaged files are reported, never deleted.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, openSync, writeSync, closeSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { JobRun } from '../../core/index.js';
import { layerFiles, MiB, openPool, pattern, read, write, type PoolFixture } from './pool-helpers.js';
import { tsChild } from '../support/ts-child.js';

const CHILD = resolve(import.meta.dirname, 'crash-child.ts');
let fx: PoolFixture;
beforeEach(async () => { fx = await openPool(); });
afterEach(async () => { await fx.close(); });

function crash(op: string): void {
  const r = spawnSync(process.execPath, [...tsChild(CHILD), fx.dir, op], { encoding: 'utf8', cwd: resolve(import.meta.dirname, '../..') });
  expect(r.signal, r.stderr).toBe('SIGKILL');
  expect(r.stdout).not.toContain('not killed');
}

describe('qcow2 pool: crashes between a file and its record', () => {
  for (const op of ['create', 'snapshot', 'clone-linked']) {
    it(`${op}: no ghost volume; pool check reports the orphan, --repair removes it; the volume is intact`, async () => {
      const b = fx.broker;
      await b.volumes.create('local/v', { sizeBytes: 32 * MiB });
      await write(b, 'local/v', 0, pattern(1, MiB));
      const chainBefore = fx.pool.chainFiles('v');
      const filesBefore = layerFiles(fx.dir);

      crash(op);

      const orphans = layerFiles(fx.dir).filter((f) => !filesBefore.includes(f));
      expect(orphans).toHaveLength(1);
      expect((await b.volumes.listAll('local')).map((v) => v.name)).toEqual(['v']);
      expect(await b.snapshots.list('local/v')).toEqual([]);
      expect(fx.pool.chainFiles('v')).toEqual(chainBefore);

      const report = await fx.pool.check();
      expect(report.clean).toBe(false);
      expect(report.issues).toEqual([expect.objectContaining({ kind: 'interrupted-create', file: orphans[0], severity: 'repairable', repaired: false })]);
      expect(existsSync(join(fx.dir, orphans[0]!))).toBe(true); // reported, not touched without --repair

      const repaired = await fx.pool.check({ repair: true });
      expect(repaired.clean).toBe(true);
      expect(repaired.issues[0]).toMatchObject({ kind: 'interrupted-create', repaired: true });
      expect(layerFiles(fx.dir)).toEqual(filesBefore);
      expect((await fx.pool.check()).issues).toEqual([]);
      expect(Buffer.compare(await read(b, 'local/v', 0, MiB), Buffer.from(pattern(1, MiB)))).toBe(0);
      // the pool works on: the names are free again
      await b.snapshots.create('local/v@after');
      await b.volumes.create('local/crashed', { sizeBytes: 32 * MiB });
    });
  }
});

describe('qcow2 pool: pool check', () => {
  it('reports files that are not ours and never deletes them, even with --repair', async () => {
    writeFileSync(join(fx.dir, 'notes.txt'), 'mine');
    writeFileSync(join(fx.dir, 'other.qcow2'), 'QFI\xfb');
    const report = await fx.pool.check({ repair: true });
    expect(report.issues.map((i) => [i.kind, i.file, i.repaired])).toEqual([['unknown-file', 'notes.txt', false], ['unknown-file', 'other.qcow2', false]]);
    expect(report.clean).toBe(true); // warnings only
    expect(existsSync(join(fx.dir, 'notes.txt')) && existsSync(join(fx.dir, 'other.qcow2'))).toBe(true);
  });

  it('reports a damaged layer and a missing one as errors and leaves them', async () => {
    const b = fx.broker;
    await b.volumes.create('local/hurt', { sizeBytes: 32 * MiB });
    await write(b, 'local/hurt', 0, pattern(2, MiB));
    await b.volumes.create('local/gone', { sizeBytes: 32 * MiB });
    const [hurt] = fx.pool.chainFiles('hurt');
    const [gone] = fx.pool.chainFiles('gone');
    // point the L1 table past the end of the file
    const fd = openSync(hurt!, 'r+');
    const bad = Buffer.alloc(8);
    bad.writeBigUInt64BE(1n << 40n);
    writeSync(fd, bad, 0, 8, 40);
    closeSync(fd);
    (await import('node:fs')).rmSync(gone!);

    const report = await fx.pool.check({ repair: true });
    expect(report.clean).toBe(false);
    const kinds = report.issues.map((i) => [i.kind, i.volume, i.severity, i.repaired]);
    expect(kinds).toContainEqual(['damaged', 'hurt', 'error', false]);
    expect(kinds).toContainEqual(['missing-file', 'gone', 'error', false]);
    expect(existsSync(hurt!)).toBe(true);
  });
});

describe('qcow2 pool: a stream that finished on disk but not in the metadata', () => {
  it('pool check sees the header, --repair records it, and the parent can then go', async () => {
    const { streamTask } = await import('../../plugins/qcow2/jobs/index.js');
    const b = fx.broker;
    await b.volumes.create('local/p', { sizeBytes: 32 * MiB });
    await write(b, 'local/p', 0, pattern(4, MiB));
    await b.snapshots.create('local/p@s');
    await b.clone('local/p@s', 'local/c', { mode: 'linked' });
    const [top] = fx.pool.chainFiles('c');
    // The header rewrite happens, then the process dies before the metadata transaction.
    await streamTask(top!, {}).run(new JobRun({ jobId: 'test' }));

    const report = await fx.pool.check();
    expect(report.issues).toEqual([expect.objectContaining({ kind: 'backing-mismatch', volume: 'c', severity: 'repairable' })]);
    await expect(b.snapshots.delete('local/p@s')).rejects.toMatchObject({ code: 'FailedPrecondition' }); // metadata still says so
    expect((await fx.pool.check({ repair: true })).clean).toBe(true);
    expect((await b.volumes.get('local/c')).parent).toBeUndefined();
    await b.snapshots.delete('local/p@s');
    await b.volumes.delete('local/p');
    expect(Buffer.compare(await read(b, 'local/c', 0, MiB), Buffer.from(pattern(4, MiB)))).toBe(0);
  });
});
