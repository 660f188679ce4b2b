import { createRequire } from 'node:module';
import type * as Zlib from 'node:zlib';
import { Corrupt } from '../../../core/index.js';
import { COMPRESSION_ZSTD } from '../format/constants.js';
import { zstdCompressCluster, zstdDecompressCluster } from './zstd.js';

/** Decode one compressed cluster of an image of compression type `type` into exactly clusterSize bytes. */
export function decompressCluster(type: number, data: Uint8Array, clusterSize: number, where: string): Uint8Array | Promise<Uint8Array> {
  return type === COMPRESSION_ZSTD ? zstdDecompressCluster(data, clusterSize, where) : inflateCluster(data, clusterSize, where);
}

/** Code one whole cluster for an image of compression type `type`; undefined when that saves nothing. */
export function compressCluster(type: number, data: Uint8Array): Promise<Uint8Array | undefined> {
  return type === COMPRESSION_ZSTD ? zstdCompressCluster(data) : deflateCluster(data);
}

// node:zlib is loaded on the first compressed cluster, not when the engine is imported: most
// images have none, and loading it is about a millisecond of every `offload img` start.
let zlib: typeof Zlib | undefined;
const load = (): typeof Zlib => (zlib ??= createRequire(import.meta.url)('node:zlib') as typeof Zlib);

/** Inflate one compressed cluster (raw deflate, no zlib header) into exactly clusterSize bytes. */
function inflateCluster(data: Uint8Array, clusterSize: number, where: string): Uint8Array {
  const z = load();
  let out: Buffer;
  try {
    out = z.inflateRawSync(data, { finishFlush: z.constants.Z_SYNC_FLUSH, maxOutputLength: clusterSize });
  } catch (e) {
    // Also when the stream holds more than a cluster (maxOutputLength): never inflate unbounded.
    throw new Corrupt(`${where}: compressed cluster does not inflate (${(e as Error).message})`, { cause: e });
  }
  if (out.length < clusterSize) throw new Corrupt(`${where}: compressed cluster inflates to ${out.length} bytes, expected ${clusterSize}`);
  return new Uint8Array(out.buffer, out.byteOffset, clusterSize);
}

/**
 * Deflate one whole cluster as QEMU's qcow2 driver does (raw deflate, a 4 KiB window, memLevel
 * 9), on the thread pool; undefined when the result would not be smaller than a cluster by a
 * byte at least (QEMU then writes the cluster as it is).
 */
function deflateCluster(data: Uint8Array): Promise<Buffer | undefined> {
  const z = load();
  return new Promise((resolve, reject) => {
    z.deflateRaw(data, { windowBits: 12, memLevel: 9, level: z.constants.Z_DEFAULT_COMPRESSION }, (err, out) => {
      if (err) reject(err);
      else resolve(out.length < data.length ? out : undefined);
    });
  });
}
