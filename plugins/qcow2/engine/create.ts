import { dirname, isAbsolute, join, resolve } from 'node:path';
import { InvalidArgument } from '../../../core/index.js';
import { alignUp, setU64, view } from '../format/bytes.js';
import { COMPAT_LAZY_REFCOUNTS, COMPRESSION_ZLIB, COMPRESSION_ZSTD, INCOMPAT_COMPRESSION, MAX_BACKING_NAME, MAX_L1_BYTES } from '../format/constants.js';
import { encodeHeader, setBackingFormat, type Header } from '../format/header.js';
import { entriesPerBlock, setRefcount } from '../format/refcount-block.js';
import { ImageFile } from './file.js';
import { openImage, probeFormat } from './open.js';
import type { CreateOptions } from './types.js';

const REFCOUNT_BITS = [1, 2, 4, 8, 16, 32, 64];

/**
 * Create an image. qcow2 gets QEMU's fresh layout: header in cluster 0, a one-cluster refcount
 * table in cluster 1, its first refcount block in cluster 2, the L1 table from cluster 3 (the
 * file ends right after the L1 entries, unpadded, as QEMU leaves it).
 */
export async function createImage(path: string, opts: CreateOptions = {}): Promise<void> {
  const format = opts.format ?? 'qcow2';
  const abs = resolve(path);
  let size = opts.size;
  if (size !== undefined && (!Number.isSafeInteger(size) || size < 0)) {
    throw new InvalidArgument(`create ${path}: invalid size ${size}`, { ref: path, hint: 'give the size in bytes (a non-negative integer)' });
  }
  if (format === 'raw') {
    if (opts.backingFile !== undefined) throw new InvalidArgument(`create ${path}: raw images cannot have a backing file`, { ref: path });
    if (size === undefined) throw new InvalidArgument(`create ${path}: size is required`, { ref: path });
    const f = await ImageFile.create(abs, opts.overwrite ?? false);
    // Like QEMU: a disk is whole 512-byte sectors.
    try { await f.truncate(alignUp(size, 512)); } finally { await f.close(); }
    return;
  }
  if (format !== 'qcow2') throw new InvalidArgument(`create ${path}: unknown format ${JSON.stringify(format)}`, { ref: path, hint: 'use qcow2 or raw' });

  const clusterSize = opts.clusterSize ?? 65536;
  const clusterBits = Math.log2(clusterSize);
  if (!Number.isInteger(clusterBits) || clusterBits < 9 || clusterBits > 21) {
    throw new InvalidArgument(`create ${path}: cluster size ${clusterSize} must be a power of two between 512 and 2M`, { ref: path });
  }
  const compat = opts.compat ?? '1.1';
  if (compat !== '0.10' && compat !== '1.1') throw new InvalidArgument(`create ${path}: compat must be 0.10 or 1.1`, { ref: path });
  const version = compat === '0.10' ? 2 : 3;
  const refcountBits = opts.refcountBits ?? 16;
  if (!REFCOUNT_BITS.includes(refcountBits)) {
    throw new InvalidArgument(`create ${path}: refcount_bits must be a power of two between 1 and 64`, { ref: path });
  }
  if (version === 2 && refcountBits !== 16) {
    throw new InvalidArgument(`create ${path}: compat 0.10 requires refcount_bits=16`, { ref: path, hint: 'use compat=1.1' });
  }
  if (version === 2 && opts.lazyRefcounts) {
    throw new InvalidArgument(`create ${path}: lazy refcounts require compat=1.1`, { ref: path });
  }
  const compression = opts.compressionType ?? 'zlib';
  if (compression !== 'zlib' && compression !== 'zstd') throw new InvalidArgument(`create ${path}: compression type must be zlib or zstd`, { ref: path });
  if (version === 2 && compression !== 'zlib') {
    throw new InvalidArgument(`create ${path}: compression type ${compression} requires compat=1.1`, { ref: path, hint: 'v2 images compress with zlib only' });
  }

  let backingFormat = opts.backingFormat;
  if (opts.backingFile !== undefined) {
    if (opts.backingFile === '' || new TextEncoder().encode(opts.backingFile).length > MAX_BACKING_NAME) {
      throw new InvalidArgument(`create ${path}: backing file name must be 1–${MAX_BACKING_NAME} bytes`, { ref: path });
    }
    const full = isAbsolute(opts.backingFile) ? opts.backingFile : join(dirname(abs), opts.backingFile);
    if (backingFormat === undefined) backingFormat = await probeFormat(full);
    if (size === undefined) {
      const b = await openImage(full, { readOnly: true, format: backingFormat, noBacking: true });
      size = b.virtualSize;
      await b.close();
    }
  }
  if (size === undefined) throw new InvalidArgument(`create ${path}: size is required`, { ref: path });
  size = Math.ceil(size / 512) * 512;

  const cs = clusterSize;
  const l1Size = Math.ceil(size / (cs * (cs / 8)));
  if (l1Size * 8 > MAX_L1_BYTES) throw new InvalidArgument(`create ${path}: size ${size} too large for cluster size ${cs}`, { ref: path });
  const order = Math.log2(refcountBits);
  const l1Clusters = Math.ceil((l1Size * 8) / cs);
  // The simple layout needs one refcount block to cover the header, table, block and L1.
  const simple = entriesPerBlock(cs, order) >= 3 + l1Clusters;

  const h: Header = {
    version, backingFileOffset: 0, backingFileSize: 0, clusterBits, size: simple ? size : 0, cryptMethod: 0,
    l1Size: simple ? l1Size : 0, l1TableOffset: simple && l1Size > 0 ? 3 * cs : 0,
    refcountTableOffset: cs, refcountTableClusters: 1, nbSnapshots: 0, snapshotsOffset: 0,
    incompatibleFeatures: compression === 'zstd' ? INCOMPAT_COMPRESSION : 0n, compatibleFeatures: opts.lazyRefcounts ? COMPAT_LAZY_REFCOUNTS : 0n,
    autoclearFeatures: 0n, refcountOrder: order, headerLength: 0, compressionType: compression === 'zstd' ? COMPRESSION_ZSTD : COMPRESSION_ZLIB,
    unknownFields: new Uint8Array(0), extensions: [],
  };
  if (opts.backingFile !== undefined) {
    h.backingFile = opts.backingFile;
    setBackingFormat(h, backingFormat);
  }
  const used = simple ? 3 + l1Clusters : 3;
  const buf = new Uint8Array(3 * cs + (simple ? l1Size * 8 : 0));
  buf.set(encodeHeader(h), 0);
  setU64(view(buf), cs, 2 * cs);
  const block = buf.subarray(2 * cs, 3 * cs);
  for (let c = 0; c < used; c++) setRefcount(block, c, order, 1);

  const f = await ImageFile.create(abs, opts.overwrite ?? false);
  try {
    await f.write(0, buf);
    await f.sync();
  } finally {
    await f.close();
  }
  if (!simple && l1Size > 0) {
    // Too many L1 clusters for the first block: let the allocator grow the structures.
    const img = await openImage(abs, { readOnly: false, noBacking: true });
    try {
      await img.resize(size);
    } finally {
      await img.close();
    }
  }
}
