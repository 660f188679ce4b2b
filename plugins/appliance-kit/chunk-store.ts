/**
 * The mock appliances' thin, copy-on-write storage. A volume (or a snapshot, a clone) is a map
 * from chunk index to chunk id; chunks are immutable and reference-counted, so a snapshot or a
 * clone is a copy of the map (instant, no data copied) and a write replaces the chunks it touches
 * with new ones. Absent indices are unallocated and read as zeros; a chunk that a write leaves all
 * zeros is dropped (thin), and `zero` marks whole chunks ZERO_CHUNK: allocated, reading as zeros,
 * nothing stored — what an array reports as a `zero` extent.
 *
 * With a folder, the store is crash-safe under one protocol: `writeNewChunks()` (each chunk file
 * temp + rename), then the caller writes its state that references them, then
 * `deleteReleasedChunks()`. Whatever a crash leaves between those steps is unreferenced, and
 * `load` sweeps it. Only chunks not yet written are held in memory; the others are read from
 * their files, so memory does not grow with the data.
 */
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Corrupt } from '../../core/index.js';

/** Chunk index → chunk id (or ZERO_CHUNK). */
export type BlockMap = Map<number, number>;

/** A map value meaning "allocated, reads as zeros": no chunk is stored for it. */
export const ZERO_CHUNK = 0;

export interface MapExtent {
  offset: number;
  length: number;
  kind: 'data' | 'zero';
}

/** A byte range: `[offset, offset + length)`. */
export interface ByteSpan {
  offset: number;
  length: number;
}

/**
 * The byte ranges within `[offset, offset+length)` where two block maps of one store may read
 * differently: the chunks whose ids differ, merged where adjacent and clipped to the range. Absent
 * and ZERO_CHUNK both read as zeros, so one against the other is no change; two different ids
 * count as a change even if their bytes happen to match (over-reporting is allowed, missing a
 * change is not). Pure: reads the maps only. The caller clips the range to the object's size.
 */
export function diffMaps(a: BlockMap, b: BlockMap, chunkSize: number, offset: number, length: number): ByteSpan[] {
  const end = offset + length;
  if (length <= 0) return [];
  const first = Math.floor(offset / chunkSize);
  const last = Math.ceil(end / chunkSize); // exclusive
  const norm = (id: number | undefined) => (id === ZERO_CHUNK ? undefined : id);
  const changed = new Set<number>();
  // Walk whichever is smaller: the maps' entries, or the chunk indices of the range.
  if (a.size + b.size < last - first) {
    for (const m of [a, b]) {
      for (const index of m.keys()) {
        if (index >= first && index < last && norm(a.get(index)) !== norm(b.get(index))) changed.add(index);
      }
    }
  } else {
    for (let index = first; index < last; index++) if (norm(a.get(index)) !== norm(b.get(index))) changed.add(index);
  }
  const out: ByteSpan[] = [];
  for (const index of [...changed].sort((x, y) => x - y)) {
    const s = Math.max(index * chunkSize, offset);
    const t = Math.min(index * chunkSize + chunkSize, end);
    const prev = out[out.length - 1];
    if (prev && prev.offset + prev.length === s) prev.length += t - s;
    else out.push({ offset: s, length: t - s });
  }
  return out;
}

/**
 * Widen spans to whole `unit`s (a coarser granularity than the one they were found at), merge
 * what then touches or overlaps, and clip the result to `[offset, offset+length)`.
 */
export function coarsenSpans(spans: readonly ByteSpan[], unit: number, offset: number, length: number): ByteSpan[] {
  const end = offset + length;
  const out: ByteSpan[] = [];
  for (const sp of spans) {
    const s = Math.max(offset, Math.floor(sp.offset / unit) * unit);
    const t = Math.min(end, Math.ceil((sp.offset + sp.length) / unit) * unit);
    if (t <= s) continue;
    const prev = out[out.length - 1];
    if (prev && prev.offset + prev.length >= s) prev.length = Math.max(prev.offset + prev.length, t) - prev.offset;
    else out.push({ offset: s, length: t - s });
  }
  return out;
}

/** Chunk files are named by id; `.tmp` ones are writes a crash interrupted. */
const CHUNK_FILE = /^(\d+)(\.tmp)?$/;
/** How the FlashArray mock named its chunk files before the kit (`N.chunk`): renamed on load. */
const OLD_CHUNK_FILE = /^(\d+)\.chunk$/;

