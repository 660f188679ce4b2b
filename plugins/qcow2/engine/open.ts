import { realpath } from 'node:fs/promises';
import { dirname, isAbsolute, join, resolve, sep } from 'node:path';
import { Corrupt, Unsupported, FailedPrecondition } from '../../../core/index.js';
import {
  INCOMPAT_CORRUPT, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_REFTABLE_BYTES, MAX_SNAPSHOTS, MAX_SNAPSHOT_TABLE_BYTES,
} from '../format/constants.js';
import { assertSupported, backingFormatOf, decodeHeader, hasQcowMagic, HEADER_PROBE_BYTES, type Header } from '../format/header.js';
import { decodeSnapshotTable } from '../format/snapshot-table.js';
import { alignUp, view } from '../format/bytes.js';
import { ImageFile, fileError } from './file.js';
import { ImageHandle } from './image-handle.js';
import { Qcow2Image } from './qcow2-image.js';
import { RawImage } from './raw-image.js';
import type { ChainEntry, Image, ImageFormat, OpenOptions } from './types.js';

const DEFAULT_CACHE = 8 * 1024 * 1024;
const FIRST_READ = 64 * 1024;

export async function probeFormat(path: string): Promise<ImageFormat> {
  const f = await ImageFile.open(path, true);
  try {
    return hasQcowMagic(await f.read(0, 4)) ? 'qcow2' : 'raw';
  } finally {
    await f.close();
  }
}

export async function openImage(path: string, opts: OpenOptions = {}): Promise<Image> {
  const root = opts.allowedRoot !== undefined ? await realOrThrow(resolve(opts.allowedRoot)) : undefined;
  return openLayer(resolve(path), opts, opts.readOnly ?? true, opts.format, 0, new Set(), root);
}

async function realOrThrow(path: string): Promise<string> {
  try {
    return await realpath(path);
  } catch (e) {
    throw fileError(e, path, 'open');
  }
}

async function openLayer(path: string, opts: OpenOptions, readOnly: boolean, format: ImageFormat | undefined,
  depth: number, seen: Set<string>, root: string | undefined): Promise<Image> {
  const maxDepth = opts.maxChainDepth ?? 64;
  if (depth > maxDepth) {
    throw new Corrupt(`${path}: backing chain deeper than ${maxDepth}`, { ref: path, hint: 'flatten the chain (stream or convert)' });
  }
  const real = await realOrThrow(path);
  if (root !== undefined && real !== root && !real.startsWith(root + sep)) {
    // Unsupported (not PermissionDenied): the image is fine, its chain is not acceptable here.
    throw new Unsupported(`${path}: backing file lies outside the allowed root ${root}`, {
      ref: path, hint: 'keep every image of the chain inside the pool folder',
    });
  }
  if (seen.has(real)) {
    throw new Corrupt(`${path}: backing chain loops back to ${real}`, { ref: path, hint: 'fix the backing file reference with `rebase -u`' });
  }
  seen.add(real);

  const file = await ImageFile.open(path, readOnly, { skipSync: opts.cache === 'unsafe', writeBehind: opts.writeBehind ?? false });
  let backing: Image | undefined;
  try {
    const fileSize = await file.size();
    // As QEMU sees a raw file: whole 512-byte sectors, the part past the end of the file reads as zeros.
    if (format === 'raw') return new ImageHandle(new RawImage(path, file, readOnly, alignUp(fileSize, 512)));
    const head = await readHead(file, fileSize);
    if (format === undefined && !hasQcowMagic(head)) return new ImageHandle(new RawImage(path, file, readOnly, alignUp(fileSize, 512)));

    const h = decodeHeader(head, path);
    assertSupported(h, path);
    validateLayout(h, fileSize, path);
    if (!readOnly && h.incompatibleFeatures & INCOMPAT_CORRUPT) {
      throw new FailedPrecondition(`${path}: image is marked corrupt; it can only be opened read-only`, {
        ref: path, hint: 'repair it with `check -r all` first',
      });
    }
    const cs = 1 << h.clusterBits;
    const l1 = await file.readExact(h.l1TableOffset, h.l1Size * 8, 'L1 table');
    const reftable = await file.readExact(h.refcountTableOffset, h.refcountTableClusters * cs, 'refcount table');
    const snapshots = h.nbSnapshots === 0 ? [] : decodeSnapshotTable(
      await file.read(h.snapshotsOffset, Math.min(fileSize - h.snapshotsOffset, MAX_SNAPSHOT_TABLE_BYTES)), h.nbSnapshots, path);

    const entry: ChainEntry = { filename: path, format: 'qcow2', virtualSize: h.size };
    if (h.backingFile !== undefined && h.backingFile !== '') {
      const full = isAbsolute(h.backingFile) ? h.backingFile : join(dirname(path), h.backingFile);
      entry.backingFilename = h.backingFile;
      entry.fullBackingFilename = full;
      const bfmt = backingFormatOf(h);
      if (bfmt !== undefined) entry.backingFormat = bfmt;
      if (bfmt !== undefined && bfmt !== 'qcow2' && bfmt !== 'raw') {
        throw new Unsupported(`${path}: backing format ${JSON.stringify(bfmt)} is not supported`, { ref: path, hint: 'only qcow2 and raw backing files are supported' });
      }
      if (!opts.noBacking) backing = await openLayer(full, opts, true, bfmt as ImageFormat | undefined, depth + 1, seen, root);
    }
    const img = new Qcow2Image({
      path, file, header: h, l1, reftable, snapshots, backing, entry, readOnly, fileSize,
      cacheBytes: opts.cacheBytes ?? DEFAULT_CACHE,
      deferMetadata: opts.deferMetadata === true && depth === 0,
    });
    await img.init();
    return new ImageHandle(img);
  } catch (e) {
    await file.close().catch(() => {});
    if (backing) await backing.close().catch(() => {});
    throw e;
  }
}

