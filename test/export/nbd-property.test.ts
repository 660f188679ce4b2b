/**
 * Property tests of the NBD server: random valid request sequences checked against a model of the
 * device (a flat byte array), and random byte streams thrown at it from every protocol phase,
 * after which it must still serve and must not have changed a byte it did not acknowledge.
 */
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NbdServer } from '../../core/export/nbd-server.js';
import { CMD, CMD_FLAG, ERR, REPLY } from '../../core/export/nbd-protocol.js';
import { memoryDevice, type MemoryDevice } from '../support/memory-device.js';
import { greet, openExport, readData, reply, request, Wire } from '../support/nbd-client.js';

const SIZE = 1024 * 1024;

type Cmd =
  | { t: 'write'; offset: number; length: number; fill: number; fua: boolean }
  | { t: 'zero'; offset: number; length: number; noHole: boolean }
  | { t: 'trim'; offset: number; length: number }
  | { t: 'read'; offset: number; length: number; df: boolean }
  | { t: 'status'; offset: number; length: number; one: boolean }
  | { t: 'flush' };

/** A range that may run past the end (the server must refuse those). */
const range = fc.record({ offset: fc.integer({ min: 0, max: SIZE + 8192 }), length: fc.integer({ min: 0, max: 200_000 }) });

const command: fc.Arbitrary<Cmd> = fc.oneof(
  fc.record({ t: fc.constant('write' as const), fill: fc.integer({ min: 1, max: 255 }), fua: fc.boolean() }).chain((w) => range.map((r) => ({ ...w, ...r }))),
  fc.record({ t: fc.constant('zero' as const), noHole: fc.boolean() }).chain((z) => range.map((r) => ({ ...z, ...r }))),
  range.map((r) => ({ t: 'trim' as const, ...r })),
  fc.boolean().chain((df) => range.map((r) => ({ t: 'read' as const, df, ...r }))),
  fc.boolean().chain((one) => range.map((r) => ({ t: 'status' as const, one, ...r }))),
  fc.constant({ t: 'flush' as const }),
);

