/**
 * The CLI on a `qcow2` backend with a config file: the same `runCli` that `bin/offload` runs,
 * in-process for speed (volume, snapshot, clone, stream, commit, pool check: output, exit codes,
 * one-line errors), and the real executable spawned once for a broken pool path.
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli } from '../../core/index.js';
import { builtinPlugins } from '../../plugins/index.js';

const ROOT = resolve(import.meta.dirname, '../..');
let dir: string;

async function offload(...args: string[]): Promise<{ status: number; stdout: string; stderr: string }> {
  let stdout = '';
  let stderr = '';
  const status = await runCli(['--config', join(dir, 'offload.yaml'), ...args], {
    plugins: builtinPlugins,
    io: { stdout: { write: (s: string) => (stdout += s) }, stderr: { write: (s: string) => (stderr += s) } },
  });
  return { status, stdout, stderr };
}

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'offload-pool-cli-'));
  mkdirSync(join(dir, 'pool'));
  writeFileSync(join(dir, 'offload.yaml'), 'state: ./state\nbackends:\n  - name: local\n    kind: qcow2\n    path: ./pool\n');
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('offload CLI on a qcow2 pool', () => {
  it('volume, snapshot, clone, stream, commit and pool check', async () => {
    const ok = (r: Awaited<ReturnType<typeof offload>>) => {
      expect(r.status, r.stderr).toBe(0);
      return r.stdout;
    };
    expect(ok(await offload('backends'))).toMatch(/local\s+qcow2\s+.*clone\.linked.*chain\.stream chain\.commit/);
    ok(await offload('volume', 'create', 'local/vm', '1G'));
    ok(await offload('snapshot', 'create', 'local/vm@s1'));
    expect(ok(await offload('clone', 'local/vm@s1', 'local/c', '--linked'))).toContain('linked to local/vm@s1');

    const refused = await offload('volume', 'delete', 'local/vm');
    expect(refused.status).toBe(1);
    expect(refused.stderr.trim().split('\n')).toHaveLength(1);
    expect(refused.stderr).toMatch(/FailedPrecondition: cannot delete local\/vm: linked clones depend on it: local\/c/);

    expect(ok(await offload('stream', 'local/c'))).toMatch(/stream local\/c: done .*backend:local/);
    ok(await offload('snapshot', 'delete', 'local/vm@s1'));
    ok(await offload('volume', 'delete', 'local/vm'));

    ok(await offload('snapshot', 'create', 'local/c@pre'));
    expect((await offload('commit', 'local/c')).status).toBe(1);
    expect(ok(await offload('commit', 'local/c', '--base', 'pre'))).toMatch(/commit local\/c: done/);

    const list = JSON.parse(ok(await offload('--json', 'volume', 'list', 'local'))) as { name: string; parent?: string }[];
    expect(list.map((v) => [v.name, v.parent])).toEqual([['c', undefined]]);
    expect(ok(await offload('pool', 'check', 'local'))).toContain('no problems found');

    writeFileSync(join(dir, 'pool', 'stray.img'), 'x');
    const check = JSON.parse(ok(await offload('--json', 'pool', 'check', 'local', '--repair'))) as { issues: { kind: string; file: string }[] };
    expect(check.issues).toEqual([expect.objectContaining({ kind: 'unknown-file', file: 'stray.img' })]);

    const bad = await offload('volume', 'create', 'local/zero', '0');
    expect(bad.status).toBe(2); // the core CLI maps InvalidArgument to exit 2
    expect(bad.stderr).toMatch(/InvalidArgument: size of local\/zero must be greater than 0/);
    const notPool = await offload('pool', 'check', 'nope');
    expect(notPool.status).not.toBe(0);
    expect(notPool.stderr).toMatch(/nope/);
  });

  it('a missing pool folder is a one-line config error (exit 2)', () => {
    writeFileSync(join(dir, 'broken.yaml'), 'state: ./state2\nbackends:\n  - name: local\n    kind: qcow2\n    path: ./no-such-pool\n');
    const r = spawnSync(process.execPath, ['--import', 'tsx', join(ROOT, 'bin/main.ts'), '--config', join(dir, 'broken.yaml'), 'volume', 'list', 'local'], { cwd: ROOT, encoding: 'utf8' });
    expect(r.status).toBe(2);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/pool folder .*no-such-pool does not exist/);
  });
});

describe('examples/local-pool.ts', () => {
  it('runs as is and says where each step ran', () => {
    const r = spawnSync(process.execPath, ['--import', 'tsx', join(ROOT, 'examples/local-pool.ts')], { cwd: ROOT, encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/linked clone local\/tour-clone: clone\.linked on backend:local/);
    expect(r.stdout).toMatch(/stream local\/tour-clone ran on backend:local: concluded/);
    expect(r.stdout).toMatch(/commit local\/tour-vm into before-patch ran on backend:local: concluded/);
    expect(r.stdout).toMatch(/reverted to golden: reads "boot sector v1"/);
    expect(r.stdout).toMatch(/pool check: 3 volumes, 3 files, no problems/);
  });
});