/** Reference-counted, immutable chunks shared by block maps (see the file header). */
export class ChunkStore {
  /** In memory: every chunk. With a folder: the chunks not written to it yet. */
  private readonly held = new Map<number, Buffer>();
  private readonly refs = new Map<number, number>();
  /** Written chunks nothing refers to any more: their files go after the next state write. */
  private readonly released = new Set<number>();
  private readonly zeros: Buffer;
  private nextId = 1;

  constructor(
    readonly chunkSize: number,
    private readonly dir?: string,
  ) {
    this.zeros = Buffer.alloc(chunkSize);
    if (dir) mkdirSync(dir, { recursive: true });
  }

  /**
   * Rebuild reference counts from the saved maps (counts are derived, never stored, so they
   * cannot drift) and sweep chunk files nothing refers to. A referenced chunk whose file is
   * missing makes the state Corrupt.
   */
  load(maps: Iterable<BlockMap>, nextId: number): void {
    this.nextId = nextId;
    for (const map of maps) this.share(map);
    if (!this.dir) return;
    const present = new Set<number>();
    for (const old of readdirSync(this.dir)) {
      const o = OLD_CHUNK_FILE.exec(old);
      if (o && !existsSync(join(this.dir, o[1]!))) renameSync(join(this.dir, old), join(this.dir, o[1]!));
    }
    for (const name of readdirSync(this.dir)) {
      const m = CHUNK_FILE.exec(name);
      if (!m) continue; // not ours: never delete what the store did not write
      const id = Number(m[1]);
      if (m[2] || !this.refs.has(id)) rmSync(join(this.dir, name), { force: true });
      else present.add(id);
    }
    for (const id of this.refs.keys()) {
      if (!present.has(id)) {
        throw new Corrupt(`chunk ${id} of the mock's saved state is missing from ${this.dir}`, {
          ref: this.dir,
          hint: 'move the state folder away to start with an empty appliance',
        });
      }
      if (id >= this.nextId) this.nextId = id + 1;
    }
  }

  /** The id the next new chunk gets (saved with the state, handed back to `load`). */
  get nextChunkId(): number {
    return this.nextId;
  }

  /** Bytes held by all chunks (shared chunks counted once). */
  get storedBytes(): number {
    return this.refs.size * this.chunkSize;
  }

  /** True when more than one map references the chunk. */
  isShared(id: number): boolean {
    return (this.refs.get(id) ?? 0) > 1;
  }

  /** A new map sharing every chunk of `map` (a snapshot, a clone, a copy). */
  copyMap(map: BlockMap): BlockMap {
    this.share(map);
    return new Map(map);
  }

  /** Release every chunk of a map that is going away. */
  dropMap(map: BlockMap): void {
    for (const id of map.values()) this.unref(id);
    map.clear();
  }

  /** Replace chunk `index` of `map` with a private copy (what a clone split does). */
  copyChunk(map: BlockMap, index: number): void {
    const id = map.get(index);
    if (id === undefined || id === ZERO_CHUNK) return;
    map.set(index, this.add(Buffer.from(this.data(id))));
    this.unref(id);
  }

  read(map: BlockMap, offset: number, length: number): Buffer {
    const out = Buffer.alloc(length);
    for (const { index, from, to } of this.spans(offset, length)) {
      const id = map.get(index);
      if (id !== undefined && id !== ZERO_CHUNK) this.data(id).copy(out, index * this.chunkSize + from - offset, from, to);
    }
    return out;
  }

  write(map: BlockMap, offset: number, data: Uint8Array): void {
    const cs = this.chunkSize;
    for (const { index, from, to } of this.spans(offset, data.length)) {
      const part = data.subarray(index * cs + from - offset, index * cs + to - offset);
      // A whole-chunk write needs nothing of the old chunk.
      const chunk = from === 0 && to === cs ? Buffer.from(part) : this.contents(map.get(index));
      if (from !== 0 || to !== cs) chunk.set(part, from);
      this.replace(map, index, chunk.equals(this.zeros) ? undefined : this.add(chunk));
    }
  }

  /** Make a range read as zeros: whole chunks become ZERO_CHUNK, partial ones are rewritten. */
  zero(map: BlockMap, offset: number, length: number): void {
    for (const { index, from, to } of this.spans(offset, length)) {
      const old = map.get(index);
      if (from === 0 && to === this.chunkSize) {
        this.replace(map, index, ZERO_CHUNK);
        continue;
      }
      if (old === undefined || old === ZERO_CHUNK) continue; // already reads as zeros
      const chunk = this.contents(old);
      chunk.fill(0, from, to);
      this.replace(map, index, chunk.equals(this.zeros) ? ZERO_CHUNK : this.add(chunk));
    }
  }

