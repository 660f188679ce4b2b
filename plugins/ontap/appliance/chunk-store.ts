/**
 * The mock appliance's thin storage: a volume (and each of its snapshots) is a map from chunk
 * index to chunk id; chunks are immutable and reference-counted, so a snapshot or a FlexClone
 * is a copy of the map (instant, no data copied) and a write replaces the touched chunks with
 * new ones (copy-on-write). Absent indices read as zeros (thin), and a chunk that becomes all
 * zeros is dropped from the map.
 */
import { existsSync, mkdirSync, readFileSync, readdirSync, renameSync, unlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

/** Chunk index → chunk id. */
export type BlockMap = Map<number, number>;

export interface MapExtent {
  offset: number;
  length: number;
  kind: 'data' | 'zero';
}

export class ChunkStore {
  private readonly chunks = new Map<number, Buffer>();
  private readonly refs = new Map<number, number>();
  private nextId = 1;
  /** Chunks created / released since the last flush (persisted mode only). */
  private readonly unsaved = new Set<number>();
  private readonly released = new Set<number>();

  constructor(
    readonly chunkSize: number,
    private readonly dir?: string,
  ) {
    if (dir) mkdirSync(dir, { recursive: true });
  }

  /**
   * Load the chunks the saved maps reference and rebuild reference counts from those maps
   * (counts are derived, never stored, so they cannot drift). Unreferenced chunk files left by
   * a crash between the state write and the deletion are removed.
   */
  load(maps: Iterable<BlockMap>, nextId: number): void {
    this.nextId = nextId;
    for (const map of maps) for (const id of map.values()) this.refs.set(id, (this.refs.get(id) ?? 0) + 1);
    if (!this.dir) return;
    for (const id of this.refs.keys()) {
      this.chunks.set(id, readFileSync(join(this.dir, String(id))));
    }
    for (const f of readdirSync(this.dir)) {
      const id = Number(f);
      if (!this.refs.has(id)) unlinkSync(join(this.dir, f));
    }
  }

  get nextChunkId(): number {
    return this.nextId;
  }

  /** Bytes held by all chunks (shared chunks counted once). */
  get storedBytes(): number {
    return this.chunks.size * this.chunkSize;
  }

  private add(data: Buffer): number {
    const id = this.nextId++;
    this.chunks.set(id, data);
    this.refs.set(id, 1);
    this.unsaved.add(id);
    return id;
  }

  private unref(id: number): void {
    const n = (this.refs.get(id) ?? 0) - 1;
    if (n > 0) {
      this.refs.set(id, n);
      return;
    }
    this.refs.delete(id);
    this.chunks.delete(id);
    if (this.unsaved.delete(id)) return;
    this.released.add(id);
  }

  /** True when more than one map references the chunk. */
  isShared(id: number): boolean {
    return (this.refs.get(id) ?? 0) > 1;
  }

  /** A new map sharing every chunk of `map` (a snapshot, a FlexClone). */
  copyMap(map: BlockMap): BlockMap {
    for (const id of map.values()) this.refs.set(id, (this.refs.get(id) ?? 0) + 1);
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
    if (id === undefined) return;
    map.set(index, this.add(Buffer.from(this.chunks.get(id)!)));
    this.unref(id);
  }

  read(map: BlockMap, offset: number, length: number): Buffer {
    const out = Buffer.alloc(length);
    const cs = this.chunkSize;
    for (let pos = offset; pos < offset + length; ) {
      const index = Math.floor(pos / cs);
      const within = pos - index * cs;
      const n = Math.min(cs - within, offset + length - pos);
      const id = map.get(index);
      if (id !== undefined) this.chunks.get(id)!.copy(out, pos - offset, within, within + n);
      pos += n;
    }
    return out;
  }

  write(map: BlockMap, offset: number, data: Uint8Array): void {
    const cs = this.chunkSize;
    for (let pos = offset; pos < offset + data.length; ) {
      const index = Math.floor(pos / cs);
      const within = pos - index * cs;
      const n = Math.min(cs - within, offset + data.length - pos);
      const old = map.get(index);
      const chunk = old === undefined ? Buffer.alloc(cs) : Buffer.from(this.chunks.get(old)!);
      chunk.set(data.subarray(pos - offset, pos - offset + n), within);
      if (old !== undefined) this.unref(old);
      if (isZero(chunk)) map.delete(index);
      else map.set(index, this.add(chunk));
      pos += n;
    }
  }

  /** Drop what lies beyond `size` (a shrink), zeroing the tail of a partial last chunk. */
  truncate(map: BlockMap, size: number): void {
    const cs = this.chunkSize;
    for (const index of [...map.keys()]) {
      const start = index * cs;
      if (start >= size) {
        this.unref(map.get(index)!);
        map.delete(index);
      } else if (start + cs > size) {
        this.write(map, size, Buffer.alloc(start + cs - size));
      }
    }
  }

  /** Allocated ranges of `map` within [offset, offset+length), merged, in order. */
  extents(map: BlockMap, offset: number, length: number): MapExtent[] {
    const cs = this.chunkSize;
    const end = offset + length;
    const out: MapExtent[] = [];
    const indices = [...map.keys()].sort((a, b) => a - b);
    for (const index of indices) {
      const s = Math.max(index * cs, offset);
      const t = Math.min(index * cs + cs, end);
      if (t <= s) continue;
      const last = out[out.length - 1];
      if (last && last.offset + last.length === s) last.length += t - s;
      else out.push({ offset: s, length: t - s, kind: 'data' });
    }
    return out;
  }

  allocatedBytes(map: BlockMap): number {
    return map.size * this.chunkSize;
  }

  /** Persist new chunks (temp + rename) before the state that references them is written. */
  writeNewChunks(): void {
    if (!this.dir) return;
    for (const id of this.unsaved) {
      const data = this.chunks.get(id);
      if (!data) continue;
      const path = join(this.dir, String(id));
      writeFileSync(`${path}.tmp`, data);
      renameSync(`${path}.tmp`, path);
    }
    this.unsaved.clear();
  }

  /** Delete released chunk files, after the state that stopped referencing them is written. */
  deleteReleasedChunks(): void {
    if (!this.dir) {
      this.released.clear();
      return;
    }
    for (const id of this.released) {
      const path = join(this.dir, String(id));
      if (existsSync(path)) unlinkSync(path);
    }
    this.released.clear();
  }
}

function isZero(b: Buffer): boolean {
  for (let i = 0; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}
