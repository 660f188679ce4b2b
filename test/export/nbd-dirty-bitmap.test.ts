/**
 * `qemu:dirty-bitmap:NAME` (issue 17): an export offers each of its device's dirty bitmaps as a
 * meta context, as qemu-nbd --bitmap does. The device here is an in-memory one with a fake bitmap
 * map around it; real clients read it (nbdinfo --map, qemu-img map with x-dirty-bitmap), and the
 * test client checks what they do not show: LIST/SET answers and ids, extents, limits, errors.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FailedPrecondition, NotFound, type BlockDevice, type ByteRange } from '../../core/index.js';
import { NbdServer } from '../../core/export/nbd-server.js';
import { CMD, CMD_FLAG, ERR, OPT, REP, REPLY } from '../../core/export/nbd-protocol.js';
import { memoryDevice } from '../support/memory-device.js';
import { contextData, greet, nameData, option, optionReplies, optionReply, readData, reply, request, Wire } from '../support/nbd-client.js';
import { HAVE, ok, tool } from '../support/nbd-tools.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 64 * MiB;
const GRANULE = 64 * KiB;

/** A bitmap of the fake: its dirty ranges, or the error the device gives for it. */
type Bitmap = ByteRange[] | Error;

/**
 * A BlockDevice with dirty bitmaps around another one: `dirtyExtents` answers from `bitmaps` (the
 * ranges that meet the request, clipped to it, in order), unless `sloppy`, where it returns every
 * range whole and in reverse order (the server must clip and sort). Changing `bitmaps` changes
 * what the device says from then on.
 */
function withBitmaps(base: BlockDevice, bitmaps: Map<string, Bitmap>, o: { sloppy?: boolean; noExtents?: boolean } = {}): BlockDevice {
  const dev: BlockDevice = {
    sizeBytes: base.sizeBytes,
    blockSize: base.blockSize,
    read: (off, len) => base.read(off, len),
    write: (off, data) => base.write(off, data),
    extents: (off, len) => base.extents(off, len),
    flush: () => base.flush(),
    close: () => base.close(),
    dirtyBitmaps: () => [...bitmaps.keys()],
  };
  if (base.allocationDepth) dev.allocationDepth = (off, len) => base.allocationDepth!(off, len);
  if (!o.noExtents) {
    dev.dirtyExtents = async (name, offset, length) => {
      const b = bitmaps.get(name);
      if (b === undefined) throw new NotFound(`no dirty bitmap named ${name}`);
      if (b instanceof Error) throw b;
      if (o.sloppy) return [...b].reverse();
      const end = offset + length;
      return b.filter((r) => r.offset < end && r.offset + r.length > offset)
        .map((r) => ({ offset: Math.max(r.offset, offset), length: Math.min(r.offset + r.length, end) - Math.max(r.offset, offset) }));
    };
  }
  return dev;
}

/** The expected map of a bitmap over [0, size), worked out granule by granule (independent of the server's merging). */
function expectedMap(ranges: ByteRange[], size: number, offset = 0): { offset: number; length: number; dirty: boolean }[] {
  const dirty = new Array<boolean>(size / GRANULE).fill(false);
  for (const r of ranges) for (let p = r.offset; p < r.offset + r.length; p += GRANULE) dirty[p / GRANULE] = true;
  const out: { offset: number; length: number; dirty: boolean }[] = [];
  for (let g = offset / GRANULE; g < dirty.length; g++) {
    const last = out[out.length - 1];
    if (last && last.dirty === dirty[g]) last.length += GRANULE;
    else out.push({ offset: g * GRANULE, length: GRANULE, dirty: dirty[g]! });
  }
  return out;
}

const B0: ByteRange[] = [
  { offset: 64 * KiB, length: 64 * KiB }, { offset: 128 * KiB, length: 64 * KiB }, // adjacent: one extent on the wire
  { offset: MiB, length: 192 * KiB },
  { offset: 10 * MiB, length: MiB },
  { offset: 63 * MiB, length: MiB }, // up to the end
];
const B1: ByteRange[] = [{ offset: 2 * MiB, length: 64 * KiB }];

