import { AlreadyExists, Corrupt, FailedPrecondition, InvalidArgument, NotFound, OutOfRange, Unsupported } from '../../../core/index.js';
import {
  BITMAP_LIMITS, BME_FLAG_AUTO, BME_FLAG_IN_USE, BT_DIRTY_TRACKING, bitmapDataBytes, decodeBitmapDirectory,
  decodeBitmapsExtension, decodeTableEntry, encodeBitmapDirectory, encodeBitmapsExtension, encodeTableEntry,
  type BitmapDirEntry,
} from '../format/bitmaps.js';
import { AUTOCLEAR_BITMAPS, EXT_BITMAPS } from '../format/constants.js';
import type { Qcow2State, StateBitmaps } from './qcow2-state.js';
import type { BitmapInfo, BitmapOps, ByteRange, Image } from './types.js';

/** One bitmap as this process holds it. */
interface Bitmap {
  name: string;
  granularityBits: number;
  /** The `auto` flag: every write marks it. */
  enabled: boolean;
  /** Found `in_use` when loaded: a writer did not close the image cleanly. Never trusted. */
  inconsistent: boolean;
  /** One bit per granule, LSB first (the on-disk layout); loaded on first use. */
  bits?: Uint8Array;
  /** Where it is on disk now (undefined: not stored yet). */
  stored?: BitmapDirEntry;
}

/**
 * Persistent dirty bitmaps of one open qcow2 image (docs/interop/qcow2.rst; QEMU's
 * block/qcow2-bitmap.c). As in QEMU, the bits live in memory while the image is open read-write
 * and every bitmap is flagged `in_use` on disk meanwhile; a clean close stores them and clears
 * the flag. So a crash leaves each bitmap `in_use`, which every later reader treats as
 * inconsistent: "everything may have changed", never a silent gap. Storing builds the new tables
 * and directory beside the old ones (refcounts before references), switches the header once,
 * then frees the old ones: a kill at any instant leaves the old set or the new one, plus leaks.
 * Guest writes mark the bits before their data is written (Qcow2Image calls `mark` first).
 */
export class Bitmaps implements BitmapOps, StateBitmaps {
  private list: Bitmap[] = [];
  /** The directory on disk (undefined: none). */
  private dir: { offset: number; size: number } | undefined;
  /** Something changed since the last store (bits, flags, the set). */
  private changed = false;
  /** The image's bitmaps are flagged in_use on disk by this process. */
  private claimed = false;

  constructor(private readonly s: Qcow2State) {}

  /** Whether any bitmap exists (cheap: the write path asks on every write). */
  get any(): boolean {
    return this.list.length > 0;
  }

  /**
   * Read the directory (bits are read on first use). An extension whose autoclear bit is clear
   * was left by a program that did not keep it up to date: ignored, as QEMU does (and dropped on
   * a read-write open).
   */
  async load(): Promise<void> {
    const s = this.s;
    const ext = s.h.extensions.find((e) => e.type === EXT_BITMAPS);
    if (!ext || !(s.h.autoclearFeatures & AUTOCLEAR_BITMAPS)) return;
    const bad = (what: string) => new Corrupt(`${s.path}: ${what}`, {
      ref: s.path, hint: 'the bitmaps are damaged; remove them with `qemu-img bitmap --remove`, or convert the image without --bitmaps',
    });
    const e = decodeBitmapsExtension(ext.data);
    if (typeof e === 'string') throw bad(e);
    if (e.nbBitmaps > BITMAP_LIMITS.maxBitmaps) throw bad(`too many bitmaps (${e.nbBitmaps})`);
    if (e.nbBitmaps === 0) return;
    if (e.directorySize > BITMAP_LIMITS.maxDirectorySize || e.directoryOffset % s.cs !== 0 || e.directoryOffset < s.cs
      || e.directoryOffset + e.directorySize > s.fileLen) {
      throw bad('the bitmap directory lies outside the image');
    }
    const raw = await s.file.readExact(e.directoryOffset, e.directorySize, 'bitmap directory');
    const entries = decodeBitmapDirectory(raw, e.nbBitmaps);
    if (typeof entries === 'string') throw bad(entries);
    for (const d of entries) {
      const want = Math.ceil(bitmapDataBytes(s.h.size, d.granularityBits) / s.cs);
      // An in-use bitmap may have the size from before a resize its writer did not live to
      // store (QEMU does not check it either): it is never read, only kept or removed.
      if (!(d.flags & BME_FLAG_IN_USE) && d.tableSize !== want) throw bad(`bitmap ${JSON.stringify(d.name)} has ${d.tableSize} table entries, ${want} expected for the image's size`);
      if (d.tableOffset % s.cs !== 0 || d.tableOffset + d.tableSize * 8 > s.fileLen) throw bad(`bitmap ${JSON.stringify(d.name)}: table lies outside the image`);
    }
    this.dir = { offset: e.directoryOffset, size: e.directorySize };
    this.list = entries.map((d) => ({
      name: d.name, granularityBits: d.granularityBits, enabled: (d.flags & BME_FLAG_AUTO) !== 0,
      inconsistent: (d.flags & BME_FLAG_IN_USE) !== 0, stored: d,
    }));
  }

