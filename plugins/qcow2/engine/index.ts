/**
 * The native qcow2 engine — its public module. Everything outside engine/ (the chain jobs, the
 * pool, the CLI, the appliance mocks through plugins/qcow2/index.ts) imports this file only.
 * What each call guarantees is documented on the `Image` interface (types.ts); plugins/qcow2/README.md
 * explains the engine's design (write ordering, deferred metadata, the block-job surface).
 *
 *   createImage(path, opts)  — QEMU's fresh layout, as `qemu-img create` makes it.
 *   openImage(path, opts)    — an Image with its backing chain open read-only (qcow2 or raw).
 *   probeFormat(path)        — 'qcow2' | 'raw'.
 *   ioBuffer(n), uninitialized(n) — buffers for reads through the engine (zeroed or not), placed
 *                            for the fastest copies.
 *   imageDevice(image, opts) — a core BlockDevice over an image, with the copier's native fast path.
 *   copyImageContent(src, dst, progress?) — `convert`'s copy (the core copier over two image devices).
 *
 * Errors are the core's typed errors: Corrupt (damaged image), Unsupported (a feature we refuse:
 * encryption, external data file, unknown incompatible bits or compression types), NotFound, PermissionDenied,
 * InvalidArgument / OutOfRange (bad offsets and sizes), FailedPrecondition (write to a read-only
 * image). Many async readers and writers may use one open Image at once.
 */
export type {
  ImageFormat, CreateOptions, OpenOptions, HeaderInfo, HeaderExtensionInfo, ChainEntry, BlockStatus,
  SnapshotInfo, CheckResult, CheckOptions, SnapshotOps, Image, Allocation, DirtyMap, NewBacking, FlushOptions, CloseOptions, WriteOptions,
  BitmapInfo, BitmapOps, ByteRange,
} from './types.js';
export { createImage } from './create.js';
export { openImage, probeFormat } from './open.js';
export { ioBuffer, uninitialized } from '../format/bytes.js';
export { copyImageContent, type CopyProgress } from './copy-image.js';
export { imageDevice, type ImageAccess, type ImageDeviceOptions } from './image-device.js';
export { fileError } from './file.js';
