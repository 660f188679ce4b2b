/**
 * `qemu-img info`: the ImageInfo of one image (keys in QAPI schema order, so qemuJsonPretty puts
 * them in qemu-img 7.2's order) and its human rendering. Each image is opened without its backing
 * chain, as qemu-img does, so `info` works on an image whose backing file is missing.
 */
import { stat } from 'node:fs/promises';
import { Corrupt } from '../../../core/index.js';
import { openImage, type Image, type ImageFormat, type SnapshotInfo } from '../engine/index.js';
import { pathCombine } from './names.js';
import { qdictKeyOrder, type QemuJsonValue } from './qemu-json.js';
import { sizeToStr } from './sizes.js';

export type QemuObject = { [key: string]: QemuJsonValue | undefined };

/** What qemu-img knows about one image, and where its backing file is. */
export interface CollectedInfo {
  info: QemuObject;
  /** The backing file under qemu's name for it, and its format when the header records one. */
  backing?: { name: string; format?: ImageFormat };
}

/** Disk usage as `stat` reports it (qemu's actual-size: allocated blocks × 512). */
export async function actualSize(path: string): Promise<number> {
  const st = await stat(path);
  return st.blocks * 512;
}

export async function collectImageInfo(name: string, format?: ImageFormat): Promise<CollectedInfo> {
  const img = await openImage(name, { readOnly: true, noBacking: true, ...(format ? { format } : {}) });
  try {
    return await describe(name, img);
  } finally {
    await img.close();
  }
}

async function describe(name: string, img: Image): Promise<CollectedInfo> {
  const h = img.header;
  const snapshots = h ? await img.snapshots.list() : [];
  const backingName = h?.backingFile;
  const backingFormat = h?.backingFormat;
  // QAPI ImageInfo member order (qapi/block-core.json, 7.2).
  const info: QemuObject = {
    filename: name,
    format: img.format,
    'dirty-flag': h ? h.dirty : false,
    'actual-size': await actualSize(img.path),
    'virtual-size': img.virtualSize,
    'cluster-size': h ? h.clusterSize : undefined,
    encrypted: h && h.cryptMethod !== 0 ? true : undefined,
    'backing-filename': backingName,
    'full-backing-filename': backingName !== undefined ? pathCombine(name, backingName) : undefined,
    'backing-filename-format': backingFormat,
    snapshots: snapshots.length > 0 ? snapshots.map(snapshotJson) : undefined,
    'format-specific': h ? { type: 'qcow2', data: await qcow2Specific(img) } : undefined,
  };
  const out: CollectedInfo = { info };
  if (backingName !== undefined) {
    out.backing = { name: pathCombine(name, backingName) };
    if (backingFormat === 'qcow2' || backingFormat === 'raw') out.backing.format = backingFormat;
  }
  return out;
}

async function qcow2Specific(img: Image): Promise<QemuObject> {
  const h = img.header!;
  if (h.version === 2) {
    return { compat: '0.10', 'refcount-bits': h.refcountBits, 'compression-type': 'zlib' };
  }
  const bitmaps = await img.bitmaps.info();
  return {
    compat: '1.1',
    'extended-l2': h.extendedL2,
    'lazy-refcounts': h.lazyRefcounts,
    corrupt: h.corrupt,
    'refcount-bits': h.refcountBits,
    // Qcow2BitmapInfo in QAPI member order; absent when there are none, as in qemu-img.
    bitmaps: bitmaps.length > 0 ? bitmaps.map((b) => ({ name: b.name, granularity: b.granularity, flags: b.flags })) : undefined,
    'compression-type': h.compressionType === 1 ? 'zstd' : 'zlib',
  };
}

/** SnapshotInfo in QAPI member order. */
export function snapshotJson(s: SnapshotInfo): QemuObject {
  return {
    id: s.id,
    name: s.name,
    'vm-state-size': s.vmStateSize,
    'date-sec': s.dateSec,
    'date-nsec': s.dateNsec,
    'vm-clock-sec': Math.floor(s.vmClockNsec / 1e9),
    'vm-clock-nsec': s.vmClockNsec % 1e9,
    icount: s.icount === undefined || s.icount < 0 ? undefined : s.icount,
  };
}

/**
 * The ImageInfo of `name` and of every image below it (`--backing-chain`), top first. A chain
 * that comes back to an image already listed is refused, as qemu-img refuses it.
 */
export async function collectChainInfo(name: string, format: ImageFormat | undefined, maxDepth = 64): Promise<QemuObject[]> {
  const seen = new Set<string>();
  const out: QemuObject[] = [];
  let next: { name: string; format?: ImageFormat } | undefined = { name, ...(format ? { format } : {}) };
  while (next) {
    const key = await realKey(next.name);
    if (seen.has(key)) {
      throw new Corrupt(`Backing file '${next.name}' creates an infinite loop.`, { ref: name, hint: 'fix the backing file names in the chain' });
    }
    if (out.length >= maxDepth) {
      throw new Corrupt(`The backing chain of '${name}' is deeper than ${maxDepth} images`, { ref: name });
    }
    seen.add(key);
    const collected = await collectImageInfo(next.name, next.format);
    out.push(collected.info);
    next = collected.backing;
  }
  return out;
}