  /**
   * Read-write open: load every consistent bitmap's bits and flag all of them in_use on disk
   * (the directory rewritten in place, then synced) before the first write can happen.
   */
  async claim(): Promise<void> {
    if (this.list.length === 0 || this.claimed) return;
    for (const b of this.list) if (!b.inconsistent) await this.bitsOf(b);
    await this.writeFlagsInPlace(true);
    this.claimed = true;
  }

  /** Mark a guest write: in memory, before its data is written. */
  mark(offset: number, length: number): void {
    if (length <= 0) return;
    for (const b of this.list) {
      if (!b.enabled || b.inconsistent || !b.bits) continue;
      setBits(b.bits, Math.floor(offset / 2 ** b.granularityBits), Math.floor((offset + length - 1) / 2 ** b.granularityBits));
      this.changed = true;
    }
  }

  /** Mark everything (the image's content was replaced: a snapshot was applied). */
  markAll(): void {
    if (this.s.h.size > 0) this.mark(0, this.s.h.size);
  }

  /** An inconsistent bitmap cannot follow a resize (its table would no longer fit the size). */
  assertResizable(): void {
    if (this.list.some((b) => b.inconsistent)) {
      throw new FailedPrecondition(`${this.s.path}: cannot resize an image with inconsistent bitmaps`, {
        ref: this.s.path, hint: 'remove them first (`qemu-img bitmap --remove`)',
      });
    }
  }

  /** Resize the bits with the image (a grown area starts clean, as in QEMU). */
  resize(newSize: number): void {
    for (const b of this.list) {
      const bytes = bitmapDataBytes(newSize, b.granularityBits);
      const next = new Uint8Array(bytes);
      next.set(b.bits!.subarray(0, Math.min(bytes, b.bits!.length)));
      // Bits past the new end in the last byte are cleared.
      const units = Math.ceil(newSize / 2 ** b.granularityBits);
      if (units % 8 !== 0 && bytes > 0) next[bytes - 1]! &= (1 << (units % 8)) - 1;
      b.bits = next;
    }
    if (this.list.length > 0) this.changed = true;
  }

  /** Clusters the bitmaps use on disk (directory, tables, data): a refcount rebuild counts them. */
  async clusters(): Promise<number[]> {
    const cs = this.s.cs;
    const out: number[] = [];
    const range = (off: number, len: number) => {
      for (let c = Math.floor(off / cs); c < Math.ceil((off + len) / cs); c++) out.push(c);
    };
    if (this.dir) range(this.dir.offset, this.dir.size);
    for (const b of this.list) {
      if (!b.stored) continue;
      range(b.stored.tableOffset, b.stored.tableSize * 8);
      const table = await this.s.file.readExact(b.stored.tableOffset, b.stored.tableSize * 8, 'bitmap table');
      for (let i = 0; i < b.stored.tableSize; i++) {
        const t = decodeTableEntry(table, i);
        if (t.offset !== 0) out.push(t.offset / cs);
      }
    }
    return out;
  }

  // ---- BitmapOps ----

  async info(): Promise<BitmapInfo[]> {
    this.s.checkOpen();
    return this.list.map((b) => {
      const flags: BitmapInfo['flags'] = [];
      if (b.inconsistent) flags.push('in-use');
      if (b.enabled) flags.push('auto');
      return { name: b.name, granularity: 2 ** b.granularityBits, enabled: b.enabled, inconsistent: b.inconsistent, flags };
    });
  }