  /** Drop what lies at or beyond `size` (a shrink), zeroing the tail of a partial last chunk. */
  truncate(map: BlockMap, size: number): void {
    const cs = this.chunkSize;
    for (const index of [...map.keys()]) {
      const start = index * cs;
      if (start >= size) this.replace(map, index, undefined);
      else if (start + cs > size) this.write(map, size, this.zeros.subarray(0, start + cs - size));
    }
  }

  /** Allocated ranges of `map` within [offset, offset+length), in order, adjacent ones of a kind merged. */
  extents(map: BlockMap, offset: number, length: number): MapExtent[] {
    const cs = this.chunkSize;
    const end = offset + length;
    const out: MapExtent[] = [];
    for (const index of [...map.keys()].sort((a, b) => a - b)) {
      const s = Math.max(index * cs, offset);
      const t = Math.min(index * cs + cs, end);
      if (t <= s) continue;
      const kind = map.get(index) === ZERO_CHUNK ? 'zero' : 'data';
      const last = out[out.length - 1];
      if (last && last.kind === kind && last.offset + last.length === s) last.length += t - s;
      else out.push({ offset: s, length: t - s, kind });
    }
    return out;
  }

  /** Where `a` and `b` may read differently within the range, in whole chunks (see `diffMaps`). */
  diff(a: BlockMap, b: BlockMap, offset: number, length: number): ByteSpan[] {
    return diffMaps(a, b, this.chunkSize, offset, length);
  }

  /** Bytes of `map` that hold data (ZERO_CHUNK entries store nothing). */
  allocatedBytes(map: BlockMap): number {
    let n = 0;
    for (const id of map.values()) if (id !== ZERO_CHUNK) n++;
    return n * this.chunkSize;
  }

  /** Bytes of `map` held by no other map. */
  uniqueBytes(map: BlockMap): number {
    let n = 0;
    for (const id of map.values()) if (id !== ZERO_CHUNK && !this.isShared(id)) n++;
    return n * this.chunkSize;
  }

  /** Write the chunks made since the last call (temp + rename), before the state that references them. */
  writeNewChunks(): void {
    if (!this.dir) return;
    for (const [id, data] of this.held) {
      const path = join(this.dir, String(id));
      writeFileSync(`${path}.tmp`, data);
      renameSync(`${path}.tmp`, path);
    }
    this.held.clear();
  }

  /** Delete the files of released chunks, after the state that stopped referencing them is written. */
  deleteReleasedChunks(): void {
    if (this.dir) for (const id of this.released) rmSync(join(this.dir, String(id)), { force: true });
    this.released.clear();
  }

  private share(map: BlockMap): void {
    for (const id of map.values()) if (id !== ZERO_CHUNK) this.refs.set(id, (this.refs.get(id) ?? 0) + 1);
  }

  private add(data: Buffer): number {
    const id = this.nextId++;
    this.held.set(id, data);
    this.refs.set(id, 1);
    return id;
  }

  private unref(id: number): void {
    if (id === ZERO_CHUNK) return;
    const n = (this.refs.get(id) ?? 0) - 1;
    if (n > 0) {
      this.refs.set(id, n);
      return;
    }
    this.refs.delete(id);
    // A chunk never written needs no file deleted; a written one waits for the next state write.
    if (!this.held.delete(id) && this.dir) this.released.add(id);
  }

  /** Point `index` at `id` (or unallocate it), releasing the chunk it replaces. */
  private replace(map: BlockMap, index: number, id: number | undefined): void {
    const old = map.get(index);
    if (id === undefined) map.delete(index);
    else map.set(index, id);
    if (old !== undefined) this.unref(old);
  }

  private data(id: number): Buffer {
    const held = this.held.get(id);
    if (held) return held;
    if (!this.dir) throw new Error(`chunk ${id} is missing from the store`);
    return readFileSync(join(this.dir, String(id)));
  }

  /** A private, full-size copy of what an index holds (zeros when unallocated). */
  private contents(id: number | undefined): Buffer {
    return id === undefined || id === ZERO_CHUNK ? Buffer.alloc(this.chunkSize) : Buffer.from(this.data(id));
  }

  /** The chunks a byte range touches, with the [from, to) part of each. */
  private *spans(offset: number, length: number): Generator<{ index: number; from: number; to: number }> {
    const cs = this.chunkSize;
    const end = offset + length;
    for (let pos = offset; pos < end; ) {
      const index = Math.floor(pos / cs);
      const from = pos - index * cs;
      const to = Math.min(cs, end - index * cs);
      yield { index, from, to };
      pos = index * cs + to;
    }
  }
}
