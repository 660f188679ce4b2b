import { createRequire } from 'node:module';
import type * as Zlib from 'node:zlib';
import { Corrupt } from '../../../core/index.js';

// node:zlib is loaded on the first compressed cluster, not when the engine is imported: most
// images have none, and loading it is about a millisecond of every `offload img` start.
let zlib: typeof Zlib | undefined;

/** Inflate one compressed cluster (raw deflate, no zlib header) into exactly clusterSize bytes. */
export function inflateCluster(data: Uint8Array, clusterSize: number, where: string): Uint8Array {
  zlib ??= createRequire(import.meta.url)('node:zlib') as typeof Zlib;
  let out: Buffer;
  try {
    out = zlib.inflateRawSync(data, { finishFlush: zlib.constants.Z_SYNC_FLUSH, maxOutputLength: clusterSize });
  } catch (e) {
    // Also when the stream holds more than a cluster (maxOutputLength): never inflate unbounded.
    throw new Corrupt(`${where}: compressed cluster does not inflate (${(e as Error).message})`, { cause: e });
  }
  if (out.length < clusterSize) throw new Corrupt(`${where}: compressed cluster inflates to ${out.length} bytes, expected ${clusterSize}`);
  return new Uint8Array(out.buffer, out.byteOffset, clusterSize);
}