  async add(name: string, opts: { granularity?: number; disabled?: boolean } = {}): Promise<void> {
    const s = this.s;
    s.assertWritable();
    checkName(name, s.path);
    if (s.h.version === 2) {
      throw new Unsupported(`${s.path}: Cannot store dirty bitmaps in qcow2 v2 files`, { ref: s.path, hint: 'upgrade the image: qemu-img amend -o compat=1.1' });
    }
    if (s.h.size === 0) throw new InvalidArgument(`${s.path}: an empty image (0 bytes) cannot have a bitmap`, { ref: s.path });
    const g = opts.granularity ?? Math.max(4096, s.cs);
    if (!Number.isSafeInteger(g) || g < 512 || g > 2 ** BITMAP_LIMITS.maxGranularityBits || (g & (g - 1)) !== 0) {
      throw new InvalidArgument(`${s.path}: Granularity must be power of 2 and at least 512`, { ref: s.path, hint: `got ${String(g)}; at most 2 GiB` });
    }
    await s.lock.exclusive(async () => {
      if (this.list.some((b) => b.name === name)) {
        throw new AlreadyExists(`${s.path}: Bitmap already exists: ${name}`, { ref: s.path });
      }
      if (this.list.length >= BITMAP_LIMITS.maxBitmaps) throw new OutOfRange(`${s.path}: too many bitmaps`, { ref: s.path });
      const bits = Math.log2(g);
      if (bitmapDataBytes(s.h.size, bits) > BITMAP_LIMITS.maxPhysSize) {
        throw new OutOfRange(`${s.path}: a bitmap of granularity ${g} would be too large for this image`, { ref: s.path, hint: 'use a larger granularity' });
      }
      this.list.push({ name, granularityBits: bits, enabled: opts.disabled !== true, inconsistent: false, bits: new Uint8Array(bitmapDataBytes(s.h.size, bits)) });
      await this.storeLocked(false);
    });
  }

  async remove(name: string): Promise<void> {
    await this.change(name, true, () => {
      this.list = this.list.filter((b) => b.name !== name);
    });
  }

  async clear(name: string): Promise<void> {
    await this.change(name, false, (b) => {
      b.bits = new Uint8Array(bitmapDataBytes(this.s.h.size, b.granularityBits));
    });
  }

  async enable(name: string): Promise<void> {
    await this.change(name, false, (b) => { b.enabled = true; });
  }

  async disable(name: string): Promise<void> {
    await this.change(name, false, (b) => { b.enabled = false; });
  }

  async merge(into: string, from: { image: Image; name: string }): Promise<void> {
    const s = this.s;
    const srcSize = from.image.virtualSize;
    if (srcSize !== s.h.size) {
      throw new FailedPrecondition(`${s.path}: Bitmaps are of different sizes (destination size is ${s.h.size}, source size is ${srcSize}) and can't be merged`, { ref: s.path });
    }
    const same = from.image.path === s.path;
    // An inconsistent source is refused, as QEMU refuses it (merging "everything" would hide that).
    const source = (await from.image.bitmaps.info()).find((x) => x.name === from.name);
    if (source?.inconsistent) {
      throw new FailedPrecondition(`${s.path}: Bitmap '${from.name}' is inconsistent and cannot be used`, { ref: s.path, hint: 'remove it and take a full copy' });
    }
    // From another image: read its extents first (its own lock); from this one, inside ours.
    const ranges = same ? undefined : await from.image.bitmaps.dirtyExtents(from.name, 0, srcSize);
    await this.change(into, false, async (b) => {
      const src = ranges ?? this.extentsLocked(this.find(from.name), 0, s.h.size);
      const g = 2 ** b.granularityBits;
      for (const r of src) setBits(b.bits!, Math.floor(r.offset / g), Math.floor((r.offset + r.length - 1) / g));
    });
  }

  async dirtyExtents(name: string, offset = 0, length?: number): Promise<ByteRange[]> {
    const s = this.s;
    const len = length ?? s.h.size - offset;
    s.checkRange(offset, len);
    return s.lock.shared(async () => {
      const b = this.find(name);
      // Never trusted: it may miss writes, so everything may have changed.
      if (b.inconsistent) return len > 0 ? [{ offset, length: len }] : [];
      await this.bitsOf(b);
      return this.extentsLocked(b, offset, len);
    });
  }

  // ---- storing ----

  /** Clean close: store what changed and clear in_use (kept on inconsistent bitmaps). Under the exclusive lock. */
  async closeLocked(): Promise<void> {
    if (!this.claimed) return;
    if (this.changed) await this.storeLocked(true);
    else {
      await this.writeFlagsInPlace(false);
      this.claimed = false;
    }
  }

