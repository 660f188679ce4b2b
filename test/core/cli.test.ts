import { spawnSync } from 'node:child_process';
import { closeSync, copyFileSync, mkdtempSync, openSync, readFileSync, realpathSync, rmSync, symlinkSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { runCli } from '../../core/index.js';
import { memoryModule } from '../support/memory-backend.js';
import { tickerModule } from '../support/ticker-backend.js';

const root = resolve(import.meta.dirname, '../..');
const dir = mkdtempSync(join(tmpdir(), 'offload-cli-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const SECRET = 'tok-Zq8-very-secret';
const config = join(dir, 'offload.yaml');
writeFileSync(config, [
  'state: ./state',
  'backends:',
  '  - name: mem',
  '    kind: memory',
  '    secret: ${MEM_SECRET}',
  '  - name: tick',
  '    kind: ticker',
  '    steps: 5',
  '    stepMs: 1',
].join('\n'));

/** Run the CLI in this process (a new broker each time, as a new process would open). */
async function offload(...args: string[]) {
  let out = '';
  let err = '';
  const code = await runCli(['--config', config, ...args], {
    plugins: [memoryModule, tickerModule],
    env: { ...process.env, MEM_SECRET: SECRET },
    io: { stdout: { write: (s: string) => (out += s) }, stderr: { write: (s: string) => (err += s) } },
  });
  return { code, out, err };
}

describe('offload CLI (core verbs)', () => {
  it('lists backends with their capabilities, as a table and as JSON', async () => {
    const t = await offload('backends');
    expect(t.code).toBe(0);
    expect(t.out).toMatch(/^NAME\s+KIND\s+CAPABILITIES/);
    expect(t.out).toMatch(/mem\s+memory\s+volume\.create .*clone\.linked/);
    expect(t.out).toMatch(/tick\s+ticker\s+volume\.list chain\.stream/);
    const j = (await offload('--json', 'backends'));
    expect(JSON.parse(j.out)).toEqual(expect.arrayContaining([expect.objectContaining({ name: 'mem', kind: 'memory', capabilities: expect.objectContaining({ 'clone.full': {} }) })]));
  });

  it('a broken config is one line naming the path, exit 2, no stack trace', async () => {
    const bad = join(dir, 'bad.yaml');
    writeFileSync(bad, 'backends:\n  - name: mem\n    kind: memory\n  - name: x\n    kind: nfs\n');
    const r = spawnSync(process.execPath, ['--import', 'tsx', join(root, 'test/support/cli-with-memory.ts'), '--config', bad, 'backends'], { cwd: root, encoding: 'utf8' });
    expect(r.status).toBe(2);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/backends\[1\]\.kind: unknown kind "nfs" \(known kinds: memory, ticker\)/);
    expect(r.stderr).not.toMatch(/\s+at /);
  });

  it('exit codes: 0 success, 1 failed operation, 2 bad usage', async () => {
    expect((await offload('volume', 'create', 'mem/v1', '64M')).code).toBe(0);
    const missing = (await offload('volume', 'show', 'mem/ghost'));
    expect(missing.code).toBe(1);
    expect(missing.err).toMatch(/^offload: NotFound: volume mem\/ghost does not exist/);
    expect((await offload('frobnicate')).code).toBe(2);
    expect((await offload()).code).toBe(2);
    expect((await offload('volume')).code).toBe(2);
    expect((await offload('--help')).code).toBe(0);
    expect((await offload('volume', 'create', 'mem/v1')).code).toBe(2);
    expect((await offload('volume', 'create', 'mem/bad name', '1M')).code).toBe(2);
    expect((await offload('volume', 'create', 'mem/v2', '12X')).code).toBe(2);
  });

  it('never prints a secret: errors and --json output are redacted', async () => {
    const r = (await offload('--json', 'volume', 'show', `mem/${SECRET}`));
    expect(r.code).toBe(1);
    expect(r.out + r.err).not.toContain(SECRET);
    expect(r.err).toContain('***');
    expect(JSON.parse(r.out)).toMatchObject({ error: { code: 'NotFound' } });
  });

  it('plans without running, and says when something is unsupported', async () => {
    const p = (await offload('plan', 'clone', 'mem/a@s', 'mem/b', '--linked'));
    expect(p.code).toBe(0);
    expect(p.out).toMatch(/clone\.linked on backend:mem/);
    const u = (await offload('plan', 'commit', 'mem/a'));
    expect(u.code).toBe(1);
    expect(u.out).toMatch(/unsupported: .*chain\.commit/);
    expect((await offload('plan', 'teleport', 'x')).code).toBe(2);
  });

  it('runs a job to the end, and the job is listed afterwards from another process', async () => {
    const s = (await offload('stream', 'tick/v'));
    expect(s.code).toBe(0);
    expect(s.out).toMatch(/stream tick\/v: done \(job stream-[0-9a-f]+, backend:tick, 5 MiB processed\)/);
    const l = (await offload('--json', 'jobs', 'list'));
    const jobs = JSON.parse(l.out) as { id: string; status: string; executor: string }[];
    expect(jobs.some((j) => j.status === 'concluded' && j.executor === 'backend:tick')).toBe(true);
    const id = jobs[0]!.id;
    expect((await offload('jobs', 'show', id)).out).toMatch(/status: concluded/);
    expect((await offload('jobs', 'cancel', id)).code).toBe(1); // concluded: cancel is not allowed
    expect((await offload('jobs', 'dismiss', id)).code).toBe(0);
    expect((await offload('jobs', 'show', id)).code).toBe(1);
  });

  it('maintenance locks outlive the process that placed them', async () => {
    expect((await offload('locks', 'maintenance', 'mem/v1', '--reason', 'disk swap')).code).toBe(0);
    const l = (await offload('locks', 'list'));
    expect(l.out).toMatch(/mem\/v1\s+maintenance/);
    expect((await offload('locks', 'release', 'mem/v1')).code).toBe(0);
    expect((await offload('locks', 'list')).out).toMatch(/\(none\)/);
  });
});

describe('bin/offload (the built executable)', () => {
  it('runs after npm install and reports a broken config in one line with exit 2', () => {
    const bad = join(dir, 'bad2.yaml');
    writeFileSync(bad, 'backends:\n  - name: x\n    kind: flasharray\n    endpoint: nope\n');
    const r = spawnSync(join(root, 'bin/offload'), ['--config', bad, 'backends'], { cwd: dir, encoding: 'utf8' });
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/^offload: config error: backends\[0\]\./);
    expect(r.status).toBe(2);
  });

  it('runs `img` commands from the bundle and ends quietly when its reader goes away', () => {
    const img = join(dir, 'bin-img.qcow2');
    const created = spawnSync(join(root, 'bin/offload'), ['img', 'create', '-f', 'qcow2', img, '64M'], { cwd: dir, encoding: 'utf8' });
    expect(created.stderr).toBe('');
    expect(created.status).toBe(0);
    const info = spawnSync(join(root, 'bin/offload'), ['img', 'info', '--output=json', img], { cwd: dir, encoding: 'utf8' });
    expect(JSON.parse(info.stdout)['virtual-size']).toBe(64 << 20);
    // A raw file with 2048 data extents maps to ~200 KB of JSON, more than a pipe holds: `head -c 1`
    // closes the pipe early and the next write fails with EPIPE, which must not print a stack trace.
    const raw = join(dir, 'bin-many-extents.raw');
    const fd = openSync(raw, 'w');
    for (let i = 0; i < 2048; i++) writeSync(fd, Buffer.alloc(4096, 1), 0, 4096, i * 8192);
    closeSync(fd);
    const piped = spawnSync('sh', ['-c', `"${join(root, 'bin/offload')}" img map --output=json -f raw "${raw}" | head -c 1 >/dev/null`], { cwd: dir, encoding: 'utf8' });
    expect(piped.stderr).toBe('');
  });

  it('runs `img` from its own bundle with its code cache, without the modules it does not need', () => {
    const img = join(dir, 'bin-own-bundle.qcow2');
    expect(spawnSync(join(root, 'bin/offload'), ['img', 'create', '-q', '-f', 'qcow2', img, '1M']).status).toBe(0);
    // A preload records which file node ran, which builtins got loaded and whether V8 took the
    // code cache (vm.Script's cachedDataRejected: false taken, true rejected, undefined none given).
    const preload = join(dir, 'record-start.cjs');
    const record = join(dir, 'start.json');
    writeFileSync(preload, [
      "const vm = require('node:vm');",
      'const rejected = [];',
      'const Script = vm.Script;',
      'vm.Script = class extends Script { constructor(...a) { super(...a); rejected.push(this.cachedDataRejected); } };',
      "process.on('exit', () => require('node:fs').writeFileSync(process.env.RECORD_OUT, JSON.stringify({ main: process.argv[1], modules: process.moduleLoadList, rejected })));",
    ].join('\n'));
    const r = spawnSync(join(root, 'bin/offload'), ['img', 'info', img], {
      cwd: dir, encoding: 'utf8', env: { ...process.env, RECORD_OUT: record, NODE_OPTIONS: `--require ${preload}` },
    });
    expect(r.stderr).toBe('');
    expect(r.stdout).toMatch(/^image: .*\nfile format: qcow2\n/);
    const started = JSON.parse(readFileSync(record, 'utf8')) as { main: string; modules: string[]; rejected: (boolean | undefined)[] };
    expect(started.main).toBe(join(realpathSync(root), 'dist/cli/img.cjs'));
    expect(started.rejected).toEqual([false]);
    // commander's child_process (which brings dgram) and zlib (compressed clusters only) are
    // loaded when used.
    for (const m of ['child_process', 'dgram', 'zlib']) expect(started.modules).not.toContain(`NativeModule ${m}`);
    // What it prints goes straight to the descriptor: no stream for stdout (a pipe here), so
    // neither net nor tty is loaded.
    for (const m of ['net', 'tty']) expect(started.modules).not.toContain(`NativeModule ${m}`);
  });

  it.skipIf(spawnSync('python3', ['--version']).status !== 0)('img output to a non-blocking pipe that is full waits for its reader (EAGAIN), nothing lost', () => {
    // 2048 data extents: ~200 KB of map JSON into a 64 KiB pipe that nobody reads for 0.3 s,
    // opened O_NONBLOCK (as some parents do), so a direct write fails with EAGAIN midway.
    const raw = join(dir, 'nonblock-extents.raw');
    const fd = openSync(raw, 'w');
    for (let i = 0; i < 2048; i++) writeSync(fd, Buffer.alloc(4096, 1), 0, 4096, i * 8192);
    closeSync(fd);
    const expected = spawnSync(join(root, 'bin/offload'), ['img', 'map', '--output=json', '-f', 'raw', raw], { encoding: 'utf8', maxBuffer: 1 << 24 });
    expect(expected.status).toBe(0);
    expect(expected.stdout.length).toBeGreaterThan(128 * 1024);
    const script = [
      'import fcntl, os, subprocess, sys, time',
      'r, w = os.pipe()',
      'fcntl.fcntl(w, fcntl.F_SETFL, fcntl.fcntl(w, fcntl.F_GETFL) | os.O_NONBLOCK)',
      'p = subprocess.Popen(sys.argv[1:], stdout=w)',
      'os.close(w)',
      'time.sleep(0.3)',
      'chunks = []',
      'while True:',
      '    b = os.read(r, 65536)',
      '    if not b: break',
      '    chunks.append(b)',
      'sys.stdout.buffer.write(b"".join(chunks))',
      'sys.exit(p.wait())',
    ].join('\n');
    const r = spawnSync('python3', ['-c', script, join(root, 'bin/offload'), 'img', 'map', '--output=json', '-f', 'raw', raw], { encoding: 'utf8', maxBuffer: 1 << 24 });
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(r.stdout).toBe(expected.stdout);
  });

  it('runs the img bundle the same without its code cache, or with one V8 rejects', () => {
    const img = join(dir, 'bin-no-cache.qcow2');
    const copy = mkdtempSync(join(tmpdir(), 'offload-img-copy-'));
    try {
      for (const f of ['img.cjs', 'img-bundle.cjs']) copyFileSync(join(root, 'dist/cli', f), join(copy, f));
      const run = (...args: string[]) => spawnSync(process.execPath, [join(copy, 'img.cjs'), 'img', ...args], { cwd: dir, encoding: 'utf8' });
      expect(run('create', '-f', 'qcow2', img, '1M').status).toBe(0);
      const info = run('info', '--output=json', img);
      expect(JSON.parse(info.stdout)['virtual-size']).toBe(1 << 20);
      writeFileSync(join(copy, 'img-bundle.cjs.cache'), 'not a code cache');
      const again = run('info', '--output=json', img);
      expect(again.stderr).toBe('');
      expect(again.stdout).toBe(info.stdout);
      expect(run('info').status).toBe(1); // bad usage, as qemu-img
    } finally {
      rmSync(copy, { recursive: true, force: true });
    }
  });

  it('runs through a symlink to bin/offload (as node_modules/.bin/offload), img and other commands', () => {
    const link = join(dir, 'offload-link');
    symlinkSync(join(root, 'bin/offload'), link);
    const r = spawnSync(link, ['--help'], { cwd: dir, encoding: 'utf8' });
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/^Usage: offload \[options\] \[command\]/);
    expect(r.stdout).toMatch(/\n {2}volume /);
    expect(r.stdout).toMatch(/\n {2}img /);
    const img = spawnSync(link, ['img', 'create', '-f', 'qcow2', join(dir, 'via-link.qcow2'), '1M'], { cwd: dir, encoding: 'utf8' });
    expect(img.stderr).toBe('');
    expect(img.status).toBe(0);
  });
});
