/**
 * The mock array's state: volumes and snapshots over the appliance kit's thin chunk store.
 * Copies and snapshots are instant (they copy a chunk map, sharing its chunks); writes are
 * copy-on-write; destroyed objects linger with `time_remaining` until eradicated. Every mutation
 * runs under one queue and ends by persisting: new chunks, then the metadata (temp file +
 * rename), then the files of the chunks it released.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { mkdir, readFile, rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Corrupt } from '../../../core/index.js';
import { ChunkStore, coarsenSpans, type BlockMap, type ByteSpan, type MapExtent } from '../../appliance-kit/index.js';
import { ARRAY_NAME, MAX_PROVISIONED, Messages, SECTOR } from '../api/messages.js';
import type { Volume as ApiVolume, VolumeSnapshot as ApiSnapshot, Space } from '../api/schemas.js';

/** An error the array answers with: status plus `{errors:[{context, message}]}`. */
export class ApiFault extends Error {
  constructor(readonly status: number, message: string, readonly context?: string) {
    super(message);
  }
}

/** 64 KiB: small enough that a 512-byte write copies little, large enough to keep maps short. */
export const CHUNK_SIZE = 64 * 1024;

interface ObjectRecord {
  id: string;
  name: string;
  serial: string;
  created: number;
  /** When it was destroyed (ms), or null. */
  destroyedAt: number | null;
  provisioned: number;
  /** chunk index → chunk id; absent = unallocated. */
  chunks: BlockMap;
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

/** Largest byte range one data-plane request may read or write. */
export const MAX_IO = 64 * 1024 * 1024;

/** The mock array's state and rules (volumes, snapshots, destroy/eradicate, data), independent of HTTP. */
export class ArrayModel {
  private readonly volumes = new Map<string, VolumeRecord>();
  private readonly snapshots = new Map<string, SnapshotRecord>();
  private queue: Promise<unknown> = Promise.resolve();
  private readonly now: () => number;
  private readonly eradicationDelayMs: number;

  private constructor(private readonly store: ChunkStore, private readonly stateDir: string | undefined, opts: ArrayModelOptions) {
    this.now = opts.now ?? Date.now;
    this.eradicationDelayMs = opts.eradicationDelayMs ?? 24 * 3600 * 1000;
  }