describe('qemu:dirty-bitmap:NAME meta contexts', () => {
  let server: NbdServer;
  let unixServer: NbdServer;
  let port: number;
  let dir: string;
  let volBitmaps: Map<string, Bitmap>;
  let vol: BlockDevice;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'offload-nbd-bitmap-'));
    server = await NbdServer.listen({ port: 0 });
    port = (server.address as { port: number }).port;
    volBitmaps = new Map<string, Bitmap>([
      ['b0', B0], ['b1', B1], ['broken', new FailedPrecondition('dirty bitmap broken is inconsistent (the image was not closed cleanly)')],
    ]);
    vol = withBitmaps(memoryDevice(SIZE, { depth: true }), volBitmaps);
    server.addExport({ name: 'vol', device: vol, readOnly: false });
    // Another export with a bitmap of its own: names are per export.
    server.addExport({ name: 'other', device: withBitmaps(memoryDevice(4 * MiB), new Map([['only-here', [{ offset: 0, length: MiB }]]])), readOnly: true });
    // A device that names bitmaps but cannot say which ranges are dirty offers none.
    server.addExport({ name: 'plain', device: withBitmaps(memoryDevice(4 * MiB), new Map([['x', []]]), { noExtents: true }), readOnly: true });
    // A device whose bitmap list fails: no bitmaps, served as before.
    const flaky = withBitmaps(memoryDevice(4 * MiB), new Map());
    flaky.dirtyBitmaps = () => { throw new Error('cannot list bitmaps now'); };
    server.addExport({ name: 'flaky', device: flaky, readOnly: true });
    // Many extents: 512-byte runs alternating dirty and clean over 256 MiB; and a device that
    // returns its ranges whole and backwards.
    const many: ByteRange[] = [];
    for (let p = 0; p < 256 * MiB; p += 1024) many.push({ offset: p, length: 512 });
    server.addExport({ name: 'big', device: withBitmaps(memoryDevice(256 * MiB), new Map([['many', many]])), readOnly: true });
    server.addExport({ name: 'sloppy', device: withBitmaps(memoryDevice(SIZE), new Map([['b0', B0]]), { sloppy: true }), readOnly: true });

    unixServer = await NbdServer.listen({ socket: join(dir, 'nbd.sock') });
    unixServer.addExport({ name: 'vol', device: vol, readOnly: true });
  });

  afterAll(async () => {
    await server?.close();
    await unixServer?.close();
    rmSync(dir, { recursive: true, force: true });
  });

  describe.skipIf(!HAVE.qemu || !HAVE.libnbd)('with real clients', () => {
    const uri = (name: string) => server.uri(name);
    type MapEntry = { offset: number; length: number; type: number; description: string };

    it('nbdinfo --map=qemu:dirty-bitmap:NAME shows the dirty ranges (1 dirty) and the rest (0 clean) over the whole export', async () => {
      for (const [name, ranges] of [['b0', B0], ['b1', B1]] as const) {
        const map = JSON.parse(await ok('nbdinfo', [`--map=qemu:dirty-bitmap:${name}`, '--json', uri('vol')])) as MapEntry[];
        expect(map).toEqual(expectedMap(ranges, SIZE).map((e) => ({
          offset: e.offset, length: e.length, type: e.dirty ? 1 : 0, description: e.dirty ? 'dirty' : 'clean',
        })));
      }
      // The plain listing, as a person reads it.
      const text = await ok('nbdinfo', ['--map=qemu:dirty-bitmap:b1', uri('vol')]);
      expect(text.trim().split('\n').map((l) => l.trim().split(/\s+/))).toEqual([
        ['0', String(2 * MiB), '0', 'clean'],
        [String(2 * MiB), String(64 * KiB), '1', 'dirty'],
        [String(2 * MiB + 64 * KiB), String(SIZE - 2 * MiB - 64 * KiB), '0', 'clean'],
      ]);
      // A device that returns its ranges unclipped and out of order gives the same map.
      const sloppy = JSON.parse(await ok('nbdinfo', ['--map=qemu:dirty-bitmap:b0', '--json', uri('sloppy')])) as MapEntry[];
      expect(sloppy.map((e) => [e.offset, e.length, e.type])).toEqual(expectedMap(B0, SIZE).map((e) => [e.offset, e.length, e.dirty ? 1 : 0]));
    });

    it('nbdinfo shows each export\'s own contexts: --json, --list --json, --list --content', async () => {
      const one = JSON.parse(await ok('nbdinfo', ['--json', uri('vol')])) as { exports: { contexts: string[] }[] };
      expect(one.exports[0]!.contexts).toEqual([
        'base:allocation', 'qemu:allocation-depth', 'qemu:dirty-bitmap:b0', 'qemu:dirty-bitmap:b1', 'qemu:dirty-bitmap:broken',
      ]);
      const all = JSON.parse(await ok('nbdinfo', ['--list', '--json', uri('vol')])) as { exports: { 'export-name': string; contexts: string[] }[] };
      const byName = new Map(all.exports.map((e) => [e['export-name'], e.contexts]));
      expect(byName.get('vol')).toEqual(one.exports[0]!.contexts);
      expect(byName.get('other')).toEqual(['base:allocation', 'qemu:dirty-bitmap:only-here']);
      expect(byName.get('plain')).toEqual(['base:allocation']); // names bitmaps, cannot answer for them
      expect(byName.get('flaky')).toEqual(['base:allocation']); // its list failed
      expect(byName.get('big')).toEqual(['base:allocation', 'qemu:dirty-bitmap:many']);
      const content = await ok('nbdinfo', ['--list', '--content', uri('vol')]);
      const section = (name: string) => content.slice(content.indexOf(`export="${name}":`)).split(/\nexport=/)[0]!;
      expect(section('vol')).toContain('content: data');
      expect(section('vol')).toMatch(/qemu:dirty-bitmap:b0\n\s+qemu:dirty-bitmap:b1\n/);
      expect(section('other')).toContain('qemu:dirty-bitmap:only-here');
      expect(section('other')).not.toContain('qemu:dirty-bitmap:b0');
    });

    it('qemu-img map with x-dirty-bitmap shows dirty ranges as "data": false (QEMU reads the bitmap\'s bit 0 as a hole), over TCP and a unix socket', async () => {
      const expected = expectedMap(B0, SIZE).map((e) => ({
        start: e.offset, length: e.length, depth: 0, present: !e.dirty, zero: false, data: !e.dirty, ...(e.dirty ? {} : { offset: e.offset }),
      }));
      for (const server_ of [
        `server.type=inet,server.host=127.0.0.1,server.port=${port}`,
        `server.type=unix,server.path=${join(dir, 'nbd.sock')}`,
      ]) {
        const out = await ok('qemu-img', ['map', '--output=json', '--image-opts', `driver=nbd,${server_},export=vol,x-dirty-bitmap=qemu:dirty-bitmap:b0`]);
        expect(JSON.parse(out)).toEqual(expected);
      }
    });

    it('an unknown bitmap, or one of another export, is not selected: nbdinfo --map and qemu-img map refuse it', async () => {
      for (const [exp, bitmap] of [['vol', 'nope'], ['vol', 'only-here'], ['other', 'b0'], ['plain', 'x']] as const) {
        const r = await tool('nbdinfo', [`--map=qemu:dirty-bitmap:${bitmap}`, uri(exp)]);
        expect(r.status).not.toBe(0);
        expect(r.stderr).toContain(`server does not support metadata context "qemu:dirty-bitmap:${bitmap}"`);
      }
      // QEMU asks for the context alone and fails to open when the server does not select it
      // (block/nbd.c: "requested x-dirty-bitmap ... not found"; 7.2 prints only the errno).
      const r = await tool('qemu-img', ['map', '--output=json', '--image-opts',
        `driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=${port},export=other,x-dirty-bitmap=qemu:dirty-bitmap:b0`]);
      expect(r.status).not.toBe(0);
      expect(r.stderr).toContain('Could not open');
      expect(r.stderr).toContain('Invalid argument');
    });

    it('a bitmap the device cannot answer for (inconsistent) is an I/O error for the client; the server goes on', async () => {
      const n = await tool('nbdinfo', ['--map=qemu:dirty-bitmap:broken', uri('vol')]);
      expect(n.status).not.toBe(0);
      expect(n.stderr).toContain('Input/output error');
      const q = await tool('qemu-img', ['map', '--output=json', '--image-opts',
        `driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=${port},export=vol,x-dirty-bitmap=qemu:dirty-bitmap:broken`]);
      expect(q.status).not.toBe(0);
      expect(q.stderr).toContain('Input/output error');
      const map = JSON.parse(await ok('nbdinfo', ['--map=qemu:dirty-bitmap:b1', '--json', uri('vol')])) as MapEntry[];
      expect(map.filter((e) => e.type === 1).map((e) => [e.offset, e.length])).toEqual([[2 * MiB, 64 * KiB]]);
    });
  });

  describe('on the wire', () => {
    /** A connection with structured replies negotiated, before GO. */
    async function negotiating(): Promise<Wire> {
      const w = await Wire.open(port);
      await greet(w);
      option(w, OPT.STRUCTURED_REPLY);
      expect((await optionReply(w)).type).toBe(REP.ACK);
      return w;
    }

    /** LIST or SET_META_CONTEXT: the contexts answered (id, name), after checking the final ACK. */
    async function metaContexts(w: Wire, opt: number, exportName: string, queries: string[]): Promise<[number, string][]> {
      option(w, opt, contextData(exportName, queries));
      const replies = await optionReplies(w);
      expect(replies[replies.length - 1]!.type).toBe(REP.ACK);
      return replies.filter((r) => r.type === REP.META_CONTEXT).map((r) => [r.data.readUInt32BE(0), r.data.subarray(4).toString('utf8')]);
    }

    async function go(w: Wire, exportName: string): Promise<void> {
      option(w, OPT.GO, Buffer.concat([nameData(exportName), Buffer.from([0, 0])]));
      const replies = await optionReplies(w);
      expect(replies[replies.length - 1]!.type).toBe(REP.ACK);
    }

    /** A connection in transmission with `queries` selected; returns the wire and the selection. */
    async function selected(exportName: string, queries: string[]): Promise<{ w: Wire; ids: [number, string][] }> {
      const w = await negotiating();
      const ids = await metaContexts(w, OPT.SET_META_CONTEXT, exportName, queries);
      await go(w, exportName);
      return { w, ids };
    }

    /** BLOCK_STATUS chunks as (context id, [length, flags][]), DONE only on the last one. */
    async function blockStatus(w: Wire, offset: number, length: number, flags = 0): Promise<{ id: number; extents: [number, number][] }[]> {
      request(w, CMD.BLOCK_STATUS, offset, length, { flags });
      const r = await reply(w);
      expect(r.error).toBe(0);
      const chunks = r.chunks!;
      expect(chunks.every((c) => c.type === REPLY.BLOCK_STATUS)).toBe(true);
      expect(chunks.map((c) => c.flags & 1)).toEqual(chunks.map((_, i) => (i === chunks.length - 1 ? 1 : 0)));
      return chunks.map((c) => {
        const extents: [number, number][] = [];
        for (let p = 4; p < c.data.length; p += 8) extents.push([c.data.readUInt32BE(p), c.data.readUInt32BE(p + 4)]);
        return { id: c.data.readUInt32BE(0), extents };
      });
    }

    it('LIST: qemu: gives depth and every bitmap, qemu:dirty-bitmap: only the bitmaps, an exact name only itself; ids 0; names per export', async () => {
      const w = await negotiating();
      const list = (exp: string, q: string[]) => metaContexts(w, OPT.LIST_META_CONTEXT, exp, q);
      expect(await list('vol', [])).toEqual([
        [0, 'base:allocation'], [0, 'qemu:allocation-depth'], [0, 'qemu:dirty-bitmap:b0'], [0, 'qemu:dirty-bitmap:b1'], [0, 'qemu:dirty-bitmap:broken'],
      ]);
      expect(await list('vol', ['qemu:'])).toEqual([
        [0, 'qemu:allocation-depth'], [0, 'qemu:dirty-bitmap:b0'], [0, 'qemu:dirty-bitmap:b1'], [0, 'qemu:dirty-bitmap:broken'],
      ]);
      expect(await list('vol', ['qemu:dirty-bitmap:'])).toEqual([[0, 'qemu:dirty-bitmap:b0'], [0, 'qemu:dirty-bitmap:b1'], [0, 'qemu:dirty-bitmap:broken']]);
      expect(await list('vol', ['base:'])).toEqual([[0, 'base:allocation']]);
      // In the server's order (base, depth, bitmaps), whatever the order asked; unknown names skipped.
      expect(await list('vol', ['qemu:dirty-bitmap:b1', 'qemu:dirty-bitmap:nope', 'base:allocation', 'qemu:dirty-bitmap:b'])).toEqual([
        [0, 'base:allocation'], [0, 'qemu:dirty-bitmap:b1'],
      ]);
      expect(await list('other', ['qemu:dirty-bitmap:'])).toEqual([[0, 'qemu:dirty-bitmap:only-here']]);
      expect(await list('other', ['qemu:dirty-bitmap:b0'])).toEqual([]);
      expect(await list('plain', ['qemu:'])).toEqual([]);
      expect(await list('flaky', [])).toEqual([[0, 'base:allocation']]);
      w.close();
    });

    it('SET: exact names select with qemu-nbd\'s ids (bitmap i is 2 + i), wildcards and unknown names select nothing; BLOCK_STATUS answers each in id order', async () => {
      const { w, ids } = await selected('vol', ['qemu:dirty-bitmap:b1', 'qemu:dirty-bitmap:', 'qemu:', 'qemu:dirty-bitmap:nope', 'base:allocation']);
      expect(ids).toEqual([[0, 'base:allocation'], [3, 'qemu:dirty-bitmap:b1']]);
      const chunks = await blockStatus(w, 2 * MiB - 64 * KiB, 256 * KiB);
      expect(chunks.map((c) => c.id)).toEqual([0, 3]);
      expect(chunks[0]!.extents).toEqual([[256 * KiB, 3]]); // nothing written: a hole that reads as zeros
      expect(chunks[1]!.extents).toEqual([[64 * KiB, 0], [64 * KiB, 1], [128 * KiB, 0]]);
      w.close();

      // Without allocation-depth (other has no chain), the first bitmap is still 2.
      const o = await selected('other', ['qemu:dirty-bitmap:only-here']);
      expect(o.ids).toEqual([[2, 'qemu:dirty-bitmap:only-here']]);
      expect((await blockStatus(o.w, 0, 2 * MiB)).map((c) => [c.id, c.extents])).toEqual([[2, [[MiB, 1], [MiB, 0]]]]);
      o.w.close();

      // Only wildcards, or only unknown names: nothing selected, so BLOCK_STATUS is EINVAL.
      const none = await selected('vol', ['qemu:dirty-bitmap:', 'qemu:dirty-bitmap:only-here']);
      expect(none.ids).toEqual([]);
      request(none.w, CMD.BLOCK_STATUS, 0, 4096);
      expect((await reply(none.w)).error).toBe(ERR.EINVAL);
      none.w.close();
    });

    it('context ids stay the connection\'s while the device\'s bitmap list changes; a new connection sees the new list', async () => {
      const w = await negotiating();
      expect(await metaContexts(w, OPT.LIST_META_CONTEXT, 'vol', ['qemu:dirty-bitmap:'])).toEqual([
        [0, 'qemu:dirty-bitmap:b0'], [0, 'qemu:dirty-bitmap:b1'], [0, 'qemu:dirty-bitmap:broken'],
      ]);
      const saved = new Map(volBitmaps);
      volBitmaps.clear();
      volBitmaps.set('new', [{ offset: 0, length: 64 * KiB }]);
      for (const [k, v] of saved) volBitmaps.set(k, v);
      try {
        // This connection read the list at its first meta-context option: b1 is still 3, and 'new' unknown to it.
        expect(await metaContexts(w, OPT.SET_META_CONTEXT, 'vol', ['qemu:dirty-bitmap:b1', 'qemu:dirty-bitmap:new'])).toEqual([[3, 'qemu:dirty-bitmap:b1']]);
        await go(w, 'vol');
        expect(await blockStatus(w, 2 * MiB, 64 * KiB)).toEqual([{ id: 3, extents: [[64 * KiB, 1]] }]);
        const fresh = await selected('vol', ['qemu:dirty-bitmap:b1', 'qemu:dirty-bitmap:new']);
        expect(fresh.ids).toEqual([[2, 'qemu:dirty-bitmap:new'], [4, 'qemu:dirty-bitmap:b1']]);
        expect(await blockStatus(fresh.w, 0, 128 * KiB)).toEqual([{ id: 2, extents: [[64 * KiB, 1], [64 * KiB, 0]] }, { id: 4, extents: [[128 * KiB, 0]] }]);
        fresh.w.close();
      } finally {
        volBitmaps.clear();
        for (const [k, v] of saved) volBitmaps.set(k, v);
        w.close();
      }
    });

    it('BLOCK_STATUS of a bitmap covers exactly the request, runs merged; REQ_ONE gives one extent; at most 131072 extents', async () => {
      const { w } = await selected('vol', ['qemu:dirty-bitmap:b0']);
      const one = async (offset: number, length: number, flags = 0) => {
        const c = await blockStatus(w, offset, length, flags);
        expect(c.length).toBe(1);
        expect(c[0]!.id).toBe(2);
        return c[0]!.extents;
      };
      // The two adjacent dirty ranges are one extent; the request's ends cut the first and last.
      expect(await one(0, 2 * MiB)).toEqual([[64 * KiB, 0], [128 * KiB, 1], [MiB - 192 * KiB, 0], [192 * KiB, 1], [MiB - 192 * KiB, 0]]);
      expect(await one(100 * KiB, 50 * KiB)).toEqual([[50 * KiB, 1]]);
      expect(await one(10 * MiB + 4096, 2 * MiB)).toEqual([[MiB - 4096, 1], [MiB + 4096, 0]]);
      expect(await one(63 * MiB - 512, MiB + 512)).toEqual([[512, 0], [MiB, 1]]);
      expect(await one(0, SIZE)).toEqual(expectedMap(B0, SIZE).map((e) => [e.length, e.dirty ? 1 : 0]));
      // REQ_ONE: only the first extent, however far the request goes.
      expect(await one(0, SIZE, CMD_FLAG.REQ_ONE)).toEqual([[64 * KiB, 0]]);
      expect(await one(64 * KiB, SIZE - 64 * KiB, CMD_FLAG.REQ_ONE)).toEqual([[128 * KiB, 1]]);
      expect(await one(12 * MiB, 51 * MiB, CMD_FLAG.REQ_ONE)).toEqual([[51 * MiB, 0]]);
      // Past the end: EINVAL, and the connection goes on.
      request(w, CMD.BLOCK_STATUS, SIZE - 4096, 8192);
      expect((await reply(w)).error).toBe(ERR.EINVAL);
      expect(await one(SIZE - MiB, MiB)).toEqual([[MiB, 1]]);
      w.close();

      // 512-byte runs over 256 MiB would be 524288 extents: one chunk carries the first 131072 (as qemu-nbd).
      const big = await selected('big', ['qemu:dirty-bitmap:many']);
      const [chunk] = await blockStatus(big.w, 0, 256 * MiB);
      expect(chunk!.extents.length).toBe(131072);
      expect(chunk!.extents.slice(0, 3)).toEqual([[512, 1], [512, 0], [512, 1]]);
      expect(chunk!.extents.every(([len, f], i) => len === 512 && f === (i % 2 === 0 ? 1 : 0))).toBe(true);
      expect(await blockStatus(big.w, 4096 + 512, 256 * MiB - 8192, CMD_FLAG.REQ_ONE)).toEqual([{ id: 2, extents: [[512, 0]] }]);
      big.w.close();
    });

    it('a device error from dirtyExtents is an error reply for that request only: EIO (inconsistent), EINVAL (gone since the handshake)', async () => {
      const { w, ids } = await selected('vol', ['base:allocation', 'qemu:dirty-bitmap:broken', 'qemu:dirty-bitmap:b1']);
      expect(ids).toEqual([[0, 'base:allocation'], [3, 'qemu:dirty-bitmap:b1'], [4, 'qemu:dirty-bitmap:broken']]);
      const failing = async (errno: number, text: string) => {
        request(w, CMD.BLOCK_STATUS, 0, MiB);
        const r = await reply(w);
        expect(r.error).toBe(errno);
        expect(r.chunks!.map((c) => c.type)).toEqual([REPLY.ERROR]); // no partial answer before it
        expect(r.chunks![0]!.data.subarray(6).toString()).toContain(text);
      };
      await failing(ERR.EIO, 'inconsistent');
      // The connection goes on: a write and a read of it, another BLOCK_STATUS too.
      request(w, CMD.WRITE, 0, 4, { payload: Buffer.from('live') });
      expect((await reply(w)).error).toBe(0);
      request(w, CMD.READ, 0, 4);
      expect(readData(await reply(w, 4), 0, 4).toString()).toBe('live');
      await failing(ERR.EIO, 'inconsistent');

      const saved = volBitmaps.get('broken')!;
      try {
        volBitmaps.set('broken', new Error('the bitmap file vanished'));
        await failing(ERR.EIO, 'vanished');
        volBitmaps.delete('broken');
        await failing(ERR.EINVAL, 'no dirty bitmap named broken');
        volBitmaps.set('broken', [{ offset: 0, length: 64 * KiB }]);
        expect((await blockStatus(w, 0, 128 * KiB)).map((c) => [c.id, c.extents])).toEqual([
          [0, [[64 * KiB, 0], [64 * KiB, 3]]], [3, [[128 * KiB, 0]]], [4, [[64 * KiB, 1], [64 * KiB, 0]]],
        ]);
      } finally {
        volBitmaps.set('broken', saved);
        w.close();
      }
      // Other clients were never disturbed.
      const other = await selected('vol', ['qemu:dirty-bitmap:b1']);
      expect(await blockStatus(other.w, 2 * MiB, 64 * KiB)).toEqual([{ id: 3, extents: [[64 * KiB, 1]] }]);
      other.w.close();
    });
  });
});
