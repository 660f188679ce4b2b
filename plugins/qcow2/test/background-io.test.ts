/**
 * Background (bulk) I/O: the native helper's reads and writes on its own low-priority thread
 * (native/fileio/bgio.c), and the engine's `background` option, which sends a bulk copy's data
 * reads and writes there and nothing else.
 */
import { closeSync, fdatasyncSync, openSync, readFileSync, readSync, readdirSync, writeFileSync, writeSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { createImage, openImage } from '../index.js';
import { ImageFile, setNativeBackgroundIO } from '../engine/file.js';
import { imageDevice } from '../engine/image-device.js';
import { nativeAddon, type NativeAddon } from '../engine/native-addon.js';
import { hasQemu, pattern, qemuCheckJson, tempDir } from './helpers.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const { dir, cleanup } = tempDir('qcow2-background-io-');
afterAll(cleanup);
afterEach(() => setNativeBackgroundIO(undefined));

const addon = nativeAddon();
const native = addon?.backgroundRead && addon.backgroundWrite && addon.backgroundSync ? addon as Required<Pick<NativeAddon, 'backgroundRead' | 'backgroundWrite' | 'backgroundSync'>> : undefined;

describe.skipIf(!native)('the native helper\'s background reads and writes', () => {
  it('write and read back, many at once; a read past the end is short; errors carry their errno', async () => {
    const file = join(dir, 'plain.bin');
    writeFileSync(file, Buffer.alloc(0));
    const fd = openSync(file, 'r+');
    try {
      const parts = Array.from({ length: 48 }, (_, i) => pattern(64 * KiB + i * 512, i + 1));
      const at = (i: number) => i * 160 * KiB;
      await Promise.all(parts.map((p, i) => native!.backgroundWrite(fd, p, at(i))));
      const back = await Promise.all(parts.map(async (p, i) => {
        const buf = new Uint8Array(p.length);
        expect(await native!.backgroundRead(fd, buf, at(i))).toBe(p.length);
        return buf;
      }));
      back.forEach((b, i) => expect(Buffer.from(b).equals(Buffer.from(parts[i]!))).toBe(true));
      // Past the end: fewer bytes, the count says how many.
      const end = at(47) + parts[47]!.length;
      const tail = new Uint8Array(8 * KiB);
      expect(await native!.backgroundRead(fd, tail, end - 1000)).toBe(1000);
      expect(await native!.backgroundRead(fd, tail, end + 4096)).toBe(0);
    } finally {
      closeSync(fd);
    }
    // A descriptor that is not open: rejected with its errno name, not thrown, not hung.
    await expect(native!.backgroundRead(1 << 20, new Uint8Array(16), 0)).rejects.toMatchObject({ code: 'EBADF' });
    await expect(native!.backgroundWrite(1 << 20, new Uint8Array(16), 0)).rejects.toMatchObject({ code: 'EBADF' });
    // Bad arguments: a TypeError at the call.
    expect(() => native!.backgroundRead(-1, new Uint8Array(1), 0)).toThrow(TypeError);
    expect(() => native!.backgroundWrite(0, 'text' as unknown as Uint8Array, 0)).toThrow(/Uint8Array/);
    expect(() => native!.backgroundRead(0, new Uint8Array(1), 1.5)).toThrow(/whole offset/);
  });

  it('a background sync writes the file back and syncs it, in order after the background writes before it; errors carry their errno', async () => {
    const file = join(dir, 'sync.bin');
    writeFileSync(file, Buffer.alloc(0));
    const fd = openSync(file, 'r+');
    try {
      // 40 MiB: more than one slice of the writeback (16 MiB).
      const parts = Array.from({ length: 40 }, (_, i) => pattern(MiB, i + 20));
      const writes = parts.map((p, i) => native!.backgroundWrite(fd, p, i * MiB));
      const synced = native!.backgroundSync(fd);
      let written = 0;
      for (const w of writes) void w.then(() => written++);
      await synced;
      // One thread, in order: every write queued before the sync is done when it resolves.
      expect(written).toBe(40);
      const back = readFileSync(file);
      expect(back.length).toBe(40 * MiB);
      parts.forEach((p, i) => expect(back.subarray(i * MiB, (i + 1) * MiB).equals(Buffer.from(p))).toBe(true));
      // A file with nothing to write back, and an empty one.
      await native!.backgroundSync(fd);
    } finally {
      closeSync(fd);
    }
    const empty = join(dir, 'sync-empty.bin');
    writeFileSync(empty, Buffer.alloc(0));
    const efd = openSync(empty, 'r+');
    try {
      await native!.backgroundSync(efd);
    } finally {
      closeSync(efd);
    }
    await expect(native!.backgroundSync(1 << 20)).rejects.toMatchObject({ code: 'EBADF' });
    expect(() => native!.backgroundSync(-1)).toThrow(TypeError);
    expect(() => native!.backgroundSync('3' as unknown as number)).toThrow(/descriptor/);
  });

  it('worker threads terminated with reads, writes and a sync in flight: no crash, and the helper goes on serving the threads left', () => {
    // Without waiting for the ending environment's jobs, the helper wrote into freed buffers; without
    // pinning the library, it ran in code Node unloaded with the last worker that had loaded it.
    const addonPath = fileURLToPath(new URL('../../../native/fileio/build/Release/offload_fileio.node', import.meta.url));
    const child = spawnSync(process.execPath, [fileURLToPath(new URL('./bg-terminate.cjs', import.meta.url)), addonPath, join(dir, 'terminate.bin'), '20'], { encoding: 'utf8', timeout: 120_000 });
    expect({ status: child.status, signal: child.signal, stdout: child.stdout.trim() }).toEqual({ status: 0, signal: null, stdout: `done ${MiB}` });
  });

  it.skipIf(process.platform !== 'linux')('runs on one thread at nice 19 (Linux), beside a thread pool left at the process\'s priority', async () => {
    const file = join(dir, 'nice.bin');
    writeFileSync(file, Buffer.alloc(4096, 7));
    const fd = openSync(file, 'r');
    try {
      await native!.backgroundRead(fd, new Uint8Array(4096), 0);
    } finally {
      closeSync(fd);
    }
    // /proc/self/task/TID/stat: the fields after "(comm) "; the nice value is field 19.
    const nice = readdirSync('/proc/self/task').map((t) => Number(readFileSync(`/proc/self/task/${t}/stat`, 'utf8').split(') ')[1]!.split(' ')[16]));
    expect(nice.filter((n) => n === 19).length).toBe(1);
    expect(nice.filter((n) => n !== 19).length).toBeGreaterThanOrEqual(2); // the main thread and the rest
  });
});

/** The real helper wrapped so that it records what goes through it (or a fallback when it is not built). */
function recording() {
  const calls: { op: 'read' | 'write' | 'sync'; pos: number; length: number }[] = [];
  const fallbackRead = async (fd: number, buf: Uint8Array, pos: number) => {
    const { readSync } = await import('node:fs');
    return readSync(fd, buf, 0, buf.length, pos);
  };
  const fallbackWrite = async (fd: number, buf: Uint8Array, pos: number) => {
    const { writeSync } = await import('node:fs');
    for (let done = 0; done < buf.length;) done += writeSync(fd, buf, done, buf.length - done, pos + done);
  };
  setNativeBackgroundIO({
    backgroundRead: (fd, buf, pos) => {
      calls.push({ op: 'read', pos, length: buf.length });
      return native ? native.backgroundRead(fd, buf, pos) : fallbackRead(fd, buf, pos);
    },
    backgroundWrite: (fd, buf, pos) => {
      calls.push({ op: 'write', pos, length: buf.length });
      return native ? native.backgroundWrite(fd, buf, pos) : fallbackWrite(fd, buf, pos);
    },
    backgroundSync: (fd) => {
      calls.push({ op: 'sync', pos: 0, length: 0 });
      return native ? native.backgroundSync(fd) : Promise.resolve(fdatasyncSync(fd));
    },
  });
  return calls;
}

describe('the engine\'s background option', () => {
  it('qcow2: a background write and read send their data (and nothing else) to the background thread; the image is the same as without', async () => {
    const fileBg = join(dir, 'bg.qcow2');
    const filePlain = join(dir, 'plain.qcow2');
    for (const f of [fileBg, filePlain]) await createImage(f, { size: 16 * MiB, clusterSize: 64 * KiB });
    const calls = recording();
    const bg = await openImage(fileBg, { readOnly: false });
    const plain = await openImage(filePlain, { readOnly: false });
    const data = pattern(MiB, 5);
    // Allocating (fresh clusters), then in place (the same clusters), then a read of both.
    for (const img of [bg, plain]) {
      const o = img === bg ? { background: true } : undefined;
      await img.write(3 * MiB, data, o);
      await img.write(3 * MiB + 64 * KiB, pattern(128 * KiB, 6), o);
    }
    const writes = calls.filter((c) => c.op === 'write');
    expect(writes.length).toBeGreaterThanOrEqual(2);
    // Only data: every background write lies in the clusters given to the guest's 1 MiB (no table or refcount block).
    expect(writes.reduce((n, c) => n + c.length, 0)).toBe(MiB + 128 * KiB);
    calls.length = 0;
    const got = await bg.read(3 * MiB, MiB, { background: true });
    expect(calls.filter((c) => c.op === 'read').reduce((n, c) => n + c.length, 0)).toBe(MiB);
    const into = new Uint8Array(MiB);
    await bg.readInto(into, 3 * MiB, { background: true });
    expect(Buffer.from(into).equals(Buffer.from(got))).toBe(true);
    expect(Buffer.from(got).equals(Buffer.from(await plain.read(3 * MiB, MiB)))).toBe(true);
    // Unallocated ranges read as zeros with no file read at all.
    calls.length = 0;
    expect((await bg.read(0, MiB, { background: true })).every((b) => b === 0)).toBe(true);
    expect(calls).toEqual([]);
    // Without the option, nothing goes there.
    await bg.write(8 * MiB, pattern(64 * KiB, 7));
    await bg.read(8 * MiB, 64 * KiB);
    expect(calls).toEqual([]);
    await bg.close();
    await plain.close();
    if (hasQemu) {
      expect(qemuCheckJson(fileBg).status).toBe(0);
      const a = await openImage(fileBg);
      const b = await openImage(filePlain);
      expect(Buffer.from(await a.read(3 * MiB, 2 * MiB)).equals(Buffer.from(await b.read(3 * MiB, 2 * MiB)))).toBe(true);
      await a.close();
      await b.close();
    }
  });

  it('raw: background reads and writes go there too', async () => {
    const file = join(dir, 'bg.raw');
    writeFileSync(file, Buffer.alloc(4 * MiB));
    const calls = recording();
    const img = await openImage(file, { readOnly: false, format: 'raw' });
    await img.write(MiB, pattern(256 * KiB, 9), { background: true });
    const back = await img.read(MiB, 256 * KiB, { background: true });
    expect(Buffer.from(back).equals(Buffer.from(pattern(256 * KiB, 9)))).toBe(true);
    expect(calls.map((c) => `${c.op} ${c.pos} ${c.length}`)).toEqual([`write ${MiB} ${256 * KiB}`, `read ${MiB} ${256 * KiB}`]);
    await img.close();
  });

  it('a volume\'s device (BlockDevice) passes the hint on: read, readInto and write; FUA writes and guest I/O are not background', async () => {
    const file = join(dir, 'device.qcow2');
    await createImage(file, { size: 4 * MiB, clusterSize: 64 * KiB });
    const calls = recording();
    const img = await openImage(file, { readOnly: false });
    const dev = await imageDevice(img, { mode: 'rw' });
    await dev.write(0, pattern(MiB, 12), { background: true });
    await dev.read(0, 256 * KiB, { background: true });
    await dev.readInto!(new Uint8Array(128 * KiB), 512 * KiB, { background: true });
    expect(calls.map((c) => `${c.op} ${c.length}`)).toEqual([`write ${MiB}`, `read ${256 * KiB}`, `read ${128 * KiB}`]);
    calls.length = 0;
    await dev.write(2 * MiB, pattern(64 * KiB, 13));
    await dev.writeFua!(2 * MiB, pattern(64 * KiB, 14));
    await dev.read(0, MiB);
    expect(calls).toEqual([]);
    await dev.close();
    await img.close();
  });

  it('a bulk flush (background) syncs on the background thread, after the held metadata is written: qcow2, raw and a volume\'s device; a plain flush and FUA writes do not', async () => {
    const calls = recording();
    const file = join(dir, 'flush.qcow2');
    await createImage(file, { size: 8 * MiB, clusterSize: 64 * KiB });
    const img = await openImage(file, { readOnly: false });
    const dev = await imageDevice(img, { mode: 'rw' });
    // A mirror's target: its tables held in memory until the flush.
    await dev.deferMetadata!(true);
    await dev.write(MiB, pattern(2 * MiB, 15), { background: true });
    calls.length = 0;
    await dev.flush({ background: true });
    expect(calls.map((c) => c.op)).toEqual(['sync']);
    // What the flush made durable is in the file: another open of it sees the data.
    const other = await openImage(file);
    expect(Buffer.from(await other.read(MiB, 2 * MiB)).equals(Buffer.from(pattern(2 * MiB, 15)))).toBe(true);
    await other.close();
    calls.length = 0;
    await dev.write(0, pattern(64 * KiB, 16));
    await dev.flush();
    await dev.writeFua!(0, pattern(64 * KiB, 17));
    await img.flush();
    expect(calls).toEqual([]);
    await img.flush({ background: true });
    expect(calls.map((c) => c.op)).toEqual(['sync']);
    await dev.close();
    await img.close();
    if (hasQemu) expect(qemuCheckJson(file).status).toBe(0);

    const rawFile = join(dir, 'flush.raw');
    writeFileSync(rawFile, Buffer.alloc(2 * MiB));
    const raw = await openImage(rawFile, { readOnly: false, format: 'raw' });
    calls.length = 0;
    await raw.write(0, pattern(64 * KiB, 18));
    await raw.flush();
    expect(calls).toEqual([]);
    await raw.flush({ background: true });
    expect(calls.map((c) => c.op)).toEqual(['sync']);
    await raw.close();
  });

  it('closing a file waits for its background reads, writes and syncs (their bare descriptor must not be reused under them)', async () => {
    const path = join(dir, 'close.bin');
    writeFileSync(path, Buffer.alloc(64 * KiB));
    const events: string[] = [];
    /** The helper's I/O with one kind held "in the kernel" until released; `op` started on a file, then its close. */
    const closeWaitsFor = async (held: 'write' | 'sync', op: (f: ImageFile) => Promise<void>) => {
      let release!: () => void;
      const gate = new Promise<void>((r) => (release = r));
      const hold = async (what: string, io: () => void) => {
        await gate;
        io();
        events.push(what);
      };
      setNativeBackgroundIO({
        backgroundRead: async (fd, buf, pos) => readSync(fd, buf, 0, buf.length, pos),
        backgroundWrite: async (fd, buf, pos) => (held === 'write' ? hold('written', () => writeSync(fd, buf, 0, buf.length, pos)) : void writeSync(fd, buf, 0, buf.length, pos)),
        backgroundSync: async (fd) => (held === 'sync' ? hold('synced', () => fdatasyncSync(fd)) : fdatasyncSync(fd)),
      });
      events.length = 0;
      const f = await ImageFile.open(path, false);
      const running = op(f);
      const closed = f.close().then(() => events.push('closed'));
      await new Promise((r) => setTimeout(r, 30));
      expect(events).toEqual([]);
      release();
      await Promise.all([running, closed]);
      expect(events).toEqual([held === 'write' ? 'written' : 'synced', 'closed']);
    };
    await closeWaitsFor('write', (f) => f.write(4096, new Uint8Array(4096).fill(0x5a), false, true));
    expect(readFileSync(path).subarray(4096, 8192).every((b) => b === 0x5a)).toBe(true);
    await closeWaitsFor('sync', (f) => f.sync(true));
  });

  it('without the helper\'s background I/O, the option is only a hint: the same data, through the thread pool', async () => {
    setNativeBackgroundIO(null);
    const file = join(dir, 'none.qcow2');
    await createImage(file, { size: 4 * MiB, clusterSize: 64 * KiB });
    const img = await openImage(file, { readOnly: false });
    await img.write(0, pattern(512 * KiB, 11), { background: true });
    expect(Buffer.from(await img.read(0, 512 * KiB, { background: true })).equals(Buffer.from(pattern(512 * KiB, 11)))).toBe(true);
    await img.flush({ background: true });
    await img.close();
  });
});