  /**
   * Write every bitmap whose bits are held (new tables and data), a new directory, the header
   * (extension and autoclear bit), then free what the old directory used. `final`: clear in_use.
   * Under the exclusive lock; metadata written through.
   */
  private async storeLocked(final: boolean): Promise<void> {
    const s = this.s;
    await s.meta.writeThrough(async () => {
      const oldDir = this.dir;
      const freed: BitmapDirEntry[] = [];
      const next: BitmapDirEntry[] = [];
      for (const b of this.list) {
        const flags = (b.enabled ? BME_FLAG_AUTO : 0) | (!final || b.inconsistent ? BME_FLAG_IN_USE : 0);
        if (b.inconsistent && b.stored) {
          next.push({ ...b.stored, flags: b.stored.flags | BME_FLAG_IN_USE });
          continue;
        }
        const bits = await this.bitsOf(b);
        const stored = await this.writeBits(bits);
        if (b.stored) freed.push(b.stored);
        b.stored = { tableOffset: stored.offset, tableSize: stored.size, flags, type: BT_DIRTY_TRACKING, granularityBits: b.granularityBits, name: b.name, extra: new Uint8Array(0) };
        next.push(b.stored);
      }
      for (const gone of this.removed) freed.push(gone);
      this.removed = [];
      let dir: { offset: number; size: number } | undefined;
      if (next.length > 0) {
        const bytes = encodeBitmapDirectory(next);
        if (bytes.length > BITMAP_LIMITS.maxDirectorySize) throw new OutOfRange(`${s.path}: the bitmap directory would exceed 64 MiB`, { ref: s.path });
        const off = await s.refcounts.alloc(Math.ceil(bytes.length / s.cs));
        await s.file.write(off, bytes);
        s.fileLen = Math.max(s.fileLen, off + Math.ceil(bytes.length / s.cs) * s.cs);
        dir = { offset: off, size: bytes.length };
      }
      await s.file.sync();
      s.h.extensions = s.h.extensions.filter((e) => e.type !== EXT_BITMAPS);
      if (dir) {
        s.h.extensions.push({ type: EXT_BITMAPS, data: encodeBitmapsExtension({ nbBitmaps: next.length, directorySize: dir.size, directoryOffset: dir.offset }) });
        s.h.autoclearFeatures |= AUTOCLEAR_BITMAPS;
      } else {
        s.h.autoclearFeatures &= ~AUTOCLEAR_BITMAPS;
      }
      await s.writeHeader();
      await s.file.sync();
      this.dir = dir;
      this.claimed = !final && next.length > 0;
      if (oldDir) await s.refcounts.free(oldDir.offset, Math.ceil(oldDir.size / s.cs));
      for (const e of freed) await this.freeTable(e);
    });
    this.changed = false;
  }

  /** Bitmaps removed since the last store: their clusters are freed after the next header switch. */
  private removed: BitmapDirEntry[] = [];

  /** Data clusters (all-zero ones left out, entry 0) then the table; refcounts first. */
  private async writeBits(bits: Uint8Array): Promise<{ offset: number; size: number }> {
    const s = this.s;
    const cs = s.cs;
    const size = Math.ceil(bits.length / cs);
    const table = new Uint8Array(size * 8);
    for (let i = 0; i < size; i++) {
      const chunk = bits.subarray(i * cs, Math.min(bits.length, (i + 1) * cs));
      if (chunk.every((x) => x === 0)) continue;
      const off = await s.refcounts.alloc(1);
      const data = new Uint8Array(cs);
      data.set(chunk);
      await s.file.write(off, data);
      s.fileLen = Math.max(s.fileLen, off + cs);
      encodeTableEntry(table, i, off);
    }
    const offset = await s.refcounts.alloc(Math.max(1, Math.ceil(table.length / cs)));
    const padded = new Uint8Array(Math.max(1, Math.ceil(table.length / cs)) * cs);
    padded.set(table);
    await s.file.write(offset, padded);
    s.fileLen = Math.max(s.fileLen, offset + padded.length);
    return { offset, size };
  }

  private async freeTable(e: BitmapDirEntry): Promise<void> {
    const s = this.s;
    const table = await s.file.readExact(e.tableOffset, e.tableSize * 8, 'bitmap table');
    for (let i = 0; i < e.tableSize; i++) {
      const t = decodeTableEntry(table, i);
      if (t.offset !== 0) await s.refcounts.free(t.offset, 1);
    }
    await s.refcounts.free(e.tableOffset, Math.max(1, Math.ceil((e.tableSize * 8) / s.cs)));
  }