  static async open(opts: ArrayModelOptions = {}): Promise<ArrayModel> {
    if (!opts.stateDir) return new ArrayModel(new ChunkStore(CHUNK_SIZE), undefined, opts);
    await mkdir(opts.stateDir, { recursive: true });
    const model = new ArrayModel(new ChunkStore(CHUNK_SIZE, join(opts.stateDir, 'chunks')), opts.stateDir, opts);
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
        existing.chunks = this.store.copyMap(src.chunks);
        existing.provisioned = src.provisioned;
        this.store.dropMap(old);
        await this.persist();
        return this.volumeView(existing);
      }
      checkName(name);
      this.checkFree(name);
      const v: VolumeRecord = { ...this.newObject(name, src.provisioned), source: { id: src.id, name: src.name }, chunks: this.store.copyMap(src.chunks) };
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
        this.store.truncate(v.chunks, provisioned);
      }
      v.provisioned = provisioned;
      await this.persist();
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
        ...this.newObject(name, v.provisioned), chunks: this.store.copyMap(v.chunks), suffix, volumeId: v.id, volumeName: v.name,
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
    return this.exclusive(() => {
      const o = this.dataObject(name, false);
      checkRange(o, offset, length);
      return this.store.read(o.chunks, offset, length);
    });
  }

  write(name: string, offset: number, data: Buffer): Promise<void> {
    return this.exclusive(async () => {
      const v = this.dataObject(name, true);
      checkRange(v, offset, data.length);
      this.store.write(v.chunks, offset, data);
      await this.persist();
    });
  }

  /** Make a range read as zeros; whole chunks become zero chunks without storing anything. */
  writeZeroes(name: string, offset: number, length: number): Promise<void> {
    return this.exclusive(async () => {
      const v = this.dataObject(name, true);
      checkRange(v, offset, length);
      this.store.zero(v.chunks, offset, length);
      await this.persist();
    });
  }

  extents(name: string, offset: number, length: number): Promise<{ size: number; extents: MapExtent[] }> {
    return this.exclusive(() => {
      const o = this.dataObject(name, false);
      checkRange(o, offset, length, false);
      return { size: o.provisioned, extents: this.store.extents(o.chunks, offset, length) };
    });
  }

  /**
   * Changed-block tracking: the ranges of `name` (a volume, or a snapshot `vol.suffix`) that may
   * differ from the snapshot `baseName`, within the segment (clipped to the object's size), in
   * whole `blockSize` units (at least one chunk: the array tracks changes per chunk). The base
   * must be a snapshot of the same volume, taken no later than the compared snapshot.
   */
  diff(name: string, baseName: string, segment: { offset: number; length?: number }, blockSize: number): Promise<{ provisioned: number; blockSize: number; ranges: ByteSpan[] }> {
    return this.exclusive(() => {
      if (name.includes('.') && !this.snapshots.has(name)) throw new ApiFault(400, Messages.snapshotNotExist, name);
      const target = this.dataObject(name, false);
      const base = this.snapshots.get(baseName);
      if (!base) throw new ApiFault(400, Messages.snapshotNotExist, baseName);
      if (base.destroyedAt !== null) throw new ApiFault(400, Messages.snapshotDestroyed, baseName);
      const targetSnap = this.snapshots.get(name) === target ? (target as SnapshotRecord) : undefined;
      const volumeId = targetSnap ? targetSnap.volumeId : target.id;
      if (base.volumeId !== volumeId) throw new ApiFault(400, Messages.diffBaseLineage, baseName);
      if (targetSnap && this.takenAfter(base, targetSnap)) throw new ApiFault(400, Messages.diffBaseNewer, baseName);
      const unit = Math.max(blockSize, CHUNK_SIZE);
      const from = Math.min(segment.offset, target.provisioned);
      const to = segment.length === undefined ? target.provisioned : Math.min(target.provisioned, from + segment.length);
      const ranges = coarsenSpans(this.store.diff(base.chunks, target.chunks, from, to - from), unit, from, to - from);
      return { provisioned: target.provisioned, blockSize: unit, ranges };
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

  /** Data-plane target: a live volume; snapshots too when only reading (a write to one is refused). */
  private dataObject(name: string, forWrite: boolean): ObjectRecord {
    const s = this.snapshots.get(name);
    if (s) {
      if (s.destroyedAt !== null) throw new ApiFault(400, Messages.snapshotDestroyed, name);
      if (forWrite) throw new ApiFault(400, Messages.snapshotReadOnly, name);
      return s;
    }
    return this.liveVolume(name);
  }

  /**
   * Snapshots are kept in the order they were taken: the map's insertion order, which the saved
   * state keeps too (a name freed by eradication and taken again goes to the end).
   */
  private takenAfter(a: SnapshotRecord, b: SnapshotRecord): boolean {
    for (const s of this.snapshots.values()) {
      if (s === b) return a !== b;
      if (s === a) return false;
    }
    return false;
  }

  private snapshotsOf(volumeId: string): SnapshotRecord[] {
    return [...this.snapshots.values()].filter((s) => s.volumeId === volumeId);
  }

  private async drop(objects: ObjectRecord[]): Promise<void> {
    for (const o of objects) {
      if (this.volumes.get(o.name) === o) this.volumes.delete(o.name);
      if (this.snapshots.get(o.name) === o) this.snapshots.delete(o.name);
      this.store.dropMap(o.chunks);
    }
    await this.persist();
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
    const virtual = Math.min(this.store.allocatedBytes(o.chunks), o.provisioned);
    const unique = Math.min(this.store.uniqueBytes(o.chunks), o.provisioned);
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

  /** New chunks first, then the metadata that references them, then the files of released chunks. */
  private async persist(): Promise<void> {
    if (!this.stateDir) return;
    this.store.writeNewChunks();
    const out = (o: ObjectRecord): PersistedObject => ({
      id: o.id, name: o.name, serial: o.serial, created: o.created, destroyedAt: o.destroyedAt, provisioned: o.provisioned,
      chunks: [...o.chunks],
    });
    const doc: Persisted = {
      version: 1, nextChunk: this.store.nextChunkId,
      volumes: [...this.volumes.values()].map((v) => ({ ...out(v), source: v.source })),
      snapshots: [...this.snapshots.values()].map((s) => ({ ...out(s), suffix: s.suffix, volumeId: s.volumeId, volumeName: s.volumeName })),
    };
    const file = join(this.stateDir, 'array.json');
    const tmp = `${file}.tmp`;
    await writeFile(tmp, JSON.stringify(doc));
    await rename(tmp, file);
    this.store.deleteReleasedChunks();
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
    for (const v of doc.volumes) this.volumes.set(v.name, { ...v, chunks: new Map(v.chunks) });
    for (const s of doc.snapshots) this.snapshots.set(s.name, { ...s, chunks: new Map(s.chunks) });
    // Chunks left by a mutation that crashed before or after persisting belong to nothing: the store sweeps them.
    this.store.load([...this.volumes.values(), ...this.snapshots.values()].map((o) => o.chunks), doc.nextChunk);
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