async function realKey(path: string): Promise<string> {
  try {
    const st = await stat(path);
    return `${st.dev}:${st.ino}`;
  } catch {
    return path; // opening it will report the real problem
  }
}

/** `bdrv_image_info_dump`: the human `qemu-img info` text of one image (lines). */
export function humanImageInfo(info: QemuObject): string[] {
  const lines = [
    `image: ${info.filename as string}`,
    `file format: ${info.format as string}`,
    `virtual size: ${sizeToStr(info['virtual-size'] as number)} (${info['virtual-size'] as number} bytes)`,
    `disk size: ${sizeToStr(info['actual-size'] as number)}`,
  ];
  if (info['cluster-size'] !== undefined) lines.push(`cluster_size: ${info['cluster-size'] as number}`);
  if (info.encrypted) lines.push('encrypted: yes');
  const backing = info['backing-filename'] as string | undefined;
  if (backing !== undefined) {
    const full = info['full-backing-filename'] as string | undefined;
    lines.push(full !== undefined && full !== backing ? `backing file: ${backing} (actual path: ${full})` : `backing file: ${backing}`);
    if (info['backing-filename-format'] !== undefined) lines.push(`backing file format: ${info['backing-filename-format'] as string}`);
  }
  if (info['dirty-flag'] === true) lines.push('cleanly shut down: no');
  const snaps = info.snapshots as QemuObject[] | undefined;
  if (snaps) lines.push(...humanSnapshotList(snaps));
  const spec = info['format-specific'] as QemuObject | undefined;
  if (spec) {
    lines.push('Format specific information:');
    lines.push(...dumpQdict(spec.data as QemuObject, 1));
  }
  return lines;
}

/** "Snapshot list:" and the `bdrv_snapshot_dump` table. */
export function humanSnapshotList(snaps: QemuObject[]): string[] {
  const lines = ['Snapshot list:', `${'ID'.padEnd(10)}${'TAG'.padEnd(17)}${'VM SIZE'.padStart(8)}${'DATE'.padStart(20)}${'VM CLOCK'.padStart(13)}${'ICOUNT'.padStart(11)}`];
  for (const s of snaps) {
    const clockNs = (s['vm-clock-sec'] as number) * 1e9 + (s['vm-clock-nsec'] as number);
    const secs = Math.floor(clockNs / 1e9);
    const clock = `${pad2(Math.floor(secs / 3600))}:${pad2(Math.floor(secs / 60) % 60)}:${pad2(secs % 60)}.${String(Math.floor(clockNs / 1e6) % 1000).padStart(3, '0')}`;
    const icount = s.icount === undefined ? '' : String(s.icount);
    lines.push(
      `${String(s.id).padEnd(9)} ${String(s.name).padEnd(16)} ${sizeToStr(s['vm-state-size'] as number).padStart(8)}` +
        `${localDate(s['date-sec'] as number).padStart(20)}${clock.padStart(13)}${icount.padStart(11)}`,
    );
  }
  return lines;
}

function pad2(n: number): string {
  return String(n).padStart(2, '0');
}

/** `%Y-%m-%d %H:%M:%S` in local time, as g_date_time_new_from_unix_local formats it. */
function localDate(sec: number): string {
  const d = new Date(sec * 1000);
  return `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
}

/** qemu's `dump_qlist`: `[i]:` then the element, nested one level deeper when composite. */
function dumpQlist(list: readonly QemuJsonValue[], level: number): string[] {
  const indent = '    '.repeat(level);
  const lines: string[] = [];
  list.forEach((v, i) => {
    if (v !== null && typeof v === 'object') {
      lines.push(`${indent}[${i}]:`);
      lines.push(...(Array.isArray(v) ? dumpQlist(v as QemuJsonValue[], level + 1) : dumpQdict(v as QemuObject, level + 1)));
    } else {
      lines.push(`${indent}[${i}]: ${String(v)}`);
    }
  });
  return lines;
}

/** qemu's `dump_qdict`: one "key: value" line per member, '-' in keys shown as ' ', QDict order. */
function dumpQdict(obj: QemuObject, level: number): string[] {
  const indent = '    '.repeat(level);
  const lines: string[] = [];
  for (const key of qdictKeyOrder(Object.keys(obj).filter((k) => obj[k] !== undefined))) {
    const v = obj[key]!;
    const label = key.replace(/-/g, ' ');
    if (v !== null && typeof v === 'object') {
      lines.push(`${indent}${label}:`);
      lines.push(...(Array.isArray(v) ? dumpQlist(v as QemuJsonValue[], level + 1) : dumpQdict(v as QemuObject, level + 1)));
    } else {
      lines.push(`${indent}${label}: ${String(v)}`);
    }
  }
  return lines;
}
