/**
 * The mock array's state: volumes and snapshots over a thin chunk store. Copies and snapshots
 * are instant (they copy a chunk map and count references); writes are copy-on-write; destroyed
 * objects linger with `time_remaining` until eradicated. Every mutation runs under one queue and
 * ends by persisting the metadata atomically (temp file + rename), after its chunks are written
 * and before the chunks it replaced are released.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { mkdir, readFile, rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Corrupt } from '../../../core/index.js';
import { ARRAY_NAME, MAX_PROVISIONED, Messages, SECTOR } from '../api/messages.js';
import type { Volume as ApiVolume, VolumeSnapshot as ApiSnapshot, Space } from '../api/schemas.js';
import { CHUNK_SIZE, FileChunkStore, MemoryChunkStore, type ChunkStore } from './chunk-store.js';

/** An error the array answers with: status plus `{errors:[{context, message}]}`. */
export class ApiFault extends Error {
  constructor(readonly status: number, message: string, readonly context?: string) {
    super(message);
  }
}

/** Chunk map value meaning "allocated, reads as zeros" (written zeros, no chunk stored). */
const ZERO = 0;

interface ObjectRecord {
  id: string;
  name: string;
  serial: string;
  created: number;
  /** When it was destroyed (ms), or null. */
  destroyedAt: number | null;
  provisioned: number;
  /** chunk index → chunk id (ZERO for a zero chunk); absent = unallocated. */
  chunks: Map<number, number>;
}
interface VolumeRecord extends ObjectRecord {
  source: { id: string; name: string } | null;
}
interface SnapshotRecord extends ObjectRecord {
  suffix: string;
  volumeId: string;
  volumeName: string;
}

interface PersistedObject extends Omit<ObjectRecord, 'chunks'> { chunks: [number, number][] }
interface Persisted {
  version: 1;
  nextChunk: number;
  volumes: (PersistedObject & { source: VolumeRecord['source'] })[];
  snapshots: (PersistedObject & { suffix: string; volumeId: string; volumeName: string })[];
}

export interface ArrayModelOptions {
  /** Persist here (metadata + chunks); absent = in memory. */
  stateDir?: string;
  /** How long a destroyed object lingers before the array eradicates it itself (24 h on a real array). */
  eradicationDelayMs?: number;
  now?: () => number;
}

export interface ExtentInfo { offset: number; length: number; kind: 'data' | 'zero' }

/** Largest byte range one data-plane request may read or write. */
export const MAX_IO = 64 * 1024 * 1024;

export class ArrayModel {
  private readonly volumes = new Map<string, VolumeRecord>();
  private readonly snapshots = new Map<string, SnapshotRecord>();
  private readonly refs = new Map<number, number>();
  private nextChunk = 1;
  private queue: Promise<unknown> = Promise.resolve();
  private readonly now: () => number;
  private readonly eradicationDelayMs: number;

  private constructor(private readonly store: ChunkStore, private readonly stateDir: string | undefined, opts: ArrayModelOptions) {
    this.now = opts.now ?? Date.now;
    this.eradicationDelayMs = opts.eradicationDelayMs ?? 24 * 3600 * 1000;
  }

  static async open(opts: ArrayModelOptions = {}): Promise<ArrayModel> {
    if (!opts.stateDir) return new ArrayModel(new MemoryChunkStore(), undefined, opts);
    await mkdir(opts.stateDir, { recursive: true });
    const store = new FileChunkStore(join(opts.stateDir, 'chunks'));
    await store.init();
    const model = new ArrayModel(store, opts.stateDir, opts);
    await model.load();
    return model;
  }

  /** Run `fn` alone: the model is one queue, like an array's single management plane. */
  private exclusive<T>(fn: () => Promise<T> | T): Promise<T> {
    const run = this.queue.then(async () => { await this.expire(); return fn(); });
    this.queue = run.catch(() => undefined);
    return run;
  }

  // ---------- queries ----------

  listVolumes(): Promise<ApiVolume[]> {
    return this.exclusive(() => [...this.volumes.values()].sort(byName).map((v) => this.volumeView(v)));
  }

  listSnapshots(): Promise<ApiSnapshot[]> {
    return this.exclusive(() => [...this.snapshots.values()].sort(byName).map((s) => this.snapshotView(s)));
  }

  // ---------- volumes ----------

  createVolume(name: string, provisioned: number): Promise<ApiVolume> {
    return this.exclusive(async () => {
      checkName(name);
      checkSize(provisioned, name);
      this.checkFree(name);
      const v: VolumeRecord = { ...this.newObject(name, provisioned), source: null };
      this.volumes.set(name, v);
      await this.persist();
      return this.volumeView(v);
    });
  }

