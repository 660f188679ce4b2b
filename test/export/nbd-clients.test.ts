/**
 * The NBD server against real clients (qemu-img, qemu-io, nbdinfo, nbdcopy, nbdkit) over an
 * in-memory device, so what each client did is checked on the device itself. The same clients
 * against every backend's volumes: test/export/exports-backends.test.ts.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NbdServer } from '../../core/export/nbd-server.js';
import { memoryDevice, type MemoryDevice } from '../support/memory-device.js';
import { HAVE, ok, qemuIo, qemuMap, tool } from '../support/nbd-tools.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;

describe.skipIf(!HAVE.qemu || !HAVE.libnbd)('the NBD server with real clients', () => {
  let server: NbdServer;
  let dev: MemoryDevice;
  let ro: MemoryDevice;
  let dir: string;
  let uri: string;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'offload-nbd-'));
    server = await NbdServer.listen({ port: 0 });
    dev = memoryDevice(SIZE, { depth: true });
    ro = memoryDevice(4 * MiB);
    await ro.write(0, Buffer.alloc(MiB, 0x5a));
    server.addExport({ name: 'vol', device: dev, readOnly: false, description: 'a test volume' });
    server.addExport({ name: 'ro', device: ro, readOnly: true });
    uri = server.uri('vol');
  });

  afterAll(async () => {
    await server.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it('nbdinfo sees the export as negotiated: size, description, block sizes, contexts, flags', async () => {
    const info = JSON.parse(await ok('nbdinfo', ['--json', uri])) as {
      exports: { 'export-name': string; description: string; 'export-size': number; 'is_read_only': boolean; 'can_multi_conn': boolean;
        'can_flush': boolean; 'can_fua': boolean; 'can_trim': boolean; 'can_zero': boolean; 'can_df': boolean; 'can_fast_zero': boolean;
        'block_size_preferred': number; 'block_size_minimum': number; 'block_size_maximum': number; contexts: string[] }[];
    };
    const e = info.exports[0]!;
    expect(e['export-name']).toBe('vol');
    expect(e.description).toBe('a test volume');
    expect(e['export-size']).toBe(SIZE);
    expect(e).toMatchObject({ is_read_only: false, can_multi_conn: true, can_flush: true, can_fua: true, can_trim: true, can_zero: true, can_df: true, can_fast_zero: true });
    expect(e.block_size_minimum).toBe(1);
    expect(e.block_size_preferred).toBe(64 * 1024);
    expect(e.block_size_maximum).toBe(32 * MiB);
    expect(e.contexts).toEqual(expect.arrayContaining(['base:allocation', 'qemu:allocation-depth']));

    const roInfo = JSON.parse(await ok('nbdinfo', ['--json', server.uri('ro')])) as { exports: { is_read_only: boolean; can_trim: boolean; contexts: string[] }[] };
    expect(roInfo.exports[0]).toMatchObject({ is_read_only: true, can_trim: false });
    expect(roInfo.exports[0]!.contexts).toEqual(['base:allocation']); // no chain depth on this device
  });

  it('nbdinfo --list names every export', async () => {
    const out = JSON.parse(await ok('nbdinfo', ['--list', '--json', uri])) as { exports: { 'export-name': string }[] };
    expect(out.exports.map((e) => e['export-name']).sort()).toEqual(['ro', 'vol']);
  });

  it('qemu-io writes (plain, FUA, zeroes, discard) land on the device and read back', async () => {
    const flushes = dev.flushes;
    await qemuIo(uri, ['write -P 0xab 0 1M', 'write -f -P 0xcd 1M 64k', 'write -P 0xee 2M 128k', 'write -z 2M 64k', 'flush']);
    expect(dev.flushes).toBeGreaterThan(flushes + 1); // the FUA write and the flush
    expect(Buffer.from(await dev.read(0, MiB)).equals(Buffer.alloc(MiB, 0xab))).toBe(true);
    expect(Buffer.from(await dev.read(MiB, 65536)).equals(Buffer.alloc(65536, 0xcd))).toBe(true);
    expect(Buffer.from(await dev.read(2 * MiB, 65536)).equals(Buffer.alloc(65536))).toBe(true);
    expect(Buffer.from(await dev.read(2 * MiB + 65536, 65536)).equals(Buffer.alloc(65536, 0xee))).toBe(true);
    await qemuIo(uri, ['read -P 0xab 0 1M', 'read -P 0xcd 1M 64k', 'read -P 0 2M 64k', 'read -P 0xee 2112k 64k', 'read -P 0 8M 1M']);
    // A discard of whole chunks frees them (the memory device then reads zeros).
    const before = dev.allocated;
    await qemuIo(uri, ['discard 0 256k']);
    expect(dev.allocated).toBe(before - 4);
    await qemuIo(uri, ['read -P 0 0 256k', 'read -P 0xab 256k 768k']);
  });

  it('a large write (32 MiB, the most one request may carry) is taken in whole', async () => {
    await qemuIo(uri, ['write -P 0x11 16M 32M', 'read -P 0x11 16M 32M']);
    expect(Buffer.from(await dev.read(16 * MiB + 31 * MiB, MiB)).equals(Buffer.alloc(MiB, 0x11))).toBe(true);
    await qemuIo(uri, ['write -z 16M 32M']);
  });

  it('qemu-img info, map and nbdinfo --map describe the device as it is', async () => {
    await dev.writeZeroes!(0, SIZE);
    await dev.write(0, randomBytes(3 * 65536));
    await dev.write(10 * MiB, randomBytes(MiB));
    const info = JSON.parse(await ok('qemu-img', ['info', '--output=json', uri])) as { 'virtual-size': number; format: string };
    expect(info['virtual-size']).toBe(SIZE);
    expect(info.format).toBe('raw');
    const map = await qemuMap(uri);
    const data = map.filter((m) => m.data).map((m) => ({ offset: m.start, length: m.length }));
    expect(data).toEqual((await dev.extents()).map((e) => ({ offset: e.offset, length: e.length })));
    expect(map.filter((m) => !m.data).every((m) => m.zero)).toBe(true);
    const nbdMap = JSON.parse(await ok('nbdinfo', ['--map', '--json', uri])) as { offset: number; length: number; type: number }[];
    expect(nbdMap.filter((m) => m.type === 0).map((m) => ({ offset: m.offset, length: m.length }))).toEqual(data);
    expect(nbdMap.reduce((n, m) => n + m.length, 0)).toBe(SIZE);
    // The chain depth, as this device makes it up: even chunks from the top, odd ones from below.
    const depth = JSON.parse(await ok('nbdinfo', ['--map=qemu:allocation-depth', '--json', uri])) as { offset: number; length: number; type: number }[];
    expect(depth.slice(0, 3).map((d) => d.type)).toEqual([1, 2, 1]);
  });

  it('qemu-img convert and compare read the export; a qcow2 overlay can use it as its backing file', async () => {
    const out = join(dir, 'out.qcow2');
    await ok('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', uri, out]);
    expect((await tool('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', uri, out])).status).toBe(0);
    const raw = join(dir, 'out.raw');
    await ok('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, raw]);
    expect(digest(readFileSync(raw))).toBe(digest(await dev.read(0, SIZE)));

    const overlay = join(dir, 'overlay.qcow2');
    await ok('qemu-img', ['create', '-f', 'qcow2', '-b', uri, '-F', 'raw', overlay]);
    await ok('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x77 0 64k', overlay]);
    const merged = join(dir, 'merged.raw');
    await ok('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', overlay, merged]);
    const want = Buffer.from(await dev.read(0, SIZE));
    want.fill(0x77, 0, 65536);
    expect(digest(readFileSync(merged))).toBe(digest(want));
    expect(Buffer.from(await dev.read(0, 65536)).equals(Buffer.alloc(65536, 0x77))).toBe(false); // the overlay took the write
  });

  it('nbdcopy copies both ways: to a file, from a file, to null:, and between our export and nbdkit', async () => {
    const file = join(dir, 'copy.raw');
    await ok('nbdcopy', [uri, file]);
    expect(digest(readFileSync(file))).toBe(digest(await dev.read(0, SIZE)));
    await ok('nbdcopy', [uri, 'null:']);

    const src = join(dir, 'src.raw');
    const content = Buffer.alloc(SIZE);
    randomBytes(4 * MiB).copy(content, 20 * MiB);
    randomBytes(65536).copy(content, SIZE - 65536);
    writeFileSync(src, content);
    await ok('nbdcopy', [src, uri]);
    expect(digest(await dev.read(0, SIZE))).toBe(digest(content));

    if (!HAVE.nbdkit) return;
    // nbdkit's pattern plugin into our export, then our export back into nbdkit's checkwrite
    // filter over the same pattern, which fails the copy on any byte that differs.
    await ok('nbdcopy', ['--', '[', 'nbdkit', 'pattern', String(SIZE), ']', uri]);
    await ok('nbdcopy', ['--', uri, '[', 'nbdkit', '--filter=checkwrite', 'pattern', String(SIZE), ']']);
    const head = Buffer.from(await dev.read(8 * 1000, 8));
    expect(head.readBigUInt64BE(0)).toBe(8000n); // the pattern: each 8 bytes hold their own offset
  });

  it('a unix socket server serves the same protocol', async () => {
    const sock = join(dir, 'nbd.sock');
    const s = await NbdServer.listen({ socket: sock });
    try {
      const d = memoryDevice(8 * MiB);
      s.addExport({ name: 'disk', device: d, readOnly: false });
      expect(s.uri('disk')).toBe(`nbd+unix:///disk?socket=${sock}`);
      await qemuIo(s.uri('disk'), ['write -P 0x42 4k 4k', 'read -P 0x42 4k 4k']);
      expect(Buffer.from(await d.read(4096, 4096)).equals(Buffer.alloc(4096, 0x42))).toBe(true);
    } finally {
      await s.close();
    }
  });

  it('a read-only export refuses writes with a permission error and still serves reads', async () => {
    const r = await tool('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 4k', server.uri('ro')]);
    expect(r.stdout + r.stderr).toMatch(/Operation not permitted|read-only|Permission denied/i);
    await qemuIo(server.uri('ro'), ['read -P 0x5a 0 1M', 'read -P 0 1M 1M'], { readOnly: true });
    expect(Buffer.from(await ro.read(0, 4096)).equals(Buffer.alloc(4096, 0x5a))).toBe(true);
  });

  it('the default export (no name) is the only one when one is served, and refused when there are several', async () => {
    const s = await NbdServer.listen({ port: 0 });
    try {
      s.addExport({ name: 'only', device: memoryDevice(2 * MiB), readOnly: true });
      const port = (s.address as { port: number }).port;
      const info = JSON.parse(await ok('qemu-img', ['info', '--output=json', `nbd://127.0.0.1:${port}`])) as { 'virtual-size': number };
      expect(info['virtual-size']).toBe(2 * MiB);
      s.addExport({ name: 'second', device: memoryDevice(MiB), readOnly: true });
      expect((await tool('qemu-img', ['info', `nbd://127.0.0.1:${port}`])).status).not.toBe(0);
    } finally {
      await s.close();
    }
  });

  it('an unknown export name is refused and the client says so', async () => {
    const r = await tool('qemu-img', ['info', server.uri('nope')]);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/nope|export|not (available|found)/i);
  });
});

function digest(b: Uint8Array): string {
  return createHash('sha256').update(b).digest('hex');
}
