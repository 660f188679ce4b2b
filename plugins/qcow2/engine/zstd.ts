/**
 * zstd clusters (compression type 1), as QEMU's qcow2-threads.c writes and reads them: one
 * cluster is one or more zstd frames; its L2 entry records the compressed length only in 512-byte
 * sectors, so the bytes read for it may run on into the next compressed cluster. QEMU decodes
 * frames with the streaming API until the cluster is full; here each frame's end is found from
 * its block headers (RFC 8878 §3.1) and the frame alone is handed to the decoder, zstd's own C
 * compiled to WebAssembly (@bokuweb/zstd-wasm: Node 20 has no zstd in node:zlib).
 */
import { createRequire } from 'node:module';
import { Corrupt } from '../../../core/index.js';

type ZstdWasm = typeof import('@bokuweb/zstd-wasm');

// Loaded (and its module compiled) on the first zstd cluster: most images have none.
let loading: Promise<ZstdWasm> | undefined;
function load(): Promise<ZstdWasm> {
  return (loading ??= (async () => {
    const z = createRequire(import.meta.url)('@bokuweb/zstd-wasm') as ZstdWasm;
    await z.init();
    return z;
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
    let part: Uint8Array;
    try {
      part = z.decompress(data.subarray(f.start, f.end), { defaultHeapSize: room });
    } catch (e) {
      throw new Corrupt(`${where}: zstd cluster data does not decode (${(e as Error).message})`, { cause: e });
    }
    if (part.length > room) throw new Corrupt(`${where}: zstd cluster decodes to more than a cluster`);
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