  /** Copy a volume or snapshot into a new volume, or over an existing one (`overwrite`). */
  copyVolume(name: string, sourceName: string, overwrite: boolean): Promise<ApiVolume> {
    return this.exclusive(async () => {
      const src = this.volumes.get(sourceName) ?? this.snapshots.get(sourceName);
      if (!src) throw new ApiFault(400, Messages.noSuchSource, sourceName);
      if (src.destroyedAt !== null) throw new ApiFault(400, src.name.includes('.') ? Messages.snapshotDestroyed : Messages.volumeDestroyed, sourceName);
      const existing = this.volumes.get(name);
      if (overwrite) {
        if (!existing) throw new ApiFault(400, Messages.volumeNotExist, name);
        if (existing.destroyedAt !== null) throw new ApiFault(400, Messages.volumeDestroyed, name);
        const old = existing.chunks;
        existing.chunks = this.share(src.chunks);
        existing.provisioned = src.provisioned;
        await this.persist();
        await this.release(old.values());
        return this.volumeView(existing);
      }
      checkName(name);
      this.checkFree(name);
      const v: VolumeRecord = { ...this.newObject(name, src.provisioned), source: { id: src.id, name: src.name }, chunks: this.share(src.chunks) };
      this.volumes.set(name, v);
      await this.persist();
      return this.volumeView(v);
    });
  }

  resizeVolume(name: string, provisioned: number, truncate: boolean): Promise<ApiVolume> {
    return this.exclusive(async () => {
      const v = this.liveVolume(name);
      checkSize(provisioned, name);
      if (provisioned < v.provisioned) {
        if (!truncate) throw new ApiFault(400, Messages.truncation, name);
        const released = await this.cut(v, provisioned);
        v.provisioned = provisioned;
        await this.persist();
        await this.release(released);
      } else {
        v.provisioned = provisioned;
        await this.persist();
      }
      return this.volumeView(v);
    });
  }

  /** `destroyed: true` destroys the volume and its snapshots; `false` recovers them. */
  setVolumeDestroyed(name: string, destroyed: boolean): Promise<ApiVolume> {
    return this.exclusive(async () => {
      const v = this.volumes.get(name);
      if (!v) throw new ApiFault(400, Messages.volumeNotExist, name);
      if (destroyed && v.destroyedAt !== null) throw new ApiFault(400, Messages.volumeDestroyed, name);
      const at = destroyed ? this.now() : null;
      v.destroyedAt = at;
      for (const s of this.snapshotsOf(v.id)) s.destroyedAt = at;
      await this.persist();
      return this.volumeView(v);
    });
  }

  eradicateVolume(name: string): Promise<void> {
    return this.exclusive(async () => {
      const v = this.volumes.get(name);
      if (!v) throw new ApiFault(400, Messages.volumeNotExist, name);
      if (v.destroyedAt === null) throw new ApiFault(400, Messages.notDestroyed, name);
      await this.drop([v, ...this.snapshotsOf(v.id)]);
    });
  }

  // ---------- snapshots ----------

  createSnapshot(volumeName: string, suffix: string): Promise<ApiSnapshot> {
    return this.exclusive(async () => {
      const v = this.volumes.get(volumeName);
      if (!v) throw new ApiFault(400, Messages.volumeNotExist, volumeName);
      if (v.destroyedAt !== null) throw new ApiFault(400, Messages.volumeDestroyed, volumeName);
      if (!ARRAY_NAME.test(suffix)) throw new ApiFault(400, Messages.invalidName, suffix);
      const name = `${volumeName}.${suffix}`;
      const existing = this.snapshots.get(name);
      if (existing) throw new ApiFault(400, existing.destroyedAt === null ? Messages.snapshotExists : Messages.snapshotDestroyed, name);
      const s: SnapshotRecord = {
        ...this.newObject(name, v.provisioned), chunks: this.share(v.chunks), suffix, volumeId: v.id, volumeName: v.name,
      };
      this.snapshots.set(name, s);
      await this.persist();
      return this.snapshotView(s);
    });
  }

  setSnapshotDestroyed(name: string, destroyed: boolean): Promise<ApiSnapshot> {
    return this.exclusive(async () => {
      const s = this.snapshots.get(name);
      if (!s) throw new ApiFault(400, Messages.snapshotNotExist, name);
      if (destroyed && s.destroyedAt !== null) throw new ApiFault(400, Messages.snapshotDestroyed, name);
      if (!destroyed && this.volumes.get(s.volumeName)?.destroyedAt !== null) {
        throw new ApiFault(400, Messages.volumeDestroyed, s.volumeName);
      }
      s.destroyedAt = destroyed ? this.now() : null;
      await this.persist();
      return this.snapshotView(s);
    });
  }