describe('the NBD server, property-tested', () => {
  let server: NbdServer;
  let port: number;
  let n = 0;

  beforeAll(async () => {
    server = await NbdServer.listen({ port: 0 }, { handshakeLimitMs: 2000 });
    port = (server.address as { port: number }).port;
  });

  afterAll(async () => {
    await server.close();
  });

  function fresh(): { name: string; dev: MemoryDevice } {
    const name = `p${n++}`;
    const dev = memoryDevice(SIZE, { blockSize: 4096 });
    server.addExport({ name, device: dev, readOnly: false });
    return { name, dev };
  }

  it('random valid request sequences behave like the model device', async () => {
    await fc.assert(fc.asyncProperty(fc.array(command, { minLength: 1, maxLength: 25 }), async (cmds) => {
      const { name, dev } = fresh();
      const model = new Uint8Array(SIZE);
      const known = new Uint8Array(SIZE).fill(1); // 0 where a TRIM left the content unspecified
      const s = await openExport(port, name);
      try {
        for (const c of cmds) {
          if (c.t === 'flush') {
            request(s.wire, CMD.FLUSH, 0, 0);
            expect((await reply(s.wire)).error).toBe(0);
            continue;
          }
          const past = c.offset + c.length > SIZE;
          if (c.t === 'write') {
            request(s.wire, CMD.WRITE, c.offset, c.length, { payload: Buffer.alloc(c.length, c.fill), flags: c.fua ? CMD_FLAG.FUA : 0 });
            expect((await reply(s.wire)).error).toBe(past ? ERR.ENOSPC : 0);
            if (!past) { model.fill(c.fill, c.offset, c.offset + c.length); known.fill(1, c.offset, c.offset + c.length); }
          } else if (c.t === 'zero') {
            request(s.wire, CMD.WRITE_ZEROES, c.offset, c.length, { flags: c.noHole ? CMD_FLAG.NO_HOLE : 0 });
            expect((await reply(s.wire)).error).toBe(past ? ERR.ENOSPC : 0);
            if (!past) { model.fill(0, c.offset, c.offset + c.length); known.fill(1, c.offset, c.offset + c.length); }
          } else if (c.t === 'trim') {
            request(s.wire, CMD.TRIM, c.offset, c.length);
            expect((await reply(s.wire)).error).toBe(past ? ERR.EINVAL : 0);
            if (!past) known.fill(0, c.offset, c.offset + c.length);
          } else if (c.t === 'read') {
            request(s.wire, CMD.READ, c.offset, c.length, { flags: c.df ? CMD_FLAG.DF : 0 });
            const r = await reply(s.wire);
            expect(r.error).toBe(past ? ERR.EINVAL : 0);
            if (past) continue;
            if (c.df) expect(r.chunks!.filter((k) => k.type !== REPLY.NONE).length).toBeLessThanOrEqual(1);
            // Chunks cover the range exactly once.
            const covered = r.chunks!.reduce((sum, k) => sum + (k.type === REPLY.OFFSET_DATA ? k.data.length - 8 : k.type === REPLY.OFFSET_HOLE ? k.data.readUInt32BE(8) : 0), 0);
            expect(covered).toBe(c.length);
            const got = readData(r, c.offset, c.length);
            for (let i = 0; i < c.length; i++) {
              if (known[c.offset + i] && got[i] !== model[c.offset + i]) throw new Error(`byte ${c.offset + i}: read ${got[i]}, model ${model[c.offset + i]}`);
            }
          } else {
            request(s.wire, CMD.BLOCK_STATUS, c.offset, c.length, { flags: c.one ? CMD_FLAG.REQ_ONE : 0 });
            const r = await reply(s.wire);
            expect(r.error).toBe(past || c.length === 0 ? ERR.EINVAL : 0);
            if (r.error) continue;
            const body = r.chunks!.find((k) => k.type === REPLY.BLOCK_STATUS)!.data;
            const extents = (body.length - 4) / 8;
            if (c.one) expect(extents).toBe(1);
            let at = c.offset;
            for (let i = 0; i < extents; i++) {
              const len = body.readUInt32BE(4 + 8 * i);
              const flags = body.readUInt32BE(8 + 8 * i);
              expect(len).toBeGreaterThan(0);
              if (flags & 2) {
                for (let p = at; p < Math.min(at + len, SIZE); p++) {
                  if (known[p] && model[p] !== 0) throw new Error(`byte ${p} is reported zero but holds ${model[p]}`);
                }
              }
              at += len;
            }
            if (!c.one) expect(at).toBe(c.offset + c.length);
            else expect(at).toBeLessThanOrEqual(c.offset + c.length);
          }
        }
        // The device holds exactly what the model says wherever the content is specified.
        const all = await dev.read(0, SIZE);
        for (let i = 0; i < SIZE; i++) if (known[i] && all[i] !== model[i]) throw new Error(`device byte ${i}: ${all[i]}, model ${model[i]}`);
      } finally {
        s.wire.close();
        await server.removeExport(name);
      }
    }), { numRuns: 150 });
  });

  it('random bytes from any phase never crash it, never change acknowledged data, and other clients go on', async () => {
    const { name, dev } = fresh();
    const keeper = await openExport(port, name);
    request(keeper.wire, CMD.WRITE, 0, 65536, { payload: Buffer.alloc(65536, 0x3c), flags: CMD_FLAG.FUA });
    expect((await reply(keeper.wire)).error).toBe(0);
    await fc.assert(fc.asyncProperty(
      fc.constantFrom('greeting', 'options', 'transmission'), fc.uint8Array({ minLength: 1, maxLength: 2048 }),
      async (phase, junk) => {
        let w: Wire;
        if (phase === 'transmission') w = (await openExport(port, name)).wire;
        else {
          w = await Wire.open(port);
          if (phase === 'options') await greet(w);
          else await w.read(18);
        }
        w.write(Buffer.from(junk));
        await new Promise((r) => setTimeout(r, 5));
        w.close();
      },
    ), { numRuns: 150 });
    // The one that behaved is still served, and reads what it wrote (junk may have written
    // elsewhere: a random stream can hold a valid request, but not over this range by chance).
    request(keeper.wire, CMD.READ, 0, 65536);
    const r = await reply(keeper.wire);
    expect(r.error).toBe(0);
    expect(readData(r, 0, 65536).equals(Buffer.alloc(65536, 0x3c))).toBe(true);
    keeper.wire.close();
    expect(Buffer.from(await dev.read(0, 16)).equals(Buffer.alloc(16, 0x3c))).toBe(true);
  });
});
