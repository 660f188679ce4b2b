/**
 * zstd clusters (compression type 1), as QEMU's qcow2-threads.c writes and reads them: one
 * cluster is one or more zstd frames; its L2 entry records the compressed length only in 512-byte
 * sectors, so the bytes read for it may run on into the next compressed cluster. QEMU decodes
 * frames with the streaming API until the cluster is full; here each frame's end is found from
 * its block headers (RFC 8878 §3.1) and the frame alone is handed to the decoder, zstd's own C
 * compiled to WebAssembly (the build @bokuweb/zstd-wasm ships: Node 20 has no zstd in node:zlib).
 */
import { readFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { Corrupt, OffloadError } from '../../../core/index.js';

/**
 * zstd's C as the package builds it (its zstd.wasm), in an instance of our own: the package's own
 * wrapper keeps one instance per process, and a second `init()` by anything else in the process
 * swaps it under the wrappers (compression then writes garbage that qemu-img cannot read). The
 * module's imports and exports are the package's emscripten build's (pinned by the lockfile:
 * `^0.0.27` takes no other version); the tests fail on another layout.
 */
/** What of WebAssembly this file uses (the project's TypeScript lib has no WebAssembly types). */
interface WasmMemory { readonly buffer: ArrayBuffer; grow(pages: number): number }
const wasm = (globalThis as unknown as {
  WebAssembly: { instantiate(bytes: Uint8Array, imports: object): Promise<{ instance: { exports: unknown } }> };
}).WebAssembly;

interface ZstdExports {
  f: WasmMemory;
  g(): void;
  h(code: number): number; // ZSTD_isError
  i(size: number): number; // ZSTD_compressBound
  m(dst: number, dstCapacity: number, src: number, srcSize: number, level: number): number; // ZSTD_compress
  r(dst: number, dstCapacity: number, src: number, srcSize: number): number; // ZSTD_decompress
  s(size: number): number; // malloc
  t(ptr: number): void; // free
}

const HEAP_MAX = 2 ** 31;

class Zstd {
  constructor(private readonly x: ZstdExports) {}

  /** Run `fn` with `data` copied into the instance and `outSize` bytes for its answer; frees both. */
  private with<T>(data: Uint8Array, outSize: number, fn: (src: number, dst: number) => T): T {
    const src = this.x.s(Math.max(1, data.length));
    const dst = this.x.s(Math.max(1, outSize));
    if (src === 0 || dst === 0) {
      if (src) this.x.t(src);
      if (dst) this.x.t(dst);
      throw new OffloadError('Internal', `zstd: out of WebAssembly memory for ${data.length + outSize} bytes`);
    }
    try {
      new Uint8Array(this.x.f.buffer).set(data, src);
      return fn(src, dst);
    } finally {
      this.x.t(src);
      this.x.t(dst);
    }
  }

  private failed(code: number): boolean {
    return this.x.h(code) !== 0;
  }

  compress(data: Uint8Array, level: number): Uint8Array {
    return this.with(data, this.x.i(data.length), (src, dst) => {
      const n = this.x.m(dst, this.x.i(data.length), src, data.length, level);
      if (this.failed(n)) throw new OffloadError('Internal', `zstd: compression failed (code ${n | 0})`);
      return new Uint8Array(this.x.f.buffer, dst, n >>> 0).slice();
    });
  }

  /** One or more whole frames into at most `capacity` bytes; undefined when zstd refuses them. */
  decompress(frames: Uint8Array, capacity: number): Uint8Array | undefined {
    return this.with(frames, capacity, (src, dst) => {
      const n = this.x.r(dst, capacity, src, frames.length);
      return this.failed(n) ? undefined : new Uint8Array(this.x.f.buffer, dst, n >>> 0).slice();
    });
  }
}

// Loaded (and compiled) on the first zstd cluster: most images have none.
let loading: Promise<Zstd> | undefined;
function load(): Promise<Zstd> {
  return (loading ??= (async () => {
    const main = createRequire(import.meta.url).resolve('@bokuweb/zstd-wasm');
    const bytes = await readFile(join(dirname(main), 'zstd.wasm'));
    let memory: WasmMemory | undefined;
    const fail = (what: string) => () => { throw new OffloadError('Internal', `zstd: ${what}`); };
    const { instance } = await wasm.instantiate(bytes, {
      a: {
        a: fail('exit called'), // proc_exit
        b: () => undefined, // emscripten_runtime_keepalive_clear
        c: fail('aborted'), // abort
        d: () => 0, // setitimer: not used by the codec
        e: (requested: number) => { // emscripten_resize_heap
          const m = memory!;
          const want = requested >>> 0;
          if (want > HEAP_MAX) return 0;
          try {
            m.grow(Math.ceil((want - m.buffer.byteLength) / 65536));
            return 1;
          } catch {
            return 0;
          }
        },
      },
    });
    const x = instance.exports as unknown as ZstdExports;
    memory = x.f;
    x.g();
    return new Zstd(x);
  })());
}

const FRAME_MAGIC = 0xfd2fb528;
/** Skippable frames: magic 0x184D2A50–0x184D2A5F, a 4-byte size, that many bytes. */
const isSkippable = (magic: number) => (magic & 0xfffffff0) === 0x184d2a50;

interface Frame { start: number; end: number; contentSize: number | undefined; skippable: boolean }

/** The frame that starts at `at`: where it ends and, when its header says, how much it decodes to. */
function frameAt(data: Uint8Array, at: number, where: string): Frame {
  const bad = (why: string) => new Corrupt(`${where}: zstd cluster data is damaged (${why} at byte ${at})`);
  const dv = new DataView(data.buffer, data.byteOffset, data.byteLength);
  if (data.length - at < 4) throw bad('truncated frame');
  const magic = dv.getUint32(at, true);
  if (isSkippable(magic)) {
    if (data.length - at < 8) throw bad('truncated skippable frame');
    const end = at + 8 + dv.getUint32(at + 4, true);
    if (end > data.length) throw bad('truncated skippable frame');
    return { start: at, end, contentSize: 0, skippable: true };
  }
  if (magic !== FRAME_MAGIC) throw bad(`no frame magic (0x${magic.toString(16)})`);
  let p = at + 4;
  if (p >= data.length) throw bad('truncated frame header');
  const fhd = data[p++]!;
  if (fhd & 0x08) throw bad('reserved bit set in the frame header');
  const fcsFlag = fhd >> 6;
  const singleSegment = (fhd & 0x20) !== 0;
  const checksum = (fhd & 0x04) !== 0;
  const dictBytes = [0, 1, 2, 4][fhd & 0x03]!;
  const fcsBytes = [singleSegment ? 1 : 0, 2, 4, 8][fcsFlag]!;
  p += (singleSegment ? 0 : 1) + dictBytes;
  if (p + fcsBytes > data.length) throw bad('truncated frame header');
  let contentSize: number | undefined;
  if (fcsBytes === 1) contentSize = data[p]!;
  else if (fcsBytes === 2) contentSize = dv.getUint16(p, true) + 256;
  else if (fcsBytes === 4) contentSize = dv.getUint32(p, true);
  else if (fcsBytes === 8) contentSize = dv.getUint32(p, true) + dv.getUint32(p + 4, true) * 2 ** 32;
  p += fcsBytes;
  for (;;) {
    if (p + 3 > data.length) throw bad('truncated block header');
    const bh = data[p]! | (data[p + 1]! << 8) | (data[p + 2]! << 16);
    const type = (bh >> 1) & 3;
    if (type === 3) throw bad('reserved block type');
    p += 3 + (type === 1 ? 1 : bh >>> 3);
    if (p > data.length) throw bad('truncated block');
    if (bh & 1) break;
  }
  if (checksum) p += 4;
  if (p > data.length) throw bad('truncated checksum');
  return { start: at, end: p, contentSize, skippable: false };
}

/** Decode one zstd cluster: frames, in order, until `clusterSize` bytes are out; more is damage. */
export async function zstdDecompressCluster(data: Uint8Array, clusterSize: number, where: string): Promise<Uint8Array> {
  const z = await load();
  const out = new Uint8Array(clusterSize);
  let filled = 0;
  let at = 0;
  while (filled < clusterSize) {
    const f = frameAt(data, at, where);
    at = f.end;
    if (f.skippable) continue;
    const room = clusterSize - filled;
    if (f.contentSize !== undefined && f.contentSize > room) {
      throw new Corrupt(`${where}: zstd cluster data is damaged (a frame of ${f.contentSize} bytes where ${room} are left of the cluster)`);
    }
    const part = z.decompress(data.subarray(f.start, f.end), room);
    if (!part) throw new Corrupt(`${where}: zstd cluster data does not decode (or decodes to more than the cluster)`);
    out.set(part, filled);
    filled += part.length;
  }
  return out;
}

/**
 * One whole cluster as a zstd frame at zstd's default level, as QEMU writes it; undefined when
 * that is not smaller than the cluster by a byte at least (QEMU then writes it as it is).
 */
export async function zstdCompressCluster(data: Uint8Array): Promise<Uint8Array | undefined> {
  const z = await load();
  const out = z.compress(data, 3);
  return out.length < data.length ? out : undefined;
}
