/**
 * `offload nbd` as a user runs it: the real executable in its own process, serving in the
 * foreground like qemu-nbd. The URI is its first line of stdout; SIGTERM/SIGINT flush and exit 0;
 * `nbd list` and `nbd stop` from another process see and stop it; an administrator's request in
 * another process preempts a tenant's export.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createBroker, silentLogger, tenant } from '../../core/index.js';
import { qcow2Module } from '../../plugins/qcow2/module.js';
import { CMD, CMD_FLAG } from '../../core/export/nbd-protocol.js';
import { openExport, reply, request } from '../support/nbd-client.js';
import { HAVE, ok, qemuIo, tool } from '../support/nbd-tools.js';
import { tsChild } from '../support/ts-child.js';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '../..');
const MiB = 1024 * 1024;

interface Served { child: ChildProcess; first: string; exit: Promise<number | null>; stderr: () => string }

describe.skipIf(!HAVE.qemu)('offload nbd, the command', () => {
  let dir: string;
  let config: string;

  const cli = (...args: string[]) => spawnSync(process.execPath, [...tsChild('bin/main.ts'), '--config', config, ...args], { cwd: ROOT, encoding: 'utf8' });

  /** Start `offload nbd …` and wait for its first line. */
  async function serve(...args: string[]): Promise<Served> {
    const child = spawn(process.execPath, [...tsChild('bin/main.ts'), '--config', config, 'nbd', ...args], { cwd: ROOT });
    let err = '';
    child.stderr!.setEncoding('utf8').on('data', (d: string) => { err += d; });
    const exit = new Promise<number | null>((r) => child.on('exit', (code) => r(code)));
    const lines = createInterface({ input: child.stdout! });
    const first = await new Promise<string>((resolve, reject) => {
      lines.once('line', resolve);
      void exit.then((code) => reject(new Error(`offload nbd exited ${code} before printing its URI: ${err}`)));
    });
    return { child, first, exit, stderr: () => err };
  }

  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'offload-nbd-cli-'));
    mkdirSync(join(dir, 'pool'));
    config = join(dir, 'offload.yaml');
    writeFileSync(config, `state: ./state\nbackends:\n  - name: local\n    kind: qcow2\n    path: ./pool\n`);
    expect(cli('volume', 'create', 'local/vm1', '64M').status).toBe(0);
  });

  afterAll(() => {
    rmSync(dir, { recursive: true, force: true });
  });

  it('prints the URI first, serves qemu-io, is listed by another process, and flushes and exits 0 on SIGTERM', async () => {
    const s = await serve('local/vm1', '--port', '0');
    expect(s.first).toMatch(/^nbd:\/\/127\.0\.0\.1:\d+\/local\/vm1$/);
    await qemuIo(s.first, ['write -P 0x3c 0 1M', 'write -z 1M 1M', 'read -P 0x3c 0 1M']);
    const list = cli('--json', 'nbd', 'list');
    expect(list.status).toBe(0);
    expect(JSON.parse(list.stdout)).toEqual([expect.objectContaining({ name: 'local/vm1', ref: 'local/vm1', uri: s.first, readOnly: false, pid: s.child.pid })]);
    const busy = cli('volume', 'delete', 'local/vm1');
    expect(busy.status).toBe(1);
    expect(busy.stderr).toMatch(/Busy.*export local\/vm1/);
    s.child.kill('SIGTERM');
    expect(await s.exit).toBe(0);
    // Flushed and closed: the pool's file is clean (qemu-img check) and holds the write.
    for (const f of readdirSync(join(dir, 'pool')).filter((n) => n.endsWith('.qcow2'))) await ok('qemu-img', ['check', join(dir, 'pool', f)]);
    const s2 = await serve('local/vm1', '--port', '0', '--read-only', '--name', 'again');
    expect(s2.first).toMatch(/\/again$/);
    await qemuIo(s2.first, ['read -P 0x3c 0 1M', 'read -P 0 1M 1M'], { readOnly: true });
    s2.child.kill('SIGINT');
    expect(await s2.exit).toBe(0);
    expect(JSON.parse(cli('--json', 'nbd', 'list').stdout)).toEqual([]);
  });

  it('--json prints one line of JSON first; `nbd stop` from another process ends it (exit 1: stopped from elsewhere)', async () => {
    const s = await serve('local/vm1', '--port', '0', '--json');
    const info = JSON.parse(s.first) as { name: string; uri: string; readOnly: boolean };
    expect(info).toMatchObject({ name: 'local/vm1', readOnly: false });
    const stop = cli('nbd', 'stop', 'local/vm1');
    expect(stop.status).toBe(0);
    expect(stop.stdout).toMatch(/stopped export local\/vm1/);
    expect(await s.exit).toBe(1);
    expect(s.stderr()).toMatch(/stopped by another request/);
    expect(cli('nbd', 'stop', 'local/vm1').status).toBe(1); // NotFound now
  });

  it('a snapshot from another process of a volume exported read-write is taken (and deleted) by the serving process, within its export, with every write acknowledged before it; one is exported alongside; a live copy is run there', async () => {
    const s = await serve('local/vm1', '--port', '0');
    await qemuIo(s.first, ['write -P 0x11 0 1M']);
    const snap = cli('snapshot', 'create', 'local/vm1@live1');
    expect(snap.status, snap.stderr).toBe(0);
    // The export goes on.
    await qemuIo(s.first, ['write -P 0x22 0 64k', 'read -P 0x22 0 64k', 'read -P 0x11 64k 960k']);
    // A backup from another process too: its marker is taken by the serving process, and the point copied from it here.
    const bk = cli('backup', 'local/vm1', '--to', 'local/vm1-bk');
    expect(bk.status, bk.stderr).toBe(0);
    // A rotation from another process (this one): a snapshot taken and deleted by the serving
    // process (its layer merged into the image qemu-io writes to), the export going on.
    const here = await createBroker(config, { plugins: [qcow2Module], logger: silentLogger });
    try {
      await here.snapshots.create('local/vm1@rot');
      await here.snapshots.delete('local/vm1@rot');
      expect((await here.snapshots.list('local/vm1')).map((x) => x.name)).not.toContain('rot');
      // A snapshot exported read-only here while that process serves the volume read-write.
      const point = await here.exports.start('local/vm1@live1', { name: 'point', listen: { host: '127.0.0.1', port: 0 } });
      await qemuIo(point.uri, ['read -P 0x11 0 1M'], { readOnly: true });
      await qemuIo(s.first, ['write -P 0x23 1M 64k']);
      await point.stop();
    } finally {
      await here.close();
    }
    await qemuIo(s.first, ['read -P 0x22 0 64k', 'read -P 0x11 64k 960k', 'read -P 0x23 1M 64k']);
    // A serving process that does not answer (stopped): Timeout after lockWaitSeconds, the request withdrawn — it is not made later.
    const quick = join(dir, 'quick.yaml');
    writeFileSync(quick, 'state: ./state\nlockWaitSeconds: 1\nbackends:\n  - name: local\n    kind: qcow2\n    path: ./pool\n');
    s.child.kill('SIGSTOP');
    const stalled = spawnSync(process.execPath, [...tsChild('bin/main.ts'), '--config', quick, 'snapshot', 'create', 'local/vm1@late'], { cwd: ROOT, encoding: 'utf8' });
    s.child.kill('SIGCONT');
    expect(stalled.status).toBe(1);
    expect(stalled.stderr).toMatch(/Timeout: snapshot local\/vm1@late: the process serving its export .* did not answer within 1 s/);
    await new Promise((r) => setTimeout(r, 600)); // its poller runs again
    // A live copy from another process's CLI (no service named): run by the serving process, which
    // switches its export over; completed and followed from here.
    const live = cli('copy', '--live', 'local/vm1', 'local/vm1-moved', '--detach');
    expect(live.status, live.stderr).toBe(0);
    const moved = await createBroker(config, { plugins: [qcow2Module], logger: silentLogger });
    try {
      const id = live.stdout.trim();
      for (let i = 0; i < 1000 && (await moved.jobs.get(id)).info().status !== 'ready'; i++) await new Promise((r) => setTimeout(r, 20));
      await moved.jobs.complete(id);
      expect((await (await moved.jobs.get(id)).wait()).authoritative).toEqual({ side: 'target', ref: 'local/vm1-moved' });
    } finally {
      await moved.close();
    }
    await qemuIo(s.first, ['write -P 0x44 2M 64k', 'read -P 0x23 1M 64k']);
    s.child.kill('SIGTERM');
    expect(await s.exit).toBe(0);
    for (const f of readdirSync(join(dir, 'pool')).filter((n) => n.endsWith('.qcow2'))) await ok('qemu-img', ['check', join(dir, 'pool', f)]);
    // Read back here (in this process: no more spawning): the snapshot holds the writes made
    // before it, not the one after; the backup point the same; the timed-out one was never made.
    const b = await createBroker(config, { plugins: [qcow2Module], logger: silentLogger });
    try {
      const names = (await b.snapshots.list('local/vm1')).map((x) => x.name);
      expect(names).toContain('live1');
      expect(names).not.toContain('late');
      for (const [ref, cmds] of [['local/vm1@live1', ['read -P 0x11 0 1M']], ['local/vm1-bk@b1', ['read -P 0x22 0 64k', 'read -P 0x11 64k 960k']],
        ['local/vm1-moved', ['read -P 0x22 0 64k', 'read -P 0x11 64k 960k', 'read -P 0x23 1M 64k', 'read -P 0x44 2M 64k']], ['local/vm1', ['read -P 0 2M 64k']]] as const) {
        const e = await b.exports.start(ref, { name: 'check', readOnly: true, listen: { host: '127.0.0.1', port: 0 } });
        try {
          await qemuIo(e.uri, [...cmds], { readOnly: true });
        } finally {
          await b.exports.stop('check');
        }
      }
      await b.snapshots.delete('local/vm1@live1');
    } finally {
      await b.close();
    }
  });

  it('a unix socket', async () => {
    const sock = join(dir, 'vm1.sock');
    const s = await serve('local/vm1', '--socket', sock);
    expect(s.first).toBe(`nbd+unix:///local/vm1?socket=${sock}`);
    const info = JSON.parse(await ok('qemu-img', ['info', '--output=json', s.first])) as { 'virtual-size': number };
    expect(info['virtual-size']).toBe(64 * MiB);
    s.child.kill('SIGTERM');
    expect(await s.exit).toBe(0);
  });

  it('--tls psk:FILE and x509:FOLDER, as qemu-nbd --tls-creds: QEMU reads and writes with the credentials, a plain client is refused; bad --tls exits 2', async () => {
    const key = randomBytes(32).toString('hex');
    const psk = join(dir, 'keys.psk');
    writeFileSync(psk, `alice:${key}\n`);
    mkdirSync(join(dir, 'qemu-psk'), { recursive: true });
    writeFileSync(join(dir, 'qemu-psk', 'keys.psk'), `alice:${key}\n`);
    const s = await serve('local/vm1', '--port', '0', '--tls', `psk:${psk}`);
    expect(s.first).toMatch(/^nbds:\/\/127\.0\.0\.1:\d+\/local\/vm1$/);
    const port = /:(\d+)\//.exec(s.first)![1]!;
    const target = (creds: string) => `driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=${port},export=local/vm1,tls-creds=${creds}`;
    await ok('qemu-io', ['--object', `tls-creds-psk,id=tls0,endpoint=client,dir=${join(dir, 'qemu-psk')},username=alice`, '--image-opts', target('tls0'),
      '-c', 'write -P 0x6d 2M 64k', '-c', 'read -P 0x6d 2M 64k']);
    const plain = spawnSync('qemu-img', ['info', `nbd://127.0.0.1:${port}/local/vm1`], { encoding: 'utf8' });
    expect(plain.status).not.toBe(0);
    expect(plain.stderr).toMatch(/TLS/);
    s.child.kill('SIGTERM');
    expect(await s.exit).toBe(0);

    const creds = join(ROOT, 'test/support/tls');
    const x = await serve('local/vm1', '--port', '0', '--read-only', '--tls', `x509:${join(creds, 'server')}`, '--tls-allow', 'alice');
    const xport = /:(\d+)\//.exec(x.first)![1]!;
    await ok('qemu-img', ['info', '--object', `tls-creds-x509,id=tls0,endpoint=client,dir=${join(creds, 'client')}`,
      '--image-opts', `driver=nbd,server.type=inet,server.host=localhost,server.port=${xport},export=local/vm1,tls-creds=tls0`]);
    x.child.kill('SIGTERM');
    expect(await x.exit).toBe(0);

    for (const args of [['--tls', 'nope:x'], ['--tls-allow', 'alice'], ['--tls', `psk:${psk}`, '--tls-allow', 'alice']]) {
      const r = cli('nbd', 'local/vm1', '--port', '0', ...args);
      expect(r.status, r.stderr).toBe(2);
    }
    const missing = cli('nbd', 'local/vm1', '--port', '0', '--tls', `psk:${join(dir, 'absent.psk')}`);
    expect(missing.status).not.toBe(0);
    expect(missing.stderr).toMatch(/absent\.psk/);
  });

  it('bad usage exits 2 with one line; a port in use is Busy (exit 1)', async () => {
    for (const args of [['local/vm1', '--socket', '/tmp/x.sock', '--port', '1'], ['local/vm1', '--port', 'abc'], ['local/vm1', '--port', '70000']]) {
      const r = cli('nbd', ...args);
      expect(r.status).toBe(2);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
    }
    const s = await serve('local/vm1', '--port', '0', '--read-only');
    const port = /:(\d+)\//.exec(s.first)![1]!;
    const r = cli('nbd', 'local/vm1', '--read-only', '--name', 'second', '--port', port);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/Busy.*in use/);
    s.child.kill('SIGTERM');
    expect(await s.exit).toBe(0);
  });

  it('killed with SIGKILL while a client writes: every write it acknowledged with FUA (or before a flush) is there after restart', async () => {
    expect(cli('volume', 'create', 'local/crash', '32M').status).toBe(0);
    for (const round of [0, 1, 2]) {
      const s = await serve('local/crash', '--port', '0');
      const c = await openExport(Number(/:(\d+)\//.exec(s.first)![1]), 'local/crash');
      const acked: number[] = [];
      let flushedUpTo = 0;
      const killAt = 40 + round * 70;
      const writer = (async () => {
        for (let i = 0; i < 400; i++) {
          const fua = i % 3 === 0;
          request(c.wire, CMD.WRITE, i * 65536, 65536, { payload: Buffer.alloc(65536, (i % 250) + 1 + round), flags: fua ? CMD_FLAG.FUA : 0 });
          if ((await reply(c.wire)).error !== 0) return;
          if (fua) acked.push(i);
          if (i % 10 === 9) {
            request(c.wire, CMD.FLUSH, 0, 0);
            if ((await reply(c.wire)).error !== 0) return;
            flushedUpTo = i + 1;
          }
          if (i === killAt) s.child.kill('SIGKILL');
        }
      })().catch(() => undefined); // the server vanished mid-request
      await writer;
      await s.exit;
      c.wire.close();
      const b = await createBroker(config, { plugins: [qcow2Module], logger: silentLogger });
      try {
        const d = await b.volumes.open('local/crash', 'r');
        const must = new Set([...acked, ...Array.from({ length: flushedUpTo }, (_, i) => i)]);
        expect(must.size).toBeGreaterThan(10);
        for (const i of must) {
          expect(Buffer.from(await d.read(i * 65536, 65536)).equals(Buffer.alloc(65536, (i % 250) + 1 + round))).toBe(true);
        }
        await d.close();
      } finally {
        await b.close();
      }
      for (const f of readdirSync(join(dir, 'pool')).filter((n) => n.startsWith('crash'))) {
        const check = await tool('qemu-img', ['check', join(dir, 'pool', f)]);
        expect(check.status === 0 || /leaked clusters/.test(check.stdout), check.stdout).toBe(true); // leaks are harmless; corruption is not
      }
    }
  });

  it('an administrator in another process preempts a tenant\'s export for a delete (the export stops, the delete goes through), not for a snapshot', async () => {
    const b = await createBroker(config, { plugins: [qcow2Module], logger: silentLogger, principal: tenant('t1') });
    try {
      await b.volumes.create('local/t1vm', { sizeBytes: 4 * MiB });
      const e = await b.exports.start('local/t1vm', { listen: { port: 0 } });
      // An administrator's snapshot does not stop it: this process takes the snapshot (and must be free to hear the call).
      const snap = await tool(process.execPath, [...tsChild('bin/main.ts'), '--config', config, 'snapshot', 'create', 'local/t1vm@adm'], { cwd: ROOT });
      expect(snap.status, snap.stderr).toBe(0);
      expect((await b.exports.list()).map((x) => x.name)).toEqual(['local/t1vm']);
      expect((await b.snapshots.list('local/t1vm')).map((x) => x.name)).toEqual(['adm']);
      // The CLI acts as the administrator; run without blocking this process, which must hear the request to stop.
      const del = await tool(process.execPath, [...tsChild('bin/main.ts'), '--config', config, 'volume', 'delete', 'local/t1vm'], { cwd: ROOT });
      expect(del.stderr).toBe('');
      expect(del.status).toBe(0);
      await e.stopped;
      expect((await b.exports.list())).toEqual([]);
    } finally {
      await b.close();
    }
  });
});
