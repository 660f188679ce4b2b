/**
 * Broker.reconfigure: a running broker's config changed without a restart — backends added,
 * changed (made anew: another array, a rotated token) and taken away, and nbd.tls's settings —
 * with the real plugins: qcow2 pools and two FlashArray mocks (two "arrays"). What `offload serve`
 * does on SIGHUP (test/service/service-reload.test.ts).
 */
import { copyFileSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createBroker, silentLogger, type Broker, type RawConfig } from '../../core/index.js';
import { startFlashArrayMock, type FlashArrayMock } from '../../plugins/flasharray/appliance/index.js';
import { builtinPlugins } from '../../plugins/index.js';
import { HAVE, tool } from '../support/nbd-tools.js';
import { tickerModule } from '../support/ticker-backend.js';
import { SqliteStateStore } from '../../core/state/sqlite/sqlite-store.js';
import { until } from '../service/service-helpers.js';

const MiB = 1024 * 1024;
const CREDS = join(import.meta.dirname, '../support/tls');
const dir = mkdtempSync(join(tmpdir(), 'offload-reconfigure-'));
let arrayA: FlashArrayMock;
let arrayB: FlashArrayMock;
let broker: Broker;

const pool = (name: string, extra: Record<string, unknown> = {}) => ({ name, kind: 'qcow2', path: join(dir, name), ...extra });
const san = (array: FlashArrayMock, apiToken = array.apiToken) => ({ name: 'san', kind: 'flasharray', endpoint: array.url, apiToken, retry: { maxAttempts: 1 } });
const config = (backends: Record<string, unknown>[], more: Partial<RawConfig> = {}): RawConfig => ({ state: join(dir, 'state'), ...more, backends });
const names = async () => (await broker.backends()).map((b) => b.name).sort();

beforeAll(async () => {
  for (const p of ['local', 'second']) mkdirSync(join(dir, p));
  [arrayA, arrayB] = await Promise.all([startFlashArrayMock(), startFlashArrayMock()]);
  broker = await createBroker(config([pool('local'), san(arrayA)]), { plugins: builtinPlugins, logger: silentLogger });
});

afterAll(async () => {
  await broker?.close();
  await Promise.all([arrayA?.close(), arrayB?.close()]);
  rmSync(dir, { recursive: true, force: true });
});