  eradicateSnapshot(name: string): Promise<void> {
    return this.exclusive(async () => {
      const s = this.snapshots.get(name);
      if (!s) throw new ApiFault(400, Messages.snapshotNotExist, name);
      if (s.destroyedAt === null) throw new ApiFault(400, Messages.snapshotNotDestroyed, name);
      await this.drop([s]);
    });
  }

  // ---------- data ----------

  /** Size of a readable object (a live volume, or a snapshot for reading). */
  sizeOf(name: string, forWrite: boolean): Promise<number> {
    return this.exclusive(() => this.dataObject(name, forWrite).provisioned);
  }

  read(name: string, offset: number, length: number): Promise<Buffer> {
    return this.exclusive(async () => {
      const o = this.dataObject(name, false);
      checkRange(o, offset, length);
      const out = Buffer.alloc(length);
      for (const { index, from, to } of chunkSpans(offset, length)) {
        const id = o.chunks.get(index);
        if (id === undefined || id === ZERO) continue;
        const chunk = await this.store.read(id);
        chunk.copy(out, index * CHUNK_SIZE + from - offset, from, to);
      }
      return out;
    });
  }

  write(name: string, offset: number, data: Buffer): Promise<void> {
    return this.exclusive(async () => {
      const v = this.dataObject(name, true);
      checkRange(v, offset, data.length);
      const released: number[] = [];
      for (const { index, from, to } of chunkSpans(offset, data.length)) {
        const part = data.subarray(index * CHUNK_SIZE + from - offset, index * CHUNK_SIZE + to - offset);
        let chunk: Buffer;
        if (from === 0 && to === CHUNK_SIZE) {
          chunk = part;
        } else {
          chunk = await this.chunkData(v.chunks.get(index));
          part.copy(chunk, from);
        }
        released.push(...this.replace(v, index, await this.storeChunk(chunk)));
      }
      await this.persist();
      await this.release(released);
    });
  }

  /** Make a range read as zeros; whole chunks become zero chunks without storing anything. */
  writeZeroes(name: string, offset: number, length: number): Promise<void> {
    return this.exclusive(async () => {
      const v = this.dataObject(name, true);
      checkRange(v, offset, length);
      const released: number[] = [];
      for (const { index, from, to } of chunkSpans(offset, length)) {
        let id = ZERO;
        if (from !== 0 || to !== CHUNK_SIZE) {
          const old = v.chunks.get(index);
          if (old === undefined || old === ZERO) continue; // already reads as zeros
          const chunk = await this.chunkData(old);
          chunk.fill(0, from, to);
          id = await this.storeChunk(chunk);
        }
        released.push(...this.replace(v, index, id));
      }
      await this.persist();
      await this.release(released);
    });
  }

  extents(name: string, offset: number, length: number): Promise<{ size: number; extents: ExtentInfo[] }> {
    return this.exclusive(() => {
      const o = this.dataObject(name, false);
      checkRange(o, offset, length, false);
      const end = offset + length;
      const out: ExtentInfo[] = [];
      const indexes = [...o.chunks.keys()].sort((a, b) => a - b);
      for (const index of indexes) {
        const s = Math.max(index * CHUNK_SIZE, offset);
        const t = Math.min((index + 1) * CHUNK_SIZE, end, o.provisioned);
        if (t <= s) continue;
        const kind = o.chunks.get(index) === ZERO ? 'zero' : 'data';
        const last = out[out.length - 1];
        if (last && last.kind === kind && last.offset + last.length === s) last.length += t - s;
        else out.push({ offset: s, length: t - s, kind });
      }
      return { size: o.provisioned, extents: out };
    });
  }

  /** Wait for queued work (used before closing). */
  async idle(): Promise<void> {
    await this.exclusive(() => undefined);
  }

  // ---------- internals ----------

  private newObject(name: string, provisioned: number): ObjectRecord {
    return {
      id: randomUUID(), name, serial: randomBytes(12).toString('hex').toUpperCase(), created: this.now(),
      destroyedAt: null, provisioned, chunks: new Map(),
    };
  }

  private checkFree(name: string): void {
    const v = this.volumes.get(name);
    if (v) throw new ApiFault(400, v.destroyedAt === null ? Messages.volumeExists : Messages.volumeDestroyed, name);
  }

  private liveVolume(name: string): VolumeRecord {
    const v = this.volumes.get(name);
    if (!v) throw new ApiFault(400, Messages.volumeNotExist, name);
    if (v.destroyedAt !== null) throw new ApiFault(400, Messages.volumeDestroyed, name);
    return v;
  }

