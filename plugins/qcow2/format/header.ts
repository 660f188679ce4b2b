import { Corrupt, Unsupported } from '../../../core/index.js';
import { getU64, isSafeOffset, setU64, view } from './bytes.js';
import {
  EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_CRYPTO, EXT_DATA_FILE, EXT_END, EXT_FEATURE_TABLE, FEATURE_TABLE,
  INCOMPAT_COMPRESSION, INCOMPAT_DATA_FILE, INCOMPAT_EXTL2, INCOMPAT_KNOWN, MAX_BACKING_NAME, MAX_CLUSTER_BITS,
  MIN_CLUSTER_BITS, QCOW_MAGIC, V2_HEADER_LENGTH, V3_HEADER_LENGTH,
} from './constants.js';

export interface HeaderExtension {
  type: number;
  data: Uint8Array;
}

/** A decoded qcow2 header with everything needed to rewrite it faithfully. */
export interface Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  /** Header bytes past the fields we know (v3, header_length > 112): kept on rewrite. */
  unknownFields: Uint8Array;
  /** Every header extension except the end marker, in file order. */
  extensions: HeaderExtension[];
  backingFile?: string;
}

/** Bytes to read to decode any header: the largest cluster. The file may be shorter. */
export const HEADER_PROBE_BYTES = 1 << MAX_CLUSTER_BITS;

function corrupt(path: string, what: string): Corrupt {
  return new Corrupt(`${path}: not a valid qcow2 image: ${what}`, {
    ref: path,
    hint: 'the header is damaged; restore the image from a copy or check it with `qemu-img check`',
  });
}

/** True when the bytes start with the qcow2 magic. */
export function hasQcowMagic(buf: Uint8Array): boolean {
  return buf.length >= 4 && view(buf).getUint32(0) === QCOW_MAGIC;
}

/**
 * Decode the header, its extensions and the backing name from the start of the file
 * (`buf` = the first cluster, or the whole file when shorter). Structural damage is `Corrupt`;
 * versions we do not know are `Unsupported`.
 */
export function decodeHeader(input: Uint8Array, path = 'image'): Header {
  // A plain view, so that slices are copies even when the caller passes a Buffer.
  const buf = new Uint8Array(input.buffer, input.byteOffset, input.byteLength);
  if (buf.length < V2_HEADER_LENGTH) throw corrupt(path, `file too short for a header (${buf.length} bytes)`);
  const dv = view(buf);
  if (dv.getUint32(0) !== QCOW_MAGIC) throw corrupt(path, 'bad magic');
  const version = dv.getUint32(4);
  if (version !== 2 && version !== 3) {
    throw new Unsupported(`${path}: qcow2 version ${version} is not supported`, {
      ref: path, hint: 'only qcow2 versions 2 (compat=0.10) and 3 (compat=1.1) are supported',
    });
  }
  const clusterBits = dv.getUint32(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw corrupt(path, `cluster_bits ${clusterBits} outside ${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS}`);
  }
  const clusterSize = 1 << clusterBits;
  const h: Header = {
    version,
    backingFileOffset: getU64(dv, 8),
    backingFileSize: dv.getUint32(16),
    clusterBits,
    size: getU64(dv, 24),
    cryptMethod: dv.getUint32(32),
    l1Size: dv.getUint32(36),
    l1TableOffset: getU64(dv, 40),
    refcountTableOffset: getU64(dv, 48),
    refcountTableClusters: dv.getUint32(56),
    nbSnapshots: dv.getUint32(60),
    snapshotsOffset: getU64(dv, 64),
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: 4,
    headerLength: V2_HEADER_LENGTH,
    compressionType: 0,
    unknownFields: new Uint8Array(0),
    extensions: [],
  };
  if (version === 3) {
    if (buf.length < 104) throw corrupt(path, 'file too short for a version 3 header');
    h.incompatibleFeatures = dv.getBigUint64(72);
    h.compatibleFeatures = dv.getBigUint64(80);
    h.autoclearFeatures = dv.getBigUint64(88);
    h.refcountOrder = dv.getUint32(96);
    h.headerLength = dv.getUint32(100);
    if (h.headerLength < 104 || h.headerLength % 8 !== 0) throw corrupt(path, `header_length ${h.headerLength} invalid`);
    if (h.headerLength > clusterSize || h.headerLength > buf.length) throw corrupt(path, `header_length ${h.headerLength} exceeds the first cluster`);
    if (h.headerLength > 104) h.compressionType = buf[104]!;
    if (h.headerLength > V3_HEADER_LENGTH) h.unknownFields = buf.slice(V3_HEADER_LENGTH, h.headerLength);
    if (h.refcountOrder > 6) throw corrupt(path, `refcount_order ${h.refcountOrder} above 6`);
  }
  for (const [name, v] of [['size', h.size], ['l1_table_offset', h.l1TableOffset],
    ['refcount_table_offset', h.refcountTableOffset], ['snapshots_offset', h.snapshotsOffset],
    ['backing_file_offset', h.backingFileOffset]] as const) {
    if (!isSafeOffset(v) || v >= 2 ** 56) throw corrupt(path, `${name} ${v} out of range`);
  }

  // Extensions run from the header end to the backing name (or the cluster end).
  const extEnd = Math.min(buf.length, clusterSize, h.backingFileOffset > 0 ? h.backingFileOffset : clusterSize);
  let off = h.headerLength;
  for (;;) {
    if (off + 8 > extEnd) {
      // QEMU accepts a header with no end marker when the space is exhausted.
      break;
    }
    const type = dv.getUint32(off);
    const len = dv.getUint32(off + 4);
    off += 8;
    if (type === EXT_END) break;
    if (len > extEnd - off) throw corrupt(path, `header extension 0x${type.toString(16)} overruns the header cluster`);
    h.extensions.push({ type, data: buf.slice(off, off + len) });
    off += Math.ceil(len / 8) * 8;
  }

  if (h.backingFileOffset !== 0) {
    if (h.backingFileSize > MAX_BACKING_NAME) throw corrupt(path, `backing file name too long (${h.backingFileSize} > ${MAX_BACKING_NAME})`);
    if (h.backingFileOffset + h.backingFileSize > clusterSize || h.backingFileOffset + h.backingFileSize > buf.length) {
      throw corrupt(path, 'backing file name lies outside the header cluster');
    }
    h.backingFile = new TextDecoder().decode(buf.subarray(h.backingFileOffset, h.backingFileOffset + h.backingFileSize));
  }
  return h;
}

