/**
 * The NBD server against clients that break the protocol, on purpose, byte by byte: each gets the
 * error the spec prescribes or is disconnected, memory is never sized by a number the client sent,
 * other connections keep being served and nothing acknowledged is lost.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { InternalError } from '../../core/index.js';
import { NbdServer } from '../../core/export/nbd-server.js';
import { CMD, CMD_FLAG, ERR, HANDSHAKE, OPT, REP, REPLY } from '../../core/export/nbd-protocol.js';
import { memoryDevice, type MemoryDevice } from '../support/memory-device.js';
import {
  contextData, greet, nameData, openExport, option, optionReplies, optionReply, readData, reply, request, Wire,
} from '../support/nbd-client.js';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;

describe('the NBD server refuses bad input and goes on serving', () => {
  let server: NbdServer;
  let dev: MemoryDevice;
  let port: number;

  beforeAll(async () => {
    server = await NbdServer.listen({ port: 0 }, { handshakeLimitMs: 1500 });
    port = (server.address as { port: number }).port;
    dev = memoryDevice(SIZE, { blockSize: 4096 });
    server.addExport({ name: 'vol', device: dev, readOnly: false });
    server.addExport({ name: 'ro', device: memoryDevice(MiB), readOnly: true });
  });

  afterAll(async () => {
    await server.close();
  });

  /** A connection that was open before the bad client came, still working after it left. */
  async function stillServes(o: Awaited<ReturnType<typeof openExport>>): Promise<void> {
    request(o.wire, CMD.WRITE, 4096, 4, { payload: Buffer.from('live') });
    expect((await reply(o.wire)).error).toBe(0);
    const c = request(o.wire, CMD.READ, 4096, 4);
    const r = await reply(o.wire, 4);
    expect(r.cookie).toBe(c);
    expect(readData(r, 4096, 4).toString()).toBe('live');
  }

  describe('handshake', () => {
    it('a client without FIXED_NEWSTYLE, or with unknown flags, is disconnected', async () => {
      for (const flags of [0, HANDSHAKE.NO_ZEROES, HANDSHAKE.FIXED_NEWSTYLE | 0x80]) {
        const w = await Wire.open(port);
        await greet(w, flags);
        expect(await w.waitClosed()).toBe(true);
      }
    });

    it('a bad option magic is disconnected', async () => {
      const w = await Wire.open(port);
      await greet(w);
      const h = Buffer.alloc(16);
      h.write('NOTMAGIC', 0);
      h.writeUInt32BE(OPT.GO, 8);
      w.write(h);
      expect(await w.waitClosed()).toBe(true);
    });

    it('option data past a sane limit gets ERR_TOO_BIG (read and dropped); absurd lengths are disconnected unread', async () => {
      const w = await Wire.open(port);
      await greet(w);
      option(w, OPT.GO, Buffer.alloc(100 * 1024, 1));
      const r = await optionReply(w);
      expect(r.type).toBe(REP.ERR_TOO_BIG);
      // Negotiation goes on: the same connection can still pick an export.
      option(w, OPT.INFO, Buffer.concat([nameData('vol'), Buffer.from([0, 0])]));
      expect((await optionReplies(w)).at(-1)!.type).toBe(REP.ACK);

      const w2 = await Wire.open(port);
      await greet(w2);
      option(w2, OPT.GO, Buffer.alloc(0), 0xffffffff); // claims 4 GiB and sends nothing
      expect(await w2.waitClosed()).toBe(true);
    });

    it('unknown options (EXTENDED_HEADERS, 999) get ERR_UNSUP and negotiation goes on (STARTTLS: nbd-tls.test.ts)', async () => {
      const w = await Wire.open(port);
      await greet(w);
      for (const opt of [OPT.EXTENDED_HEADERS, 999]) {
        option(w, opt);
        const r = await optionReply(w);
        expect(r).toMatchObject({ option: opt, type: REP.ERR_UNSUP });
      }
      option(w, OPT.GO, Buffer.concat([nameData('vol'), Buffer.from([0, 0])]));
      expect((await optionReplies(w)).at(-1)!.type).toBe(REP.ACK);
      request(w, CMD.FLUSH, 0, 0);
      expect((await reply(w)).error).toBe(0);
      w.close();
    });

    it('malformed INFO/GO and meta-context data get ERR_INVALID; an unknown name ERR_UNKNOWN', async () => {
      const w = await Wire.open(port);
      await greet(w);
      const lying = Buffer.alloc(10);
      lying.writeUInt32BE(5000, 0); // a name "longer" than the option
      option(w, OPT.GO, lying);
      expect((await optionReply(w)).type).toBe(REP.ERR_INVALID);
      option(w, OPT.GO, Buffer.concat([nameData('nope'), Buffer.from([0, 0])]));
      expect((await optionReply(w)).type).toBe(REP.ERR_UNKNOWN);
      option(w, OPT.SET_META_CONTEXT, contextData('vol', ['base:allocation']));
      expect((await optionReply(w)).type).toBe(REP.ERR_INVALID); // before STRUCTURED_REPLY
      option(w, OPT.STRUCTURED_REPLY);
      expect((await optionReply(w)).type).toBe(REP.ACK);
      const cut = contextData('vol', ['base:allocation']).subarray(0, 12);
      option(w, OPT.SET_META_CONTEXT, cut);
      expect((await optionReply(w)).type).toBe(REP.ERR_INVALID);
      option(w, OPT.ABORT);
      expect((await optionReply(w)).type).toBe(REP.ACK);
      expect(await w.waitClosed()).toBe(true);
    });

    it('an unknown name with EXPORT_NAME (which has no error reply) is disconnected', async () => {
      const w = await Wire.open(port);
      await greet(w);
      option(w, OPT.EXPORT_NAME, Buffer.from('nope'));
      expect(await w.waitClosed()).toBe(true);
    });

    it('a client that stalls in the handshake is dropped after the limit', async () => {
      const w = await Wire.open(port);
      await w.read(18);
      expect(await w.waitClosed(5000)).toBe(true);
    });

    it('EXPORT_NAME (the old way in) works, with NO_ZEROES honoured either way', async () => {
      for (const flags of [HANDSHAKE.FIXED_NEWSTYLE | HANDSHAKE.NO_ZEROES, HANDSHAKE.FIXED_NEWSTYLE]) {
        const w = await Wire.open(port);
        await greet(w, flags);
        option(w, OPT.EXPORT_NAME, Buffer.from('vol'));
        const info = await w.read(flags & HANDSHAKE.NO_ZEROES ? 10 : 134);
        expect(Number(info.readBigUInt64BE(0))).toBe(SIZE);
        request(w, CMD.READ, 0, 16);
        const r = await reply(w, 16);
        expect(r.error).toBe(0);
        expect(r.data!.length).toBe(16);
        w.close();
      }
    });
  });

  describe('transmission', () => {
    it('a 4 GiB read: EOVERFLOW (structured) or EINVAL (simple); the connection goes on', async () => {
      const s = await openExport(port, 'vol');
      request(s.wire, CMD.READ, 0, 0xffffffff);
      expect((await reply(s.wire)).error).toBe(ERR.EOVERFLOW);
      await stillServes(s);
      s.wire.close();
      const p = await openExport(port, 'vol', { structured: false });
      request(p.wire, CMD.READ, 0, 0xffffffff);
      expect((await reply(p.wire)).error).toBe(ERR.EINVAL);
      await stillServes(p);
      p.wire.close();
    });

    it('a 4 GiB write is answered with an error and the connection closed, its payload never read', async () => {
      const other = await openExport(port, 'vol');
      const s = await openExport(port, 'vol');
      request(s.wire, CMD.WRITE, 0, 0xffffffff, { payload: Buffer.alloc(1024) });
      expect([ERR.EOVERFLOW, ERR.EINVAL]).toContain((await reply(s.wire)).error);
      expect(await s.wire.waitClosed()).toBe(true);
      await stillServes(other);
      other.wire.close();
    });

    it('reads past the end are EINVAL, writes and zeroes past the end ENOSPC; offsets near 2^64 too', async () => {
      const s = await openExport(port, 'vol');
      request(s.wire, CMD.READ, SIZE - 512, 1024);
      expect((await reply(s.wire)).error).toBe(ERR.EINVAL);
      request(s.wire, CMD.WRITE, SIZE - 512, 1024, { payload: Buffer.alloc(1024, 7) });
      expect((await reply(s.wire)).error).toBe(ERR.ENOSPC);
      request(s.wire, CMD.WRITE_ZEROES, SIZE, 512);
      expect((await reply(s.wire)).error).toBe(ERR.ENOSPC);
      request(s.wire, CMD.READ, 0xfffffffffffff000n, 4096);
      expect((await reply(s.wire)).error).toBe(ERR.EINVAL);
      request(s.wire, CMD.TRIM, 0xfffffffffffff000n, 4096);
      expect((await reply(s.wire)).error).toBe(ERR.EINVAL);
      request(s.wire, CMD.BLOCK_STATUS, SIZE, 1);
      expect((await reply(s.wire)).error).toBe(ERR.EINVAL);
      expect(Buffer.from(await dev.read(SIZE - 512, 512)).equals(Buffer.alloc(512))).toBe(true); // nothing was written
      await stillServes(s);
      s.wire.close();
    });

    it('unknown commands and flags are EINVAL, CACHE (not offered) too; the refused write payload is skipped', async () => {
      const s = await openExport(port, 'vol');
      request(s.wire, 42, 0, 512);
      expect((await reply(s.wire)).error).toBe(ERR.EINVAL);
      request(s.wire, CMD.CACHE, 0, 512);
      expect((await reply(s.wire)).error).toBe(ERR.EINVAL);
      request(s.wire, CMD.READ, 0, 512, { flags: CMD_FLAG.FUA });
      expect((await reply(s.wire)).error).toBe(ERR.EINVAL);
      request(s.wire, CMD.WRITE, 0, 4, { flags: CMD_FLAG.REQ_ONE, payload: Buffer.from('nope') });
      expect((await reply(s.wire)).error).toBe(ERR.EINVAL);
      request(s.wire, CMD.FLUSH, 0, 0, { flags: 0x8000 });
      expect((await reply(s.wire)).error).toBe(ERR.EINVAL);
      await stillServes(s); // the refused payload did not become the next request
      s.wire.close();
    });

    it('a write to a read-only export is EPERM (so are zeroes and trim); reads go on', async () => {
      const s = await openExport(port, 'ro');
      request(s.wire, CMD.WRITE, 0, 512, { payload: Buffer.alloc(512, 1) });
      expect((await reply(s.wire)).error).toBe(ERR.EPERM);
      request(s.wire, CMD.WRITE_ZEROES, 0, 512);
      expect((await reply(s.wire)).error).toBe(ERR.EPERM);
      request(s.wire, CMD.TRIM, 0, 512);
      expect((await reply(s.wire)).error).toBe(ERR.EPERM);
      request(s.wire, CMD.READ, 0, 512);
      expect((await reply(s.wire, 512)).error).toBe(0);
      s.wire.close();
    });

    it('a bad request magic is disconnected; others keep being served', async () => {
      const other = await openExport(port, 'vol');
      const s = await openExport(port, 'vol');
      request(s.wire, CMD.READ, 0, 512, { magic: 0x12345678 });
      expect(await s.wire.waitClosed()).toBe(true);
      await stillServes(other);
      other.wire.close();
    });

    it('a client gone mid-payload: its partial write is not applied, what was acknowledged stays', async () => {
      const s = await openExport(port, 'vol');
      request(s.wire, CMD.WRITE, MiB, 4096, { payload: Buffer.alloc(4096, 0xa1), flags: CMD_FLAG.FUA });
      expect((await reply(s.wire)).error).toBe(0);
      request(s.wire, CMD.WRITE, 2 * MiB, 1 * MiB, { payload: Buffer.alloc(1000, 0xb2) }); // 1000 of 1 MiB sent
      await new Promise((r) => setTimeout(r, 50));
      s.wire.close();
      const after = await openExport(port, 'vol');
      request(after.wire, CMD.READ, MiB, 4096);
      expect(readData(await reply(after.wire, 4096), MiB, 4096).equals(Buffer.alloc(4096, 0xa1))).toBe(true);
      request(after.wire, CMD.READ, 2 * MiB, 1000);
      expect(readData(await reply(after.wire, 1000), 2 * MiB, 1000).equals(Buffer.alloc(1000))).toBe(true);
      after.wire.close();
    });

    it('a device error is EIO for that request only', async () => {
      const s = await openExport(port, 'vol');
      dev.failNext('write', new InternalError('the disk is on fire'));
      request(s.wire, CMD.WRITE, 0, 512, { payload: Buffer.alloc(512, 3) });
      expect((await reply(s.wire)).error).toBe(ERR.EIO);
      dev.failNext('read', new Error('boom'));
      request(s.wire, CMD.READ, 0, 512, { flags: CMD_FLAG.DF });
      const r = await reply(s.wire);
      expect(r.error).toBe(ERR.EIO);
      const err = r.chunks!.find((c) => c.type === REPLY.ERROR)!;
      expect(err.data.subarray(6).toString()).toContain('boom'); // the message travels in a structured error
      await stillServes(s);
      s.wire.close();
    });

    it('requests are pipelined: many at once, every reply names its request, FLUSH covers the answered writes', async () => {
      const s = await openExport(port, 'vol');
      const flushes = dev.flushes;
      const cookies = new Map<bigint, number>();
      for (let i = 0; i < 100; i++) {
        const c = request(s.wire, CMD.WRITE, 4 * MiB + i * 4096, 4096, { payload: Buffer.alloc(4096, i) });
        cookies.set(c, i);
      }
      for (let i = 0; i < 100; i++) {
        const r = await reply(s.wire);
        expect(r.error).toBe(0);
        expect(cookies.delete(r.cookie)).toBe(true);
      }
      request(s.wire, CMD.FLUSH, 0, 0);
      expect((await reply(s.wire)).error).toBe(0);
      expect(dev.flushes).toBe(flushes + 1);
      for (let i = 0; i < 100; i += 33) {
        expect(Buffer.from(await dev.read(4 * MiB + i * 4096, 4096)).equals(Buffer.alloc(4096, i))).toBe(true);
      }
      s.wire.close();
    });

    it('structured reads send holes as holes unless DF; BLOCK_STATUS honours REQ_ONE and needs a context', async () => {
      const s = await openExport(port, 'vol');
      await dev.writeZeroes!(8 * MiB, 4 * MiB);
      await dev.write(8 * MiB + 128 * 1024, Buffer.alloc(4096, 9));
      request(s.wire, CMD.READ, 8 * MiB, 256 * 1024);
      const r = await reply(s.wire);
      expect(r.chunks!.map((c) => c.type)).toEqual([REPLY.OFFSET_HOLE, REPLY.OFFSET_DATA, REPLY.OFFSET_HOLE]);
      expect(readData(r, 8 * MiB, 256 * 1024).subarray(128 * 1024, 132 * 1024).equals(Buffer.alloc(4096, 9))).toBe(true);
      request(s.wire, CMD.READ, 8 * MiB, 256 * 1024, { flags: CMD_FLAG.DF });
      expect((await reply(s.wire)).chunks!.map((c) => c.type)).toEqual([REPLY.OFFSET_DATA]);

      request(s.wire, CMD.BLOCK_STATUS, 8 * MiB, 256 * 1024);
      const all = (await reply(s.wire)).chunks![0]!.data;
      expect((all.length - 4) / 8).toBe(3); // hole, data, hole
      request(s.wire, CMD.BLOCK_STATUS, 8 * MiB, 256 * 1024, { flags: CMD_FLAG.REQ_ONE });
      const one = (await reply(s.wire)).chunks![0]!.data;
      expect((one.length - 4) / 8).toBe(1);
      expect(one.readUInt32BE(4)).toBe(128 * 1024);
      s.wire.close();

      const plain = await openExport(port, 'vol', { contexts: [] });
      request(plain.wire, CMD.BLOCK_STATUS, 0, 4096);
      expect((await reply(plain.wire)).error).toBe(ERR.EINVAL);
      plain.wire.close();
    });

    it('DISC with writes in flight: they finish and are kept, then the server closes', async () => {
      const s = await openExport(port, 'vol');
      for (let i = 0; i < 20; i++) request(s.wire, CMD.WRITE, 12 * MiB + i * 4096, 4096, { payload: Buffer.alloc(4096, 0xd0 + (i % 16)) });
      request(s.wire, CMD.DISC, 0, 0);
      expect(await s.wire.waitClosed()).toBe(true);
      for (let i = 0; i < 20; i++) {
        expect(Buffer.from(await dev.read(12 * MiB + i * 4096, 4096)).equals(Buffer.alloc(4096, 0xd0 + (i % 16)))).toBe(true);
      }
    });

    it('a flood of pipelined reads is held back by the server, not buffered without bound', async () => {
      const s = await openExport(port, 'vol');
      // 2,000 reads of 1 MiB each (2 GiB) sent at once, nobody reading the replies for a while.
      for (let i = 0; i < 2000; i++) request(s.wire, CMD.READ, (i % 15) * MiB, MiB, { flags: CMD_FLAG.DF });
      await new Promise((r) => setTimeout(r, 300));
      const rss = process.memoryUsage().rss;
      expect(rss).toBeLessThan(1024 * MiB);
      for (let i = 0; i < 2000; i++) expect((await reply(s.wire)).error).toBe(0);
      s.wire.close();
    });
  });

  it('removing an export drains and closes its connections; other exports are untouched', async () => {
    const extra = memoryDevice(MiB);
    server.addExport({ name: 'extra', device: extra, readOnly: false });
    const e = await openExport(port, 'extra');
    const v = await openExport(port, 'vol');
    request(e.wire, CMD.WRITE, 0, 4096, { payload: Buffer.alloc(4096, 0xee) });
    expect((await reply(e.wire)).error).toBe(0);
    await server.removeExport('extra');
    expect(await e.wire.waitClosed()).toBe(true);
    expect(server.exportNames().sort()).toEqual(['ro', 'vol']);
    await stillServes(v);
    v.wire.close();
    const w = await Wire.open(port);
    await greet(w);
    option(w, OPT.GO, Buffer.concat([nameData('extra'), Buffer.from([0, 0])]));
    expect((await optionReply(w)).type).toBe(REP.ERR_UNKNOWN);
    w.close();
  });
});
