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
 *     check({ repair?: 'leaks'|'all' }) → CheckResult (qemu-img check's counters and messages; after a
 *       repair that fixed something, the counts of a fresh check with the *Fixed counters kept, as
 *       qemu-img prints them; `error` set where qemu-img says "Check failed" and exits 1)
 *
 *   Semantics worth knowing: discard drops whole clusters only (v3: they read as zeros; v2: as the
 *   backing); writeZeroes uses the zero flag on v3; snapshot create/apply/delete switch the header
 *   once, so a crash at any point leaves either the old or the new state, never a corruption.
 *   A raw image has no snapshots and no check (Unsupported); its map reports the file's allocated
 *   extents as data, as qemu-img does, through the optional native/fileio addon (lseek SEEK_DATA);
 *   without it, all-zero 4 KiB blocks of a sparse file count as holes.
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