/** Refuse images we would misread: encryption, external data file, unknown incompatible bits or compression types, … */
export function assertSupported(h: Header, path: string): void {
  const refuse = (what: string, hint: string) => new Unsupported(`${path}: ${what}`, { ref: path, hint });
  if (h.cryptMethod !== 0) throw refuse(`encrypted image (crypt_method ${h.cryptMethod}) is not supported`, 'decrypt it with `qemu-img convert` first');
  const unknown = h.incompatibleFeatures & ~INCOMPAT_KNOWN;
  if (unknown) throw refuse(`unknown incompatible feature bits 0x${unknown.toString(16)}`, 'this image needs a newer qcow2 implementation');
  if (h.incompatibleFeatures & INCOMPAT_DATA_FILE || h.extensions.some((e) => e.type === EXT_DATA_FILE)) {
    throw refuse('images with an external data file are not supported', 'convert it to a self-contained image with `qemu-img convert`');
  }
  if (h.extensions.some((e) => e.type === EXT_CRYPTO)) throw refuse('encrypted image (LUKS header) is not supported', 'decrypt it first');
  if (h.incompatibleFeatures & INCOMPAT_EXTL2) throw refuse('extended L2 entries (subclusters) are not supported', 'convert it with `qemu-img convert -o extended_l2=off`');
  // As QEMU's validate_compression_type: zlib (0) or zstd (1), the feature bit set exactly for a type other than zlib.
  if (h.compressionType > 1) throw refuse(`unknown compression type ${h.compressionType}`, 'this image needs a newer qcow2 implementation (types known: 0 zlib, 1 zstd)');
  const flagged = (h.incompatibleFeatures & INCOMPAT_COMPRESSION) !== 0n;
  if (flagged !== (h.compressionType !== 0)) {
    throw new Corrupt(`${path}: the compression type incompatible feature bit must ${flagged ? 'not ' : ''}be set for compression type ${h.compressionType}`, { ref: path });
  }
}

