/**
 * The optional native helper (native/fileio, built by `npm run build:native`, part of
 * `npm install`): lseek SEEK_DATA/SEEK_HOLE, which Node does not expose (seek-data.ts), a
 * pipelined file-to-file copy (file.ts `copyIn`) and a batch of writes with an fdatasync in one
 * thread-pool round trip (file.ts `writeBatch`, `batch`), and reads and writes on low-priority
 * threads of its own for bulk copies (file.ts, `background`). Without it the engine still works: raw
 * images are scanned for holes, copies go through Node's thread pool, a batch's writes and its
 * fdatasync are made one at a time, and background I/O is ordinary I/O.
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export interface CopyRangesOptions {
  /** Zero detection in bytes (a power of two, 512 .. 2 MiB); 0 writes everything. */
  block: number;
  /** Sequential allocation from this host offset (qcow2 targets); see native/fileio/copy.c. */
  alloc?: number;
  /**
   * With `alloc`: 8 bytes per block of the ops (in op order) that receive each block's entry,
   * big-endian: its host offset with `entryHigh` in the high 32 bits, or 0 if left out.
   */
  entries?: Uint8Array;
  entryHigh?: number;
  /**
   * No write once this host's clock (ms since the epoch) reaches until[0], read before each piece
   * (its owner may move it on meanwhile): then rejected with code ETIMEDOUT. Only where the
   * helper says `copyRangesUntil`.
   */
  until?: Float64Array;
}

export interface NativeAddon {
  /** The offset lseek(fd, offset, whence) returns, -1 for ENXIO; throws (with `code`) on other errors. */
  seek(fd: number, offset: number, whence: 0 | 1): number;
  /**
   * Copy [srcPos, dstPos, length] triples from one descriptor to another off the main thread;
   * with `alloc`, resolves to [guest, host] pairs of the blocks written. Rejects with `code`.
   */
  copyRanges(srcFd: number, dstFd: number, ops: Float64Array, opts: CopyRangesOptions): Promise<Float64Array>;
  /** True where copyRanges honours opts.until (absent from a helper built before it). */
  copyRangesUntil?: boolean;
  /**
   * pwrite buffers[i] at positions[i] in order, then fdatasync if `sync`, in one work item of the
   * thread pool (native/fileio/writes.c). Rejects at the first failure with `code` and `done`
   * (the writes made whole before it; none after it is made, nor the fdatasync). Absent from a
   * helper built before it existed: callers then write one at a time.
   */
  writeBatch?(fd: number, positions: Float64Array, buffers: Uint8Array[], sync: boolean): Promise<void>;
  /**
   * pread until `buffer` is full or EOF, on the helper's own low-priority thread
   * (native/fileio/bgio.c); resolves to the bytes read. Absent from an older build.
   */
  backgroundRead?(fd: number, buffer: Uint8Array, position: number): Promise<number>;
  /** pwrite all of `buffer` on the helper's low-priority thread; rejects with `code`. */
  backgroundWrite?(fd: number, buffer: Uint8Array, position: number): Promise<void>;
  /**
   * Write the file back a slice at a time (sync_file_range, Linux), then fdatasync, on the
   * helper's low-priority thread; rejects with `code`.
   */
  backgroundSync?(fd: number): Promise<void>;
}

const ADDON = join('native', 'fileio', 'build', 'Release', 'offload_fileio.node');

let addon: NativeAddon | null | undefined; // undefined: not loaded yet; null: unavailable

/**
 * The addon, from the package root: the first folder above this module that holds package.json
 * (this file runs from plugins/qcow2/engine/ under tsx/vitest, from dist/plugins/qcow2/engine/
 * when built and from dist/cli/ when bundled; dist/ has no package.json).
 */
export function nativeAddon(): NativeAddon | null {
  if (addon !== undefined) return addon;
  addon = null;
  for (let dir = dirname(fileURLToPath(import.meta.url)); ; ) {
    if (existsSync(join(dir, 'package.json'))) {
      const path = join(dir, ADDON);
      if (existsSync(path)) {
        try {
          const mod = createRequire(import.meta.url)(path) as Partial<NativeAddon>;
          if (typeof mod.seek === 'function' && typeof mod.copyRanges === 'function') addon = mod as NativeAddon;
        } catch {
          // built for another Node ABI or platform: behave as if it were not built
        }
      }
      break;
    }
    const up = dirname(dir);
    if (up === dir) break;
    dir = up;
  }
  return addon;
}
