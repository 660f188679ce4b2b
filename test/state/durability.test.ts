/**
 * The SQLite state store's promises outlive a power loss, not only a crash of the process: a job's
 * record (its insert and every checkpoint: a live copy's write-intent record, its switch-over, a
 * fill's progress) is synced to the disk before its call resolves; a lease's renewal and an operation's lock
 * rows, which mean nothing after a restart, are not (a sync each would cost them ~15×). Counted
 * as the fsync/fdatasync calls on the write-ahead log of a child process, under strace.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { tsChild } from '../support/ts-child.js';

// Where strace is missing, or may not trace (a container without ptrace), the case is skipped.
const strace = spawnSync('strace', ['-f', '-e', 'trace=none', 'true']).status === 0;
const dir = mkdtempSync(join(tmpdir(), 'offload-sync-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Syncs of the store's write-ahead log while a child makes `count` writes of `kind`. */
function walSyncs(kind: string, count: number): number {
  const file = join(dir, `${kind}.sqlite`);
  const r = spawnSync('strace', ['-f', '-y', '-e', 'trace=fsync,fdatasync', process.execPath, ...tsChild('test/state/sync-child.ts'), file, kind, String(count)], { encoding: 'utf8' });
  expect(r.stdout, r.stderr).toBe('done\n');
  return r.stderr.split('\n').filter((l) => /^(\[pid +\d+\] )?f(data)?sync\(\d+<[^>]*-wal>/.test(l)).length;
}

describe.skipIf(!strace)('the SQLite state store across a power loss', () => {
  it('a job\'s record and each of its checkpoints is synced before the call resolves; lease renewals and lock rows are not', () => {
    const N = 20;
    const inserted = walSyncs('insert', 0);
    expect(inserted).toBeGreaterThan(walSyncs('open', 0)); // the job's insert, one transaction
    expect(walSyncs('checkpoint', N) - inserted).toBeGreaterThanOrEqual(N);
    expect(walSyncs('lease', N) - inserted).toBeLessThan(3);
    expect(walSyncs('claim', N) - inserted).toBeLessThan(3);
  });
});