describe('Broker.reconfigure', () => {
  it('a backend added is used at once; a changed entry takes the old one’s place for what comes after; one left out is taken away', async () => {
    await broker.volumes.create('san/on-a', { sizeBytes: MiB });
    expect(await broker.reconfigure(config([pool('local'), san(arrayA), pool('second')]))).toEqual({
      added: ['second'], replaced: [], removed: [], kept: [], failed: [], restartNeeded: [],
    });
    expect(await names()).toEqual(['local', 'san', 'second']);
    await broker.volumes.create('second/v', { sizeBytes: MiB });
    expect(await broker.clone('second/v', 'local/from-second')).toMatchObject({ sizeBytes: MiB });

    // The array's entry changed (here another array): what comes after goes to the new one.
    expect(await broker.reconfigure(config([pool('local'), san(arrayB), pool('second')]))).toMatchObject({ replaced: ['san'], added: [], removed: [] });
    await expect(broker.volumes.get('san/on-a')).rejects.toMatchObject({ code: 'NotFound' });
    await broker.volumes.create('san/on-b', { sizeBytes: MiB });
    expect(await broker.reconfigure(config([pool('local'), san(arrayA), pool('second')]))).toMatchObject({ replaced: ['san'] });
    expect(await broker.volumes.get('san/on-a')).toMatchObject({ name: 'on-a' });
    await expect(broker.volumes.get('san/on-b')).rejects.toMatchObject({ code: 'NotFound' });

    // The same config again changes nothing; a pool left out is gone.
    expect(await broker.reconfigure(config([pool('local'), san(arrayA), pool('second')]))).toEqual({
      added: [], replaced: [], removed: [], kept: [], failed: [], restartNeeded: [],
    });
    expect(await broker.reconfigure(config([pool('local'), san(arrayA)]))).toMatchObject({ removed: ['second'] });
    await expect(broker.volumes.get('second/v')).rejects.toMatchObject({ code: 'NotFound', message: 'backend "second" is not configured' });
    expect(await names()).toEqual(['local', 'san']);
  });

  it('a backend in use here (an export) stays until it is not; the export serves on meanwhile', async () => {
    expect(await broker.reconfigure(config([pool('local'), san(arrayA), pool('second')]))).toMatchObject({ added: ['second'] });
    const exp = await broker.exports.start('second/v', { name: 'busy', readOnly: true, listen: { port: 0 } });
    try {
      const r = await broker.reconfigure(config([pool('local'), san(arrayA)]));
      expect(r).toMatchObject({ removed: [], kept: [{ name: 'second', reason: 'it is no longer configured, but it is in use here (nothing new starts on it): nbd export busy of second/v (read-only)' }] });
      expect(await names()).toEqual(['local', 'san', 'second']);
      if (HAVE.libnbd) expect((await tool('nbdinfo', ['--size', exp.uri])).stdout.trim()).toBe(String(MiB));
      // Draining: what runs goes on, nothing new starts on it.
      const draining = { code: 'FailedPrecondition', message: `backend "second" is being taken out of this broker's config: it takes no new operation (those running go on)` };
      await expect(broker.volumes.create('second/new', { sizeBytes: MiB })).rejects.toMatchObject(draining);
      await expect(broker.exports.start('second/v', { name: 'another', readOnly: true, listen: { port: 0 } })).rejects.toMatchObject(draining);
      await expect(broker.clone('second/v', 'local/v-copy')).rejects.toMatchObject(draining);
      // Nor a live copy into it, though it works within its source's export here; nor a backup of it (before its marker is taken).
      await broker.volumes.create('local/lsrc', { sizeBytes: MiB });
      const src = await broker.exports.start('local/lsrc', { name: 'lsrc', listen: { port: 0 } });
      await expect(broker.copy('local/lsrc', 'second/ltgt', { live: true })).rejects.toMatchObject(draining);
      await src.stop();
      await expect(broker.backups.start('second/v', { to: 'local/v-bk' })).rejects.toMatchObject(draining);
      expect((await broker.snapshots.list('second/v')).map((x) => x.name)).toEqual([]);
      // Configured again, it takes new work.
      expect(await broker.reconfigure(config([pool('local'), san(arrayA), pool('second')]))).toMatchObject({ added: [], removed: [], kept: [] });
      await broker.volumes.create('second/new', { sizeBytes: MiB });
      await broker.volumes.delete('second/new');
      expect(await broker.reconfigure(config([pool('local'), san(arrayA)]))).toMatchObject({ kept: [{ name: 'second' }] });
    } finally {
      await exp.stop();
    }
    expect(await broker.reconfigure(config([pool('local'), san(arrayA)]))).toMatchObject({ removed: ['second'], kept: [] });
    expect(await names()).toEqual(['local', 'san']);
  });

  it('a backend whose entry changed stays while a job of this broker runs on it (the job never goes on against the new one), and is replaced once it ended', async () => {
    for (const d of ['dst-a', 'dst-b']) mkdirSync(join(dir, d));
    const dst = (folder: string) => ({ name: 'dst', kind: 'qcow2', path: join(dir, folder) });
    const base = [pool('local'), san(arrayA)];
    expect(await broker.reconfigure(config([...base, dst('dst-b')]))).toMatchObject({ added: ['dst'] });
    await broker.volumes.create('dst/tgt', { sizeBytes: MiB }); // in folder B: not the clone's
    expect(await broker.reconfigure(config([...base, dst('dst-a')]))).toMatchObject({ replaced: ['dst'] });
    await broker.volumes.create('local/src', { sizeBytes: 4 * MiB });
    const dev = await broker.volumes.open('local/src', 'rw');
    await dev.write(0, new Uint8Array(4 * MiB).fill(7));
    await dev.close();
    const started = await broker.startClone('local/src', 'dst/tgt', { mode: 'full', prefer: 'host', speed: MiB });
    const r = await broker.reconfigure(config([...base, dst('dst-b')]));
    expect(r).toMatchObject({ replaced: [], kept: [{ name: 'dst', reason: expect.stringMatching(/^its entry changed, but it is in use here: clone /) }] });
    await started.job!.cancel();
    await started.job!.wait();
    // The cancelled clone cleaned up after itself in folder A; B's volume of that name is untouched.
    expect(await broker.reconfigure(config([...base, dst('dst-b')]))).toMatchObject({ replaced: ['dst'], kept: [] });
    expect(await broker.volumes.get('dst/tgt')).toMatchObject({ name: 'tgt', sizeBytes: MiB });
    expect(await broker.reconfigure(config([...base, dst('dst-a')]))).toMatchObject({ replaced: ['dst'] });
    await expect(broker.volumes.get('dst/tgt')).rejects.toMatchObject({ code: 'NotFound' });
    expect(await broker.reconfigure(config(base))).toMatchObject({ removed: ['dst'] });
  });

  it('what cannot be used changes nothing: a rotated token the array refuses, a pool folder that is not there, a config that does not validate; settings for a restart are named', async () => {
    const r = await broker.reconfigure(config([pool('local'), san(arrayA, 'not-the-token'), pool('nowhere')], { leaseSeconds: 30, state: join(dir, 'elsewhere'), server: 'unix:/tmp/elsewhere.sock' }));
    expect(r.added).toEqual([]);
    expect(r.replaced).toEqual([]);
    expect(r.failed.map((f) => f.name)).toEqual(['san', 'nowhere']);
    expect(r.failed[0]!.reason).toMatch(/^backend "san" \(flasharray\) cannot be used: /);
    expect(r.failed[0]!.reason).not.toContain('not-the-token');
    expect(r.failed[1]!.reason).toMatch(/^backend "nowhere" \(qcow2\) cannot start: /);
    expect(r.restartNeeded).toEqual(['state', 'server', 'leaseSeconds']);
    // The array's old entry stays in use; the next reconfiguration tries the new one again.
    await broker.volumes.create('san/still-a', { sizeBytes: MiB });
    expect(await broker.volumes.get('san/on-a')).toMatchObject({ name: 'on-a' });
    expect(await broker.reconfigure(config([pool('local'), san(arrayA, 'not-the-token')]))).toMatchObject({ failed: [{ name: 'san' }] });

    await expect(broker.reconfigure(config([pool('local'), { name: 'x', kind: 'tape' }]))).rejects.toMatchObject({ code: 'InvalidArgument', message: expect.stringMatching(/unknown kind "tape"/) });
    await expect(broker.reconfigure(join(dir, 'missing.yaml'))).rejects.toMatchObject({ message: expect.stringMatching(/does not exist/) });
    expect(await names()).toEqual(['local', 'san']);
    await expect(broker.as({ id: 'tina', role: 'tenant' }).reconfigure(config([pool('local')]))).rejects.toMatchObject({ code: 'PermissionDenied' });
    expect(await names()).toEqual(['local', 'san']);
  });
});

