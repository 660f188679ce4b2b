import { inflateRawSync, constants } from 'node:zlib';
import { Corrupt } from '../../../core/index.js';

/** Inflate one compressed cluster (raw deflate, no zlib header) into exactly clusterSize bytes. */
export function inflateCluster(data: Uint8Array, clusterSize: number, where: string): Uint8Array {
  let out: Buffer;
  try {
    out = inflateRawSync(data, { finishFlush: constants.Z_SYNC_FLUSH, maxOutputLength: clusterSize });
  } catch (e) {
    // Also when the stream holds more than a cluster (maxOutputLength): never inflate unbounded.
    throw new Corrupt(`${where}: compressed cluster does not inflate (${(e as Error).message})`, { cause: e });
  }
  if (out.length < clusterSize) throw new Corrupt(`${where}: compressed cluster inflates to ${out.length} bytes, expected ${clusterSize}`);
  return new Uint8Array(out.buffer, out.byteOffset, clusterSize);
}