  /** Set or clear in_use on every stored entry, rewriting the directory where it is. */
  private async writeFlagsInPlace(inUse: boolean): Promise<void> {
    const s = this.s;
    if (!this.dir) return;
    const entries = this.list.filter((b) => b.stored).map((b) => ({
      ...b.stored!,
      flags: (b.enabled ? BME_FLAG_AUTO : 0) | (inUse || b.inconsistent ? BME_FLAG_IN_USE : 0),
    }));
    const bytes = encodeBitmapDirectory(entries);
    if (bytes.length !== this.dir.size) throw new Corrupt(`${s.path}: bitmap directory changed size`, { ref: s.path });
    await s.file.write(this.dir.offset, bytes);
    await s.file.sync();
    this.list.forEach((b) => { if (b.stored) b.stored = entries.shift()!; });
  }

  // ---- helpers ----

  private async change(name: string, removing: boolean, fn: (b: Bitmap) => void | Promise<void>): Promise<void> {
    const s = this.s;
    s.assertWritable();
    await s.lock.exclusive(async () => {
      const b = this.find(name);
      if (!removing) {
        this.usable(b);
        await this.bitsOf(b);
      } else if (b.stored) {
        this.removed.push(b.stored);
      }
      await fn(b);
      await this.storeLocked(false);
    });
  }

  private find(name: string): Bitmap {
    const b = this.list.find((x) => x.name === name);
    if (!b) throw new NotFound(`${this.s.path}: Dirty bitmap '${name}' not found`, { ref: this.s.path, hint: 'list the bitmaps with `img info`' });
    return b;
  }

  private usable(b: Bitmap): void {
    if (b.inconsistent) {
      throw new FailedPrecondition(`${this.s.path}: Bitmap '${b.name}' is inconsistent and cannot be used`, {
        ref: this.s.path,
        hint: 'it was in use when its writer stopped without closing the image, so it may miss writes: remove it (`--remove`) and take a full copy',
      });
    }
  }

  private async bitsOf(b: Bitmap): Promise<Uint8Array> {
    if (b.bits) return b.bits;
    const s = this.s;
    const bytes = bitmapDataBytes(s.h.size, b.granularityBits);
    const out = new Uint8Array(bytes);
    const e = b.stored!;
    const table = await s.file.readExact(e.tableOffset, e.tableSize * 8, 'bitmap table');
    for (let i = 0; i < e.tableSize; i++) {
      const t = decodeTableEntry(table, i);
      if (t.reserved) throw new Corrupt(`${s.path}: bitmap ${JSON.stringify(b.name)}: table entry ${i} is invalid`, { ref: s.path });
      const n = Math.min(s.cs, bytes - i * s.cs);
      if (t.allOnes) out.fill(0xff, i * s.cs, i * s.cs + n);
      else if (t.offset !== 0) {
        if (t.offset % s.cs !== 0 || t.offset + s.cs > s.fileLen) throw new Corrupt(`${s.path}: bitmap ${JSON.stringify(b.name)}: data cluster lies outside the image`, { ref: s.path });
        out.set((await s.file.readExact(t.offset, s.cs, 'bitmap data')).subarray(0, n), i * s.cs);
      }
    }
    b.bits = out;
    return out;
  }

  private extentsLocked(b: Bitmap, offset: number, length: number): ByteRange[] {
    const bits = b.bits!;
    const g = 2 ** b.granularityBits;
    const end = offset + length;
    const out: ByteRange[] = [];
    let i = Math.floor(offset / g);
    const last = Math.ceil(end / g);
    while (i < last) {
      // Skip clean bytes fast.
      if ((i & 7) === 0 && bits[i >> 3] === 0) { i += 8; continue; }
      if (!(bits[i >> 3]! & (1 << (i & 7)))) { i++; continue; }
      const start = i;
      while (i < last && bits[i >> 3]! & (1 << (i & 7))) i++;
      const s0 = Math.max(offset, start * g);
      const e0 = Math.min(end, i * g);
      if (e0 > s0) out.push({ offset: s0, length: e0 - s0 });
    }
    return out;
  }
}

function checkName(name: string, path: string): void {
  const n = typeof name === 'string' ? new TextEncoder().encode(name).length : 0;
  if (n === 0 || n > BITMAP_LIMITS.maxNameSize) {
    throw new InvalidArgument(n === 0 ? `${path}: a bitmap needs a name` : `${path}: Name length exceeds maximum (${BITMAP_LIMITS.maxNameSize} characters)`, { ref: path });
  }
}

/** Set bits first..last inclusive. */
function setBits(bits: Uint8Array, first: number, last: number): void {
  let i = first;
  while (i <= last && (i & 7) !== 0) bits[i >> 3]! |= 1 << (i & 7), i++;
  while (i + 7 <= last) bits[i >> 3] = 0xff, i += 8;
  while (i <= last) bits[i >> 3]! |= 1 << (i & 7), i++;
}
