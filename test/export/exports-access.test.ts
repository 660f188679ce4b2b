/**
 * `broker.exports`: the locks an export holds and what they refuse (naming the export), who may
 * export, see and stop what, an administrator preempting a tenant's export, snapshots, shared
 * servers, unix sockets, bad options, and the broker closing its exports.
 */
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CMD } from '../../core/export/nbd-protocol.js';
import { createBroker, silentLogger, tenant, type Broker } from '../../core/index.js';
import { qcow2Module } from '../../plugins/qcow2/module.js';
import { memoryModule } from '../support/memory-backend.js';
import { openExport, readData, reply, request } from '../support/nbd-client.js';
import { HAVE, ok, qemuIo, tool } from '../support/nbd-tools.js';

const MiB = 1024 * 1024;

async function refusal(p: Promise<unknown>): Promise<{ code: string; message: string }> {
  return p.then(() => { throw new Error('expected a refusal'); }, (e: { code: string; message: string }) => e);
}

function portOf(uri: string): number {
  return Number(/:(\d+)\//.exec(uri)![1]);
}

describe('broker.exports: locks, principals and life cycle', () => {
  let state: string;
  let broker: Broker;
  let t1: Broker;
  let t2: Broker;

  beforeAll(async () => {
    state = mkdtempSync(join(tmpdir(), 'offload-exports-access-'));
    mkdirSync(join(state, 'pool'));
    broker = await createBroker({
      state,
      backends: [
        { name: 'local', kind: 'qcow2', path: join(state, 'pool') },
        { name: 'mem', kind: 'memory' },
        { name: 'memro', kind: 'memory', capabilities: ['volume.create', 'volume.delete', 'volume.list', 'data.read', 'data.extents'] },
        { name: 'nodata', kind: 'memory', capabilities: ['volume.create', 'volume.delete', 'volume.list'] },
      ],
    }, { plugins: [qcow2Module, memoryModule], logger: silentLogger });
    t1 = broker.as(tenant('t1'));
    t2 = broker.as(tenant('t2'));
  });

  afterAll(async () => {
    await broker?.close();
    if (state) rmSync(state, { recursive: true, force: true });
  });

  it('a tenant exports its own volume; another tenant cannot export, see or stop it; the administrator sees it', async () => {
    await t1.volumes.create('mem/t1a', { sizeBytes: 4 * MiB });
    const e = await t1.exports.start('mem/t1a', { listen: { port: 0 } });
    try {
      expect((await refusal(t2.exports.start('mem/t1a', { name: 'steal', listen: { port: 0 } }))).code).toBe('NotFound');
      expect((await t2.exports.list())).toEqual([]);
      expect((await refusal(t2.exports.stop('mem/t1a'))).code).toBe('NotFound');
      expect((await t1.exports.list()).map((x) => x.name)).toEqual(['mem/t1a']);
      expect((await broker.exports.list())).toEqual([expect.objectContaining({ name: 'mem/t1a', ref: 'mem/t1a', owner: 't1', readOnly: false, pid: process.pid, connections: 0 })]);
    } finally {
      await e.stop();
    }
  });

  it('an administrator\'s delete preempts a tenant\'s export: clients are disconnected, the delete goes through', async () => {
    await t1.volumes.create('mem/t1b', { sizeBytes: 4 * MiB });
    const e = await t1.exports.start('mem/t1b', { listen: { port: 0 } });
    const c = await openExport(portOf(e.uri), 'mem/t1b');
    request(c.wire, CMD.WRITE, 0, 4, { payload: Buffer.from('ackd') });
    expect((await reply(c.wire)).error).toBe(0);
    await broker.volumes.delete('mem/t1b');
    await e.stopped;
    expect(await c.wire.waitClosed()).toBe(true);
    expect((await broker.exports.list())).toEqual([]);
    expect((await refusal(broker.volumes.get('mem/t1b'))).code).toBe('NotFound');
  });

  it('a tenant cannot preempt an administrator\'s export of its volume: Busy naming the export', async () => {
    await t1.volumes.create('mem/t1c', { sizeBytes: 4 * MiB });
    const e = await broker.exports.start('mem/t1c', { name: 'admin-view', listen: { port: 0 } });
    try {
      const busy = await refusal(t1.volumes.delete('mem/t1c'));
      expect(busy.code).toBe('Busy');
      expect(busy.message).toMatch(/export admin-view/);
      expect((await refusal(t1.exports.stop('admin-view'))).code).toBe('NotFound');
    } finally {
      await e.stop();
    }
    await t1.volumes.delete('mem/t1c');
  });

  it('read-only exports share the volume with readers; a writable one excludes them, each refusal naming the holder', async () => {
    await broker.volumes.create('mem/shared', { sizeBytes: 4 * MiB });
    const a = await broker.exports.start('mem/shared', { name: 'ro-a', readOnly: true, listen: { port: 0 } });
    const b = await broker.exports.start('mem/shared', { name: 'ro-b', readOnly: true, listen: { port: 0 } });
    const rw = await refusal(broker.as(tenant('t9')).exports.start('mem/shared', { name: 'rw', listen: { port: 0 } }));
    expect(rw.code).toBe('NotFound'); // a tenant: not its volume
    const busy = await refusal(broker.as({ id: 'ops', role: 'admin' }).exports.start('mem/shared', { name: 'rw', listen: { port: 0 } }));
    expect(busy.code).toBe('Busy');
    expect(busy.message).toMatch(/export ro-a|export ro-b/);
    // A copy may read it meanwhile (a shared lock), a resize may not.
    expect((await refusal(broker.volumes.resize('mem/shared', 8 * MiB))).code).toBe('Busy');
    await a.stop();
    await b.stop();
    const w = await broker.exports.start('mem/shared', { name: 'rw', listen: { port: 0 } });
    const second = await refusal(broker.exports.start('mem/shared', { name: 'rw2', readOnly: true, listen: { port: 0 } }));
    expect(second.message).toMatch(/export rw /);
    await w.stop();
  });

  it('a snapshot is exported read-only and cannot be deleted or reverted to while served', async () => {
    await broker.volumes.create('local/base', { sizeBytes: 8 * MiB });
    const d = await broker.volumes.open('local/base', 'rw');
    await d.write(0, Buffer.alloc(65536, 0x21));
    await d.close();
    await broker.snapshots.create('local/base@s1');
    const d2 = await broker.volumes.open('local/base', 'rw');
    await d2.write(0, Buffer.alloc(65536, 0x22));
    await d2.close();
    expect((await refusal(broker.exports.start('local/base@s1', { readOnly: false, listen: { port: 0 } }))).code).toBe('InvalidArgument');
    const e = await broker.exports.start('local/base@s1', { listen: { port: 0 } });
    try {
      expect(e.readOnly).toBe(true);
      expect(e.uri).toMatch(/\/local\/base@s1$/);
      const c = await openExport(portOf(e.uri), 'local/base@s1');
      request(c.wire, CMD.READ, 0, 65536);
      expect(readData(await reply(c.wire), 0, 65536).equals(Buffer.alloc(65536, 0x21))).toBe(true);
      request(c.wire, CMD.WRITE, 0, 512, { payload: Buffer.alloc(512) });
      expect((await reply(c.wire)).error).toBe(1); // EPERM
      c.wire.close();
      for (const op of [broker.snapshots.delete('local/base@s1'), broker.snapshots.revert('local/base@s1')]) {
        const r = await refusal(op);
        expect(r.code).toBe('Busy');
        expect(r.message).toMatch(/export local\/base@s1/);
      }
    } finally {
      await e.stop();
    }
    await broker.snapshots.delete('local/base@s1');
  });

  it('a snapshot of a volume in use is exported while the volume is written (either started first); the volume keeps its other keepers', async () => {
    await broker.volumes.create('local/inuse', { sizeBytes: 8 * MiB });
    const d = await broker.volumes.open('local/inuse', 'rw');
    await d.write(0, Buffer.alloc(65536, 0x31));
    await d.close();
    await broker.snapshots.create('local/inuse@s1');
    const readSnap = async (uri: string) => {
      const c = await openExport(portOf(uri), 'local/inuse@s1');
      request(c.wire, CMD.READ, 0, 65536);
      const got = readData(await reply(c.wire), 0, 65536);
      c.wire.close();
      return got;
    };
    const writeVolume = async (uri: string, byte: number) => {
      const c = await openExport(portOf(uri), 'local/inuse');
      request(c.wire, CMD.WRITE, 0, 65536, { payload: Buffer.alloc(65536, byte) });
      expect((await reply(c.wire)).error).toBe(0);
      c.wire.close();
    };
    // The disk exported first, then its snapshot (a backup application reading a point of it).
    let rw = await broker.exports.start('local/inuse', { listen: { port: 0 } });
    const ro = await broker.exports.start('local/inuse@s1', { listen: { port: 0 } });
    try {
      await writeVolume(rw.uri, 0x32);
      expect((await readSnap(ro.uri)).equals(Buffer.alloc(65536, 0x31))).toBe(true);
      // A snapshot taken and another deleted meanwhile; the exported one stays.
      await broker.snapshots.create('local/inuse@s2');
      await broker.snapshots.delete('local/inuse@s2');
      for (const op of [broker.volumes.delete('local/inuse'), broker.volumes.resize('local/inuse', 16 * MiB), broker.snapshots.revert('local/inuse@s1'), broker.snapshots.delete('local/inuse@s1')]) {
        expect((await refusal(op)).code).toBe('Busy');
      }
      expect((await refusal(broker.exports.start('local/inuse', { name: 'second', listen: { port: 0 } }))).message).toMatch(/export local\/inuse /);
      // The disk's export stopped and started again (a VM restarted) while its snapshot is read.
      await rw.stop();
      rw = await broker.exports.start('local/inuse', { listen: { port: 0 } });
      await writeVolume(rw.uri, 0x33);
      expect((await readSnap(ro.uri)).equals(Buffer.alloc(65536, 0x31))).toBe(true);
    } finally {
      await ro.stop();
      await rw.stop();
    }
    const after = await broker.volumes.open('local/inuse', 'r');
    expect(Buffer.from(await after.read(0, 65536)).equals(Buffer.alloc(65536, 0x33))).toBe(true);
    await after.close();
    await broker.snapshots.delete('local/inuse@s1');
    await broker.volumes.delete('local/inuse');
  });

  it.skipIf(!HAVE.qemu)('qemu-img reads a snapshot export by its URI (the @ of the name in the path)', async () => {
    await broker.volumes.create('local/snapq', { sizeBytes: 4 * MiB });
    await broker.snapshots.create('local/snapq@before');
    const e = await broker.exports.start('local/snapq@before', { listen: { port: 0 } });
    try {
      const info = JSON.parse(await ok('qemu-img', ['info', '--output=json', e.uri])) as { 'virtual-size': number };
      expect(info['virtual-size']).toBe(4 * MiB);
    } finally {
      await e.stop();
    }
  });

  it('streaming an exported volume is Busy naming the export', async () => {
    await broker.volumes.create('local/parent', { sizeBytes: 4 * MiB });
    await broker.snapshots.create('local/parent@p');
    await broker.clone('local/parent@p', 'local/child', { mode: 'linked' });
    const e = await broker.exports.start('local/child', { listen: { port: 0 } });
    try {
      const r = await refusal(broker.stream('local/child'));
      expect(r.code).toBe('Busy');
      expect(r.message).toMatch(/export local\/child/);
    } finally {
      await e.stop();
    }
  });

  it('refuses bad options, unknown volumes, backends without a data path, and names in use', async () => {
    await broker.volumes.create('mem/opts', { sizeBytes: MiB });
    await broker.volumes.create('memro/ro', { sizeBytes: MiB });
    await broker.volumes.create('nodata/x', { sizeBytes: MiB });
    const cases: [Promise<unknown>, string][] = [
      [broker.exports.start('mem/opts', { name: '', listen: { port: 0 } }), 'InvalidArgument'],
      [broker.exports.start('mem/opts', { name: 'a\nb', listen: { port: 0 } }), 'InvalidArgument'],
      [broker.exports.start('mem/opts', { name: 'x'.repeat(5000), listen: { port: 0 } }), 'InvalidArgument'],
      [broker.exports.start('mem/opts', { listen: { port: 70000 } }), 'InvalidArgument'],
      [broker.exports.start('mem/opts', { listen: { port: 1.5 } }), 'InvalidArgument'],
      [broker.exports.start('mem/opts', { listen: { socket: '' } }), 'InvalidArgument'],
      [broker.exports.start('mem/opts', { readOnly: 'yes' as unknown as boolean, listen: { port: 0 } }), 'InvalidArgument'],
      [broker.exports.start('mem/missing', { listen: { port: 0 } }), 'NotFound'],
      [broker.exports.start('nope/x', { listen: { port: 0 } }), 'NotFound'],
      [broker.exports.start('not a ref', { listen: { port: 0 } }), 'InvalidArgument'],
      [broker.exports.start('memro/ro', { listen: { port: 0 } }), 'Unsupported'],
      [broker.exports.start('nodata/x', { readOnly: true, listen: { port: 0 } }), 'Unsupported'],
      [broker.exports.stop('never-started'), 'NotFound'],
    ];
    for (const [p, code] of cases) expect((await refusal(p)).code).toBe(code);
    const ro = await broker.exports.start('memro/ro', { readOnly: true, listen: { port: 0 } });
    const one = await broker.exports.start('mem/opts', { name: 'taken', readOnly: true, listen: { port: 0 } });
    expect((await refusal(broker.exports.start('mem/opts', { name: 'taken', readOnly: true, listen: { port: 0 } }))).code).toBe('AlreadyExists');
    // A port someone else listens on: Busy, and nothing is left held.
    const busy = await refusal(broker.exports.start('mem/opts', { name: 'clash', readOnly: true, listen: { port: portOf(one.uri), host: '0.0.0.0' } }));
    expect(busy.code).toBe('Busy');
    expect((await broker.locks.list()).filter((l) => l.holder.id.includes('clash'))).toEqual([]);
    await one.stop();
    await ro.stop();
    await one.stop(); // stopping twice is fine
  });

  it('exports on one address share one server; stopping one leaves the others; the last stop frees the port', async () => {
    await broker.volumes.create('mem/s1', { sizeBytes: MiB });
    await broker.volumes.create('mem/s2', { sizeBytes: MiB });
    const a = await broker.exports.start('mem/s1', { listen: { port: 0 } });
    const port = portOf(a.uri);
    const b = await broker.exports.start('mem/s2', { listen: { port } });
    expect(portOf(b.uri)).toBe(port);
    const c = await openExport(port, 'mem/s2');
    await a.stop();
    request(c.wire, CMD.FLUSH, 0, 0);
    expect((await reply(c.wire)).error).toBe(0);
    c.wire.close();
    await b.stop();
    const again = await broker.exports.start('mem/s1', { listen: { port } }); // the port is free again
    await again.stop();
  });

  it.skipIf(!HAVE.qemu)('a unix socket export, as QEMU names it', async () => {
    await broker.volumes.create('local/sock', { sizeBytes: 4 * MiB });
    const path = join(state, 'nbd.sock');
    const e = await broker.exports.start('local/sock', { listen: { socket: path } });
    try {
      expect(e.uri).toBe(`nbd+unix:///local/sock?socket=${path}`);
      await qemuIo(e.uri, ['write -P 0x44 0 64k', 'read -P 0x44 0 64k']);
    } finally {
      await e.stop();
    }
    expect((await tool('qemu-img', ['info', e.uri])).status).not.toBe(0);
  });

  it('closing the broker stops its exports: clients are disconnected, the volume is flushed and free', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'offload-exports-close-'));
    mkdirSync(join(dir, 'pool'));
    const cfg = { state: dir, backends: [{ name: 'local', kind: 'qcow2', path: join(dir, 'pool') }] };
    const b1 = await createBroker(cfg, { plugins: [qcow2Module], logger: silentLogger });
    await b1.volumes.create('local/v', { sizeBytes: 4 * MiB });
    const e = await b1.exports.start('local/v', { listen: { port: 0 } });
    const c = await openExport(portOf(e.uri), 'local/v');
    request(c.wire, CMD.WRITE, 0, 65536, { payload: Buffer.alloc(65536, 0x77) });
    expect((await reply(c.wire)).error).toBe(0);
    await b1.close();
    expect(await c.wire.waitClosed()).toBe(true);
    const b2 = await createBroker(cfg, { plugins: [qcow2Module], logger: silentLogger });
    try {
      const d = await b2.volumes.open('local/v', 'r');
      expect(Buffer.from(await d.read(0, 65536)).equals(Buffer.alloc(65536, 0x77))).toBe(true);
      await d.close();
      expect((await b2.exports.list())).toEqual([]);
      await b2.volumes.delete('local/v');
    } finally {
      await b2.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
