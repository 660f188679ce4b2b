/**
 * WRITE with FUA: the server hands it to the device's writeFua where the device has one (answered
 * once that resolves, no flush of its own), else write then flush. A pool volume's device has
 * one: each FUA write through the export is one native call of the qcow2 engine — the volume's
 * file writes, then the fdatasync — and the volume's file stays clean.
 */
import { mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { createBroker, InternalError, silentLogger } from '../../core/index.js';
import { NbdServer } from '../../core/export/nbd-server.js';
import { CMD, CMD_FLAG, ERR } from '../../core/export/nbd-protocol.js';
import { qcow2Module } from '../../plugins/qcow2/module.js';
import { setNativeWriteBatch } from '../../plugins/qcow2/engine/file.js';
import { nativeAddon, type NativeAddon } from '../../plugins/qcow2/engine/native-addon.js';
import { memoryDevice } from '../support/memory-device.js';
import { openExport, readData, reply, request } from '../support/nbd-client.js';
import { HAVE, ok } from '../support/nbd-tools.js';

const MiB = 1024 * 1024;

describe('NBD WRITE with FUA', () => {
  describe('a device with writeFua', () => {
    let server: NbdServer;
    let port: number;
    const dev = memoryDevice(4 * MiB, { blockSize: 4096 });
    const fua: number[] = [];
    let failNext: Error | undefined;
    dev.writeFua = async (offset, data) => {
      if (failNext) {
        const e = failNext;
        failNext = undefined;
        throw e;
      }
      fua.push(offset);
      await dev.write(offset, data);
    };

    beforeAll(async () => {
      server = await NbdServer.listen({ port: 0 });
      port = (server.address as { port: number }).port;
      server.addExport({ name: 'vol', device: dev, readOnly: false });
    });

    afterAll(async () => {
      await server.close();
    });

    it('gets FUA writes (no flush besides); plain writes go to write; zeroes with FUA are flushed', async () => {
      const s = await openExport(port, 'vol');
      const flushes = dev.flushes;
      request(s.wire, CMD.WRITE, 8192, 4096, { payload: Buffer.alloc(4096, 0x11), flags: CMD_FLAG.FUA });
      expect((await reply(s.wire)).error).toBe(0);
      request(s.wire, CMD.WRITE, 16384, 4096, { payload: Buffer.alloc(4096, 0x22) });
      expect((await reply(s.wire)).error).toBe(0);
      expect(fua).toEqual([8192]);
      expect(dev.flushes).toBe(flushes);
      request(s.wire, CMD.WRITE_ZEROES, 8192, 4096, { flags: CMD_FLAG.FUA });
      expect((await reply(s.wire)).error).toBe(0);
      expect(dev.flushes).toBe(flushes + 1);
      request(s.wire, CMD.READ, 16384, 4096);
      expect(readData(await reply(s.wire, 4096), 16384, 4096).equals(Buffer.alloc(4096, 0x22))).toBe(true);
      s.wire.close();
    });

    it('a failed writeFua is EIO for that request only', async () => {
      const s = await openExport(port, 'vol');
      failNext = new InternalError('the disk is on fire');
      request(s.wire, CMD.WRITE, 0, 512, { payload: Buffer.alloc(512, 3), flags: CMD_FLAG.FUA });
      expect((await reply(s.wire)).error).toBe(ERR.EIO);
      request(s.wire, CMD.WRITE, 0, 512, { payload: Buffer.alloc(512, 4), flags: CMD_FLAG.FUA });
      expect((await reply(s.wire)).error).toBe(0);
      s.wire.close();
    });
  });

  const native = nativeAddon()?.writeBatch;
  describe.skipIf(!native)('a pool volume', () => {
    let dir: string;
    let config: string;
    const calls: { ops: number; sync: boolean }[] = [];
    const recording: NonNullable<NativeAddon['writeBatch']> = (fd, positions, buffers, sync) => {
      calls.push({ ops: buffers.length, sync });
      return native!(fd, positions, buffers, sync);
    };

    beforeAll(() => {
      dir = mkdtempSync(join(tmpdir(), 'offload-nbd-fua-'));
      mkdirSync(join(dir, 'pool'));
      config = join(dir, 'offload.yaml');
      writeFileSync(config, `state: ./state\nbackends:\n  - name: local\n    kind: qcow2\n    path: ./pool\n`);
    });

    afterEach(() => setNativeWriteBatch(undefined));

    afterAll(() => {
      rmSync(dir, { recursive: true, force: true });
    });

    it('each FUA write is one native call with the fdatasync; what they wrote is there and the file is clean', async () => {
      const b = await createBroker(config, { plugins: [qcow2Module], logger: silentLogger });
      try {
        await b.volumes.create('local/v', { sizeBytes: 64 * MiB });
        const e = await b.exports.start('local/v', { listen: { port: 0 } });
        const s = await openExport(Number(/:(\d+)\//.exec(e.uri)![1]), 'local/v');
        setNativeWriteBatch(recording);
        // The first allocates the L2 table too; the second a cluster; the third is in place.
        for (const [off, fill] of [[MiB + 4096, 0x31], [5 * MiB, 0x32], [MiB + 8192, 0x33]] as const) {
          request(s.wire, CMD.WRITE, off, 4096, { payload: Buffer.alloc(4096, fill), flags: CMD_FLAG.FUA });
          expect((await reply(s.wire)).error).toBe(0);
        }
        setNativeWriteBatch(undefined);
        expect(calls.map((c) => c.sync)).toEqual([true, true, true]);
        expect(calls[0]!.ops).toBeGreaterThan(calls[1]!.ops); // its L2 table and L1 entry with it
        expect(calls[2]!.ops).toBe(1);
        for (const [off, fill] of [[MiB + 4096, 0x31], [5 * MiB, 0x32], [MiB + 8192, 0x33], [MiB, 0]] as const) {
          request(s.wire, CMD.READ, off, 4096);
          expect(readData(await reply(s.wire, 4096), off, 4096).equals(Buffer.alloc(4096, fill))).toBe(true);
        }
        s.wire.close();
        await e.stop();
      } finally {
        await b.close();
      }
      if (HAVE.qemu) for (const f of readdirSync(join(dir, 'pool')).filter((n) => n.endsWith('.qcow2'))) await ok('qemu-img', ['check', join(dir, 'pool', f)]);
    });
  });
});
