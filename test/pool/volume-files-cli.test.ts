/**
 * `offload volume export|import` on a local pool, through the same `runCli` that `bin/offload`
 * runs (in-process): the final line, `--json` (the concluded job), the progress bar on a TTY,
 * relative paths, exit codes and one-line typed errors; `jobs list` and `plan` know both verbs.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, realpathSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli } from '../../core/index.js';
import { builtinPlugins } from '../../plugins/index.js';
import { HAVE_QEMU_IMG, MiB } from './pool-helpers.js';

let dir: string;

async function offload(args: string[], tty = false): Promise<{ status: number; stdout: string; stderr: string }> {
  let stdout = '';
  let stderr = '';
  const status = await runCli(['--config', join(dir, 'offload.yaml'), ...args], {
    plugins: builtinPlugins,
    io: { stdout: { write: (s: string) => (stdout += s) }, stderr: { write: (s: string) => (stderr += s), isTTY: tty } },
  });
  return { status, stdout, stderr };
}

const ok = async (...args: string[]) => {
  const r = await offload(args);
  expect(r.status, r.stderr).toBe(0);
  return r.stdout;
};

beforeAll(async () => {
  dir = realpathSync(mkdtempSync(join(tmpdir(), 'offload-volume-files-cli-')));
  mkdirSync(join(dir, 'pool'));
  writeFileSync(join(dir, 'offload.yaml'), 'state: ./state\nbackends:\n  - name: local\n    kind: qcow2\n    path: ./pool\n');
  await ok('volume', 'create', 'local/vm', '32M');
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('offload volume export|import', () => {
  it('exports with a progress bar on a TTY and one final line; the file is qemu-img clean and sparse', async () => {
    // Data for the volume: 2 MiB imported from a raw file.
    const seed = join(dir, 'seed.raw');
    writeFileSync(seed, Buffer.alloc(2 * MiB, 0x61));
    expect(await ok('volume', 'import', seed, 'local/vm')).toMatch(new RegExp(`^imported ${seed} \\(raw\\) into local/vm \\(2 MiB processed, job import-[0-9a-f]+\\)\\n$`));

    const tty = await offload(['volume', 'export', 'local/vm', join(dir, 'vm.qcow2'), '-O', 'qcow2'], true);
    expect(tty.status, tty.stderr).toBe(0);
    expect(tty.stderr).toMatch(/export local\/vm → .*vm\.qcow2 \[#+\] 100%\n$/);
    expect(tty.stdout).toMatch(new RegExp(`^exported local/vm to ${dir}/vm\\.qcow2 \\(qcow2; 2 MiB processed, job export-[0-9a-f]+\\)\\n$`));
    if (HAVE_QEMU_IMG) {
      expect(spawnSync('qemu-img', ['check', join(dir, 'vm.qcow2')]).status).toBe(0);
      const info = JSON.parse(spawnSync('qemu-img', ['info', '--output=json', join(dir, 'vm.qcow2')], { encoding: 'utf8' }).stdout) as Record<string, number>;
      expect(info['virtual-size']).toBe(32 * MiB);
      expect(info['actual-size']).toBeLessThan(3 * MiB);
    }
  });

  it('--json prints the concluded job; a relative FILE is taken from the working folder and stored absolute', async () => {
    const cwd = process.cwd();
    process.chdir(dir);
    let out: string;
    try {
      out = await ok('--json', 'volume', 'export', 'local/vm', 'rel.raw');
    } finally {
      process.chdir(cwd);
    }
    const job = JSON.parse(out) as { type: string; status: string; executor: string; params: { file: string; format: string } };
    expect(job).toMatchObject({ type: 'export', status: 'concluded', executor: 'host', params: { file: join(dir, 'rel.raw'), format: 'raw' } });
    expect(statSync(join(dir, 'rel.raw')).size).toBe(32 * MiB);
    expect(statSync(join(dir, 'rel.raw')).blocks * 512).toBeLessThanOrEqual(2 * MiB + 64 * 1024);
  });

  it('imports with a probed format, creates a volume with --create, and lists and plans both verbs', async () => {
    expect(await ok('volume', 'import', join(dir, 'vm.qcow2'), 'local/copy', '--create', '--verify')).toMatch(/^imported .*vm\.qcow2 \(qcow2\) into local\/copy, which it created \(/);
    expect(JSON.parse(await ok('--json', 'volume', 'show', 'local/copy'))).toMatchObject({ sizeBytes: 32 * MiB });
    expect(await ok('jobs', 'list')).toMatch(/import-\S+\s+import\s+concluded\s+local\/copy\s+host/);
    expect(await ok('plan', 'export', 'local/vm', 'x.qcow2')).toMatch(/^plan: host data mover: local\/vm into \/.*x\.qcow2\n {2}1\. data\.copy on host/);
    expect(await ok('plan', 'import', 'x.raw', 'local/new', '--create')).toMatch(/1\. volume\.create on backend:local.*\n {2}2\. data\.copy on host/);
  });

  it('errors are one line with their code: exit 1 for a failed operation, 2 for bad usage', async () => {
    const cases: [string[], number, RegExp][] = [
      [['volume', 'export', 'local/vm', join(dir, 'vm.qcow2')], 1, /^offload: AlreadyExists: .*vm\.qcow2 already exists \(choose another file, or replace it with --force\)$/],
      [['volume', 'export', 'local/vm', join(dir, 'x.vmdk'), '-O', 'vmdk'], 2, /^offload: InvalidArgument: unknown export format "vmdk" \(known formats: qcow2, raw\)$/],
      [['volume', 'export', 'local/vm', dir], 2, /^offload: InvalidArgument: .* is a directory/],
      [['volume', 'export', 'local/ghost', join(dir, 'ghost.raw')], 1, /^offload: NotFound: volume local\/ghost does not exist/],
      [['volume', 'import', join(dir, 'missing.raw'), 'local/vm'], 1, /^offload: NotFound: .*missing\.raw: no such file/],
      [['volume', 'import', join(dir, 'vm.qcow2'), 'local/ghost'], 1, /^offload: NotFound: volume local\/ghost does not exist \(create it first, or import with --create/],
      [['volume', 'import', join(dir, 'vm.qcow2'), 'local/vm', '-f', 'vhd'], 2, /^offload: InvalidArgument: unknown import format "vhd"/],
      [['volume', 'export', 'local/vm', join(dir, 'pool', 'in-pool.raw')], 2, /^offload: InvalidArgument: .*in-pool\.raw lies in the folder of a local pool/],
      [['volume', 'export', 'local/vm'], 2, /^offload: missing required argument 'file'$/],
    ];
    for (const [args, status, message] of cases) {
      const r = await offload(args);
      expect([r.status, r.stderr.trim().split('\n')], args.join(' ')).toEqual([status, [expect.stringMatching(message)]]);
    }
    expect(existsSync(join(dir, 'ghost.raw'))).toBe(false);
    expect(await ok('volume', 'export', 'local/vm', join(dir, 'vm.qcow2'), '-O', 'qcow2', '--force')).toMatch(/^exported/);
  });
});
