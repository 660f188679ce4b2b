/**
 * The native qcow2 engine — public API. Import this file only (never engine/ or format/ directly).
 *
 *   createImage(path, { format?: 'qcow2'|'raw', size?, clusterSize?, compat?: '0.10'|'1.1',
 *                       lazyRefcounts?, refcountBits?, backingFile?, backingFormat?, overwrite? })
 *     → Promise<void>. Writes QEMU's fresh layout (header, refcount table, refcount block, L1),
 *       so `qemu-img info/check` see exactly what `qemu-img create` would make.
 *
 *   openImage(path, { readOnly = true, format?, allowedRoot?, noBacking?, maxChainDepth?, cacheBytes? })
 *     → Promise<Image>, with its backing chain open read-only (qcow2 or raw; relative names resolve
 *       against the image's folder; a loop is Corrupt; leaving `allowedRoot` is Unsupported).
 *       A dirty (lazy-refcounts) image opened read-write has its refcounts rebuilt first.
 *
 *   Image:
 *     path, format, readOnly, virtualSize, clusterSize, header (HeaderInfo, qcow2 only),
 *     backing (Image | undefined), chain (ChainEntry[], top first)
 *     read(off, len) → Uint8Array            write(off, data)
 *     writeZeroes(off, len)                  discard(off, len)
 *     blockStatus(off?, len?) / map() → BlockStatus[] {start,length,depth,present,zero,data,compressed,offset?,filename?}
 *       ranges merged like `qemu-img map --output=json` (depth 0 = this image).
 *     resize(newSize)  flush()  close()  fileSize()
 *     snapshots.list() / create(name) / apply(nameOrId) / delete(nameOrId)
 *     check({ repair?: 'leaks'|'all' }) → CheckResult (qemu-img check's counters and messages)
 *
 *   probeFormat(path) → 'qcow2' | 'raw'
 *
 * Errors are the core's typed errors: Corrupt (damaged image), Unsupported (a feature we refuse:
 * encryption, external data file, unknown incompatible bits, zstd), NotFound, PermissionDenied,
 * InvalidArgument / OutOfRange (bad offsets and sizes), FailedPrecondition (write to a read-only image).
 * Many async readers and writers may use one open Image at once.
 */
export type {
  ImageFormat, CreateOptions, OpenOptions, HeaderInfo, HeaderExtensionInfo, ChainEntry, BlockStatus,
  SnapshotInfo, CheckResult, CheckOptions, SnapshotOps, Image,
} from './engine/types.js';
export { createImage } from './engine/create.js';
export { openImage, probeFormat } from './engine/open.js';
