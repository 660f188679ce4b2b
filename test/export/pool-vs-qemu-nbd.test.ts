/**
 * Our export of a pool volume against qemu-nbd serving the same qcow2 chain: `qemu-img map` and
 * `nbdinfo --map` (base:allocation, and qemu:allocation-depth against `qemu-nbd -A`) must report
 * the same, and the bytes must be the same. The chain has data in both layers, zero clusters over
 * data below, a discarded range and holes.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createBroker, silentLogger, type Broker } from '../../core/index.js';
import type { Qcow2Pool } from '../../plugins/qcow2/pool/pool-backend.js';
import { qcow2Module } from '../../plugins/qcow2/module.js';
import { HAVE, ok, qemuMap, tool } from '../support/nbd-tools.js';

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;

async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as { port: number }).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

describe.skipIf(!HAVE.qemu || !HAVE.libnbd)('our export of a pool volume reports what qemu-nbd reports for the same files', () => {
  let dir: string;
  let broker: Broker;
  let ours: string;
  let theirs: string;
  let theirsDepth: string;
  let stopOurs: () => Promise<void>;
  const qemuNbd: ChildProcess[] = [];

  async function startQemuNbd(file: string, extra: string[]): Promise<string> {
    const port = await freePort();
    const p = spawn('qemu-nbd', ['-r', '-f', 'qcow2', '-t', '-b', '127.0.0.1', '-p', String(port), '-x', 'vol', ...extra, file], { stdio: 'ignore' });
    qemuNbd.push(p);
    const uri = `nbd://127.0.0.1:${port}/vol`;
    for (let i = 0; i < 100; i++) {
      if ((await tool('nbdinfo', ['--size', uri])).status === 0) return uri;
      await new Promise((r) => setTimeout(r, 50));
    }
    throw new Error('qemu-nbd did not start');
  }

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'offload-pool-vs-qemu-nbd-'));
    mkdirSync(join(dir, 'pool'));
    broker = await createBroker({ state: dir, backends: [{ name: 'local', kind: 'qcow2', path: join(dir, 'pool') }] }, { plugins: [qcow2Module], logger: silentLogger });
    await broker.volumes.create('local/vm', { sizeBytes: SIZE });
    const base = await broker.volumes.open('local/vm', 'rw');
    await base.write(0, Buffer.alloc(MiB, 0x11));
    await base.write(4 * MiB, Buffer.alloc(2 * MiB, 0x12));
    await base.write(10 * MiB, Buffer.alloc(MiB, 0x13));
    await base.close();
    await broker.snapshots.create('local/vm@s1');
    const top = await broker.volumes.open('local/vm', 'rw');
    await top.write(512 * 1024, Buffer.alloc(MiB, 0x21)); // over the end of the base's first MiB
    await top.writeZeroes!(4 * MiB + 512 * 1024, 512 * 1024); // zero clusters over data below
    await top.write(20 * MiB + 4096, Buffer.alloc(8192, 0x22)); // partial cluster
    await top.discard!(10 * MiB, MiB); // v3: reads as zeros afterwards
    await top.write(SIZE - 65536, Buffer.alloc(65536, 0x23));
    await top.close();
    const e = await broker.exports.start('local/vm', { readOnly: true, listen: { port: 0 } });
    ours = e.uri;
    stopOurs = e.stop;
    const files = (broker.backend('local') as Qcow2Pool).chainFiles('vm');
    theirs = await startQemuNbd(files[0]!, []);
    theirsDepth = await startQemuNbd(files[0]!, ['-A']);
  });

  afterAll(async () => {
    for (const p of qemuNbd) p.kill('SIGTERM');
    await stopOurs?.();
    await broker?.close();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('qemu-img map --output=json is the same', async () => {
    const m = await qemuMap(ours);
    expect(m.length).toBeGreaterThan(5);
    expect(m).toEqual(await qemuMap(theirs));
  });

  it('nbdinfo --map (base:allocation) is the same once equal neighbours are merged', async () => {
    const merged = async (uri: string, ctx: string) => {
      const list = JSON.parse(await ok('nbdinfo', [`--map=${ctx}`, '--json', uri])) as { offset: number; length: number; type: number }[];
      const out: { offset: number; length: number; type: number }[] = [];
      for (const m of list) {
        const last = out[out.length - 1];
        if (last && last.type === m.type && last.offset + last.length === m.offset) last.length += m.length;
        else out.push({ offset: m.offset, length: m.length, type: m.type });
      }
      return out;
    };
    expect(await merged(ours, 'base:allocation')).toEqual(await merged(theirs, 'base:allocation'));
    expect(await merged(ours, 'qemu:allocation-depth')).toEqual(await merged(theirsDepth, 'qemu:allocation-depth'));
  });

  it('every byte is the same (qemu-img compare between the two servers)', async () => {
    const r = await tool('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', ours, theirs]);
    expect(r.stdout + r.stderr).toMatch(/identical/);
    expect(r.status).toBe(0);
  });
});