describe('Broker.reconfigure and close', () => {
  it('a reconfiguration caught by close() is refused, and close waits for it', async () => {
    const state = join(dir, 'closing-state');
    mkdirSync(join(dir, 'late'));
    const b = await createBroker({ state, backends: [pool('local')] }, { plugins: builtinPlugins, logger: silentLogger });
    const changing = b.reconfigure({ state, backends: [pool('local'), pool('late')] });
    await b.close();
    await expect(changing).rejects.toMatchObject({ code: 'FailedPrecondition', message: 'the broker is closed' });
  });
});

describe('Broker.reconfigure: jobs of another broker', () => {
  it("an orphaned job on a backend this service lacks is left alone, and taken over once a reconfiguration adds it", async () => {
    const state = join(dir, 'orphan-state');
    mkdirSync(state);
    const store = new SqliteStateStore(join(state, 'jobs.sqlite'));
    const now = new Date().toISOString();
    // A ticker stream whose runner (on another host) stopped after step 2 of 4.
    await store.insertJob({
      id: 'stream-orphan', type: 'stream', status: 'running', executor: 'backend:tick', backend: 'tick', ref: 'tick/v', owner: 'admin',
      progress: { current: 2, total: 4 }, speed: 0, cancelled: false, createdAt: now, updatedAt: now, params: { volume: 'v' }, checkpoint: { step: 2 },
      runnerPid: 1, runnerToken: 'gone', runnerHost: 'elsewhere', leaseExpires: 0, seenAt: 0, fence: 1, locks: [{ key: 'tick/v', mode: 'exclusive' }], ownerRole: 'admin',
    });
    const service = await createBroker({ state, backends: [pool('local')] }, { plugins: [...builtinPlugins, tickerModule], logger: silentLogger, adoptOrphans: { everyMs: 20 } });
    try {
      await new Promise((r) => setTimeout(r, 200));
      expect(await store.getJob('stream-orphan')).toMatchObject({ status: 'running', runnerToken: 'gone', fence: 1 });
      expect(await service.reconfigure({ state, backends: [pool('local'), { name: 'tick', kind: 'ticker', steps: 4, stepMs: 5 }] })).toMatchObject({ added: ['tick'] });
      await until('the job taken over and finished', async () => (await store.getJob('stream-orphan'))?.status === 'concluded');
      expect(await store.getJob('stream-orphan')).toMatchObject({ fence: 2, progress: { current: 4 * MiB } });
      expect((await store.getJob('stream-orphan'))?.error).toBeUndefined();
    } finally {
      await service.close();
      await store.close();
    }
  });
});