  /** Data-plane target: a live volume; snapshots too when only reading. */
  private dataObject(name: string, forWrite: boolean): ObjectRecord {
    const s = forWrite ? undefined : this.snapshots.get(name);
    if (s) {
      if (s.destroyedAt !== null) throw new ApiFault(400, Messages.snapshotDestroyed, name);
      return s;
    }
    return this.liveVolume(name);
  }

  private snapshotsOf(volumeId: string): SnapshotRecord[] {
    return [...this.snapshots.values()].filter((s) => s.volumeId === volumeId);
  }

  /** A copy of a chunk map that holds its own references. */
  private share(chunks: Map<number, number>): Map<number, number> {
    for (const id of chunks.values()) if (id !== ZERO) this.refs.set(id, (this.refs.get(id) ?? 0) + 1);
    return new Map(chunks);
  }

  private async chunkData(id: number | undefined): Promise<Buffer> {
    if (id === undefined || id === ZERO) return Buffer.alloc(CHUNK_SIZE);
    return Buffer.from(await this.store.read(id));
  }

  /** Store a chunk (all zeros stores nothing) and return its id with one reference. */
  private async storeChunk(data: Buffer): Promise<number> {
    if (isZero(data)) return ZERO;
    const id = this.nextChunk++;
    await this.store.write(id, data);
    this.refs.set(id, 1);
    return id;
  }

  /** Point `index` at `id`; returns the chunk it replaced, to release after persisting. */
  private replace(o: ObjectRecord, index: number, id: number): number[] {
    const old = o.chunks.get(index);
    o.chunks.set(index, id);
    return old === undefined ? [] : [old];
  }

  /** Drop chunks at or past `size` and zero the tail of a partial last chunk. */
  private async cut(o: ObjectRecord, size: number): Promise<number[]> {
    const released: number[] = [];
    const lastIndex = Math.floor(size / CHUNK_SIZE);
    for (const [index, id] of [...o.chunks]) {
      if (index > lastIndex || (index === lastIndex && size % CHUNK_SIZE === 0)) {
        o.chunks.delete(index);
        released.push(id);
      }
    }
    const tail = size % CHUNK_SIZE;
    const partial = o.chunks.get(lastIndex);
    if (tail !== 0 && partial !== undefined && partial !== ZERO) {
      const chunk = await this.chunkData(partial);
      chunk.fill(0, tail);
      released.push(...this.replace(o, lastIndex, await this.storeChunk(chunk)));
    }
    return released;
  }

  private async release(ids: Iterable<number>): Promise<void> {
    for (const id of ids) {
      if (id === ZERO) continue;
      const n = (this.refs.get(id) ?? 1) - 1;
      if (n > 0) { this.refs.set(id, n); continue; }
      this.refs.delete(id);
      await this.store.remove(id);
    }
  }

  private async drop(objects: ObjectRecord[]): Promise<void> {
    for (const o of objects) {
      if (this.volumes.get(o.name) === o) this.volumes.delete(o.name);
      if (this.snapshots.get(o.name) === o) this.snapshots.delete(o.name);
    }
    await this.persist();
    for (const o of objects) await this.release(o.chunks.values());
  }

  /** Eradicate what has been destroyed for longer than the eradication delay (lazily). */
  private async expire(): Promise<void> {
    const now = this.now();
    const due = [...this.volumes.values(), ...this.snapshots.values()]
      .filter((o) => o.destroyedAt !== null && o.destroyedAt + this.eradicationDelayMs <= now);
    if (due.length > 0) await this.drop(due);
  }

  private timeRemaining(o: ObjectRecord): number | null {
    return o.destroyedAt === null ? null : Math.max(0, o.destroyedAt + this.eradicationDelayMs - this.now());
  }

  private space(o: ObjectRecord): Space {
    let virtual = 0;
    let unique = 0;
    for (const id of o.chunks.values()) {
      if (id === ZERO) continue;
      virtual += CHUNK_SIZE;
      if (this.refs.get(id) === 1) unique += CHUNK_SIZE;
    }
    virtual = Math.min(virtual, o.provisioned);
    unique = Math.min(unique, o.provisioned);
    return {
      data_reduction: 1, snapshots: 0, thin_provisioning: o.provisioned ? 1 - virtual / o.provisioned : 0,
      total_physical: unique, total_provisioned: o.provisioned, unique, virtual,
    };
  }