/**
 * The first cluster, where the header and its extensions live (or the whole file when shorter):
 * 64 KiB, QEMU's default cluster size, then the rest when the header says the clusters are
 * larger. Reading HEADER_PROBE_BYTES (2 MiB) every time cost a millisecond per open.
 */
async function readHead(file: ImageFile, fileSize: number): Promise<Uint8Array> {
  const head = await file.read(0, Math.min(fileSize, FIRST_READ));
  if (head.length === fileSize || !hasQcowMagic(head)) return head;
  const clusterBits = view(head).getUint32(20);
  // Out of range: decodeHeader reports it, from what we have.
  if (1 << clusterBits <= head.length || clusterBits > MAX_CLUSTER_BITS) return head;
  return file.read(0, Math.min(fileSize, HEADER_PROBE_BYTES, 1 << clusterBits));
}

/** Offsets and sizes of the tables must fit the file and QEMU's limits, before we allocate anything. */
function validateLayout(h: Header, fileSize: number, path: string): void {
  const cs = 1 << h.clusterBits;
  const bad = (what: string) => new Corrupt(`${path}: ${what}`, { ref: path, hint: 'the image is damaged; check it with `qemu-img check`' });
  if (h.l1Size * 8 > MAX_L1_BYTES) throw bad(`L1 table too large (${h.l1Size} entries)`);
  const l2Coverage = cs * (cs / 8);
  if (h.l1Size < Math.ceil(h.size / l2Coverage)) throw bad(`L1 table too small (${h.l1Size} entries) for virtual size ${h.size}`);
  if (h.l1Size > 0) {
    if (h.l1TableOffset % cs !== 0) throw bad(`L1 table offset 0x${h.l1TableOffset.toString(16)} is not cluster aligned`);
    if (h.l1TableOffset < cs) throw bad('L1 table overlaps the header');
    if (h.l1TableOffset + h.l1Size * 8 > fileSize) throw bad('L1 table lies past the end of the file');
  }
  if (h.refcountTableClusters === 0) throw bad('refcount table has no clusters');
  if (h.refcountTableClusters * cs > MAX_REFTABLE_BYTES) throw bad(`refcount table too large (${h.refcountTableClusters} clusters)`);
  if (h.refcountTableOffset % cs !== 0) throw bad(`refcount table offset 0x${h.refcountTableOffset.toString(16)} is not cluster aligned`);
  if (h.refcountTableOffset < cs) throw bad('refcount table overlaps the header');
  if (h.refcountTableOffset + h.refcountTableClusters * cs > fileSize) throw bad('refcount table lies past the end of the file');
  if (h.nbSnapshots > MAX_SNAPSHOTS) throw bad(`too many snapshots (${h.nbSnapshots})`);
  if (h.nbSnapshots > 0) {
    if (h.snapshotsOffset % cs !== 0) throw bad('snapshot table offset is not cluster aligned');
    if (h.snapshotsOffset < cs || h.snapshotsOffset >= fileSize) throw bad('snapshot table lies outside the file');
  }
}