describe.skipIf(!HAVE.libnbd)('Broker.reconfigure: nbd.tls', () => {
  it("nbd.tls's allow list and folder change for the next handshake; another kind needs a restart", async () => {
    const creds = join(dir, 'nbd-tls');
    mkdirSync(creds);
    for (const f of ['ca-cert.pem', 'server-cert.pem', 'server-key.pem']) copyFileSync(join(CREDS, 'server', f), join(creds, f));
    const tlsDir = join(dir, 'tls-state');
    const withTls = (allow: string[], folder = creds): RawConfig => ({ state: tlsDir, nbd: { tls: { x509: folder, allow } }, backends: [pool('local')] });
    const b = await createBroker(withTls(['alice']), { plugins: builtinPlugins, logger: silentLogger });
    try {
      await b.volumes.create('local/tls-disk', { sizeBytes: MiB });
      const exp = await b.exports.start('local/tls-disk', { readOnly: true, listen: { port: 0 } });
      const size = (who: string) => tool('nbdinfo', ['--size', `${exp.uri}?tls-certificates=${join(CREDS, who)}`]);
      expect((await size('client')).status).toBe(0);
      expect((await size('revoked')).status).not.toBe(0); // eve: not allowed

      expect(await b.reconfigure(withTls(['alice', 'eve']))).toMatchObject({ restartNeeded: [], failed: [] });
      expect((await size('revoked')).status).toBe(0);
      expect(await b.reconfigure(withTls(['eve']))).toMatchObject({ restartNeeded: [], failed: [] });
      expect((await size('client')).status).not.toBe(0);

      // A folder that cannot be used keeps what is in use; another kind is for a restart.
      const bad = await b.reconfigure(withTls(['alice'], join(dir, 'no-such-folder')));
      expect(bad.failed).toEqual([{ name: 'nbd.tls', reason: expect.stringMatching(/^nbd\.tls\.x509: cannot read .*no-such-folder/) }]);
      expect((await size('client')).status).not.toBe(0);
      expect((await size('revoked')).status).toBe(0);
      expect(await b.reconfigure({ state: tlsDir, nbd: { tls: { psk: join(dir, 'keys.psk') } }, backends: [pool('local')] })).toMatchObject({ restartNeeded: ['nbd.tls'], failed: [] });
      expect(await b.reconfigure({ state: tlsDir, backends: [pool('local')] })).toMatchObject({ restartNeeded: ['nbd.tls'] });
      expect((await size('revoked')).status).toBe(0);
    } finally {
      await b.close();
    }
  });
});