  private volumeView(v: VolumeRecord): ApiVolume {
    return {
      id: v.id, name: v.name, serial: v.serial, created: v.created, destroyed: v.destroyedAt !== null,
      time_remaining: this.timeRemaining(v), provisioned: v.provisioned, source: v.source ? { ...v.source } : null,
      subtype: 'regular', connection_count: 0, space: this.space(v),
    };
  }

  private snapshotView(s: SnapshotRecord): ApiSnapshot {
    return {
      id: s.id, name: s.name, suffix: s.suffix, serial: s.serial, created: s.created, destroyed: s.destroyedAt !== null,
      time_remaining: this.timeRemaining(s), provisioned: s.provisioned, source: { id: s.volumeId, name: s.volumeName },
      space: this.space(s),
    };
  }

  // ---------- persistence ----------

  private async persist(): Promise<void> {
    if (!this.stateDir) return;
    const out = (o: ObjectRecord): PersistedObject => ({
      id: o.id, name: o.name, serial: o.serial, created: o.created, destroyedAt: o.destroyedAt, provisioned: o.provisioned,
      chunks: [...o.chunks],
    });
    const doc: Persisted = {
      version: 1, nextChunk: this.nextChunk,
      volumes: [...this.volumes.values()].map((v) => ({ ...out(v), source: v.source })),
      snapshots: [...this.snapshots.values()].map((s) => ({ ...out(s), suffix: s.suffix, volumeId: s.volumeId, volumeName: s.volumeName })),
    };
    const file = join(this.stateDir, 'array.json');
    const tmp = `${file}.tmp`;
    await writeFile(tmp, JSON.stringify(doc));
    await rename(tmp, file);
  }

  private async load(): Promise<void> {
    const file = join(this.stateDir!, 'array.json');
    let text: string;
    try {
      text = await readFile(file, 'utf8');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw e;
    }
    let doc: Persisted;
    try {
      doc = JSON.parse(text) as Persisted;
      if (doc.version !== 1 || !Array.isArray(doc.volumes) || !Array.isArray(doc.snapshots)) throw new Error(`unknown state version ${String(doc.version)}`);
    } catch (e) {
      throw new Corrupt(`the mock array's state ${file} is damaged: ${(e as Error).message}`, {
        ref: file, hint: 'move the state folder away to start with an empty array',
      });
    }
    this.nextChunk = doc.nextChunk;
    for (const v of doc.volumes) this.volumes.set(v.name, { ...v, chunks: this.share(new Map(v.chunks)) });
    for (const s of doc.snapshots) this.snapshots.set(s.name, { ...s, chunks: this.share(new Map(s.chunks)) });
    // Chunks written by a mutation that crashed before persisting belong to nothing: sweep them.
    for (const id of await this.store.list()) {
      if (!this.refs.has(id)) await this.store.remove(id);
      if (id >= this.nextChunk) this.nextChunk = id + 1;
    }
  }
}

function byName(a: { name: string }, b: { name: string }): number {
  return a.name < b.name ? -1 : a.name > b.name ? 1 : 0;
}

function checkName(name: string): void {
  if (!ARRAY_NAME.test(name)) throw new ApiFault(400, Messages.invalidName, name);
}

function checkSize(provisioned: number, name: string): void {
  if (!Number.isSafeInteger(provisioned) || provisioned <= 0 || provisioned % SECTOR !== 0 || provisioned > MAX_PROVISIONED) {
    throw new ApiFault(400, Messages.invalidSize, name);
  }
}

/** A byte range of an object; `io` ranges (reads and writes) are also capped in size, extents queries are not. */
function checkRange(o: ObjectRecord, offset: number, length: number, io = true): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > o.provisioned) {
    throw new ApiFault(416, `Range ${offset}+${length} is outside the volume (${o.provisioned} bytes).`, o.name);
  }
  if (io && length > MAX_IO) throw new ApiFault(400, `Range too large: at most ${MAX_IO} bytes per request.`, o.name);
}

/** The chunks a byte range touches, with the [from, to) part of each. */
function* chunkSpans(offset: number, length: number): Generator<{ index: number; from: number; to: number }> {
  let pos = offset;
  const end = offset + length;
  while (pos < end) {
    const index = Math.floor(pos / CHUNK_SIZE);
    const from = pos - index * CHUNK_SIZE;
    const to = Math.min(CHUNK_SIZE, end - index * CHUNK_SIZE);
    yield { index, from, to };
    pos = index * CHUNK_SIZE + to;
  }
}

const ZEROS = Buffer.alloc(CHUNK_SIZE);
function isZero(b: Buffer): boolean {
  return b.length <= CHUNK_SIZE && ZEROS.subarray(0, b.length).equals(b);
}