export function backingFormatOf(h: Header): string | undefined {
  const e = h.extensions.find((x) => x.type === EXT_BACKING_FORMAT);
  return e ? new TextDecoder().decode(e.data).replace(/\0+$/, '') : undefined;
}

export function setBackingFormat(h: Header, fmt: string | undefined): void {
  h.extensions = h.extensions.filter((x) => x.type !== EXT_BACKING_FORMAT);
  if (fmt !== undefined) h.extensions.unshift({ type: EXT_BACKING_FORMAT, data: new TextEncoder().encode(fmt) });
}

function featureTable(): Uint8Array {
  const out = new Uint8Array(FEATURE_TABLE.length * 48);
  FEATURE_TABLE.forEach((f, i) => {
    out[i * 48] = f.type;
    out[i * 48 + 1] = f.bit;
    out.set(new TextEncoder().encode(f.name), i * 48 + 2);
  });
  return out;
}

/**
 * Encode the whole first cluster the way QEMU's qcow2_update_header does: header, preserved
 * unknown header fields, backing format, feature table (v3 with clusters > 4 KiB), bitmaps,
 * other preserved extensions, end marker, backing name; zero-filled. Updates the header's
 * header_length and backing name offset/size to what was written.
 */
export function encodeHeader(h: Header): Uint8Array {
  const clusterSize = 1 << h.clusterBits;
  const buf = new Uint8Array(clusterSize);
  const dv = view(buf);
  const headerLength = h.version === 2 ? V2_HEADER_LENGTH : V3_HEADER_LENGTH + h.unknownFields.length;
  if (headerLength > clusterSize) throw new Corrupt('qcow2 header does not fit in the first cluster');
  h.headerLength = headerLength;

  const exts: HeaderExtension[] = [];
  const keep = (t: number) => h.extensions.filter((e) => e.type === t);
  exts.push(...keep(EXT_BACKING_FORMAT));
  if (h.version === 3 && clusterSize > 4096) exts.push({ type: EXT_FEATURE_TABLE, data: featureTable() });
  exts.push(...keep(EXT_BITMAPS));
  const regenerated = new Set([EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, EXT_BITMAPS]);
  exts.push(...h.extensions.filter((e) => !regenerated.has(e.type)));

  let off = headerLength;
  if (h.version === 3) buf.set(h.unknownFields, V3_HEADER_LENGTH);
  for (const e of exts) {
    const padded = Math.ceil(e.data.length / 8) * 8;
    if (off + 8 + padded + 8 > clusterSize) throw new Corrupt('qcow2 header extensions do not fit in the first cluster');
    dv.setUint32(off, e.type);
    dv.setUint32(off + 4, e.data.length);
    buf.set(e.data, off + 8);
    off += 8 + padded;
  }
  off += 8; // end marker (zeros)
  const name = h.backingFile !== undefined ? new TextEncoder().encode(h.backingFile) : undefined;
  if (name) {
    if (name.length > MAX_BACKING_NAME) throw new Corrupt(`backing file name too long (${name.length} > ${MAX_BACKING_NAME})`);
    if (off + name.length > clusterSize) throw new Corrupt('backing file name does not fit in the first cluster');
    buf.set(name, off);
    h.backingFileOffset = off;
    h.backingFileSize = name.length;
  } else {
    h.backingFileOffset = 0;
    h.backingFileSize = 0;
  }

  dv.setUint32(0, QCOW_MAGIC);
  dv.setUint32(4, h.version);
  setU64(dv, 8, h.backingFileOffset);
  dv.setUint32(16, h.backingFileSize);
  dv.setUint32(20, h.clusterBits);
  setU64(dv, 24, h.size);
  dv.setUint32(32, h.cryptMethod);
  dv.setUint32(36, h.l1Size);
  setU64(dv, 40, h.l1TableOffset);
  setU64(dv, 48, h.refcountTableOffset);
  dv.setUint32(56, h.refcountTableClusters);
  dv.setUint32(60, h.nbSnapshots);
  setU64(dv, 64, h.snapshotsOffset);
  if (h.version === 3) {
    dv.setBigUint64(72, h.incompatibleFeatures);
    dv.setBigUint64(80, h.compatibleFeatures);
    dv.setBigUint64(88, h.autoclearFeatures);
    dv.setUint32(96, h.refcountOrder);
    dv.setUint32(100, headerLength);
    buf[104] = h.compressionType;
  }
  return buf;
}

