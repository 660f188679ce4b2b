/**
 * A test-only backend that keeps everything in memory: volumes as chunk maps that share chunks by
 * reference (snapshots, linked and full clones are instant; writes replace chunks, never mutate
 * them), a data path, and a stream job. It exists to run the contract suite and the broker's
 * tests without any shipped plugin; it is not shipped.
 */
import { ContainerModule } from 'inversify';
import { z } from 'zod';
import {
  AlreadyExists, BackendFactory, CAPABILITIES, CapabilitySet, FailedPrecondition, InvalidArgument, NotFound, OutOfRange,
  type BlockDevice, type Capability, type CreateVolumeRequest, type Extent, type JobTask, type Page, type PageRequest,
  type Snapshot, type StorageBackend, type Volume,
} from '../../core/index.js';

const CHUNK = 4096;

type Chunks = Map<number, Uint8Array>;
interface Layer { chunks: Chunks; size: number }
interface MemSnapshot extends Layer { name: string; createdAt: string }
interface MemVolume extends Layer {
  name: string;
  createdAt: string;
  owner?: string;
  /** A linked clone reads what it has not written from here. */
  parent?: { volume: string; snapshot: string };
  /** What a full clone was copied from: asking for the name again is the same volume only with the same source. */
  origin?: { volume: string; snapshot?: string };
  snapshots: Map<string, MemSnapshot>;
}

export const memoryConfigSchema = z.strictObject({
  name: z.string(),
  kind: z.literal('memory'),
  capabilities: z.array(z.enum(CAPABILITIES)).optional(),
  pageSize: z.number().int().positive().default(3),
  maxSizeBytes: z.number().int().positive().default(2 ** 40),
  /** Delay per chunk in stream jobs, so tests can act while one runs. */
  streamDelayMs: z.number().int().nonnegative().default(0),
  secret: z.string().optional(),
});
export type MemoryConfig = z.infer<typeof memoryConfigSchema>;

export class MemoryBackend implements StorageBackend {
  readonly kind = 'memory';
  private readonly volumes = new Map<string, MemVolume>();
  private readonly caps: CapabilitySet;
  /** How many bytes were copied by data-moving operations (to assert that clones are instant). */
  bytesCopied = 0;

  constructor(readonly name: string, private readonly cfg: MemoryConfig) {
    const names: Capability[] = cfg.capabilities ?? [...CAPABILITIES].filter((c) => c !== 'chain.commit' && c !== 'data.dirty');
    this.caps = new CapabilitySet(names.map((n) => (n === 'volume.create' ? [n, { maxSizeBytes: cfg.maxSizeBytes }] : n)));
  }

  async capabilities(): Promise<CapabilitySet> {
    return this.caps;
  }

  async createVolume(req: CreateVolumeRequest): Promise<Volume> {
    if (req.sizeBytes !== undefined || !req.source) this.checkSize(req.sizeBytes, req.name);
    const existing = this.volumes.get(req.name);
    if (req.source) return this.clone(req, existing);
    if (existing) {
      if (existing.size === req.sizeBytes && !existing.parent && !existing.origin) return this.view(existing);
      throw new AlreadyExists(`volume ${this.name}/${req.name} already exists with ${existing.size} bytes`, { ref: `${this.name}/${req.name}` });
    }
    await tick();
    if (this.volumes.has(req.name)) return this.createVolume(req);
    const vol: MemVolume = { name: req.name, size: req.sizeBytes!, chunks: new Map(), snapshots: new Map(), createdAt: new Date().toISOString(), ...(req.owner ? { owner: req.owner } : {}) };
    this.volumes.set(req.name, vol);
    return this.view(vol);
  }

  private async clone(req: CreateVolumeRequest, existing: MemVolume | undefined): Promise<Volume> {
    const src = this.mustGet(req.source!.volume);
    const layer: Layer = req.source!.snapshot ? this.mustSnap(src, req.source!.snapshot) : src;
    const size = req.sizeBytes ?? layer.size;
    if (size < layer.size) throw new OutOfRange(`clone size ${size} is smaller than its source's ${layer.size} bytes`);
    const linked = req.mode === 'linked';
    if (existing) {
      const same = existing.size === size && (linked
        ? existing.parent?.volume === src.name && (req.source!.snapshot === undefined || existing.parent?.snapshot === req.source!.snapshot)
        : existing.origin?.volume === src.name && existing.origin.snapshot === req.source!.snapshot);
      if (same) return this.view(existing);
      throw new AlreadyExists(`volume ${this.name}/${req.name} already exists`, { ref: `${this.name}/${req.name}` });
    }
    const vol: MemVolume = { name: req.name, size, chunks: new Map(), snapshots: new Map(), createdAt: new Date().toISOString() };
    if (linked) {
      // A linked clone of a volume is taken from a hidden snapshot of it, as appliances do.
      let snap = req.source!.snapshot;
      if (snap === undefined) {
        snap = `clone-${req.name}`;
        src.snapshots.set(snap, { name: snap, size: src.size, chunks: new Map(src.chunks), createdAt: new Date().toISOString() });
      }
      vol.parent = { volume: src.name, snapshot: snap };
    } else {
      vol.chunks = new Map(layer.chunks);
      vol.origin = { volume: src.name, ...(req.source!.snapshot === undefined ? {} : { snapshot: req.source!.snapshot }) };
    }
    this.volumes.set(req.name, vol);
    return this.view(vol);
  }

  async getVolume(name: string): Promise<Volume | undefined> {
    const v = this.volumes.get(name);
    return v && this.view(v);
  }

  async listVolumes(page?: PageRequest): Promise<Page<Volume>> {
    const names = [...this.volumes.keys()].sort();
    let start = 0;
    if (page?.token !== undefined) {
      const after = Buffer.from(page.token, 'base64url').toString();
      // Only a token this backend issued: a volume name, base64url-encoded.
      if (!after || Buffer.from(after).toString('base64url') !== page.token) throw new InvalidArgument(`invalid page token "${page.token}"`);
      start = names.findIndex((n) => n > after);
      if (start < 0) start = names.length;
    }
    const limit = Math.min(page?.limit ?? this.cfg.pageSize, this.cfg.pageSize);
    const slice = names.slice(start, start + limit);
    const items = slice.map((n) => this.view(this.volumes.get(n)!));
    return start + limit < names.length ? { items, next: Buffer.from(slice[slice.length - 1]!).toString('base64url') } : { items };
  }

  async resizeVolume(name: string, sizeBytes: number): Promise<Volume> {
    this.checkSize(sizeBytes, name);
    const v = this.mustGet(name);
    if (sizeBytes < v.size) throw new OutOfRange(`cannot shrink ${this.name}/${name}`);
    v.size = sizeBytes;
    return this.view(v);
  }

  async deleteVolume(name: string): Promise<void> {
    const v = this.volumes.get(name);
    if (!v) return;
    const deps = this.dependents(name);
    if (deps.length > 0) {
      throw new FailedPrecondition(`volume ${this.name}/${name} has linked clones: ${deps.join(', ')}`, { ref: `${this.name}/${name}`, hint: 'stream or delete the clones first' });
    }
    this.volumes.delete(name);
  }

  async createSnapshot(volume: string, name: string): Promise<Snapshot> {
    const v = this.mustGet(volume);
    const existing = v.snapshots.get(name);
    if (existing) return this.snapView(v, existing);
    const snap: MemSnapshot = { name, size: v.size, chunks: new Map(this.materialize(v)), createdAt: new Date().toISOString() };
    v.snapshots.set(name, snap);
    return this.snapView(v, snap);
  }

  async listSnapshots(volume: string): Promise<Snapshot[]> {
    const v = this.mustGet(volume);
    return [...v.snapshots.values()].filter((s) => !s.name.startsWith('clone-')).map((s) => this.snapView(v, s));
  }

  async deleteSnapshot(volume: string, name: string): Promise<void> {
    const v = this.volumes.get(volume);
    if (!v || !v.snapshots.has(name)) return;
    const deps = [...this.volumes.values()].filter((c) => c.parent?.volume === volume && c.parent.snapshot === name).map((c) => c.name);
    if (deps.length > 0) throw new FailedPrecondition(`snapshot ${this.name}/${volume}@${name} has linked clones: ${deps.join(', ')}`);
    v.snapshots.delete(name);
  }

  async revertVolume(volume: string, snapshot: string): Promise<void> {
    const v = this.mustGet(volume);
    const s = this.mustSnap(v, snapshot);
    v.chunks = new Map(s.chunks);
    delete v.parent;
    v.size = s.size;
  }

  async streamVolume(name: string): Promise<JobTask> {
    this.mustGet(name);
    return this.streamTask(name);
  }

  private streamTask(name: string): JobTask {
    return {
      type: 'stream',
      params: { volume: name },
      run: async (ctx) => {
        const v = this.mustGet(name);
        if (!v.parent) return;
        const parent = this.mustSnap(this.mustGet(v.parent.volume), v.parent.snapshot);
        const todo = [...parent.chunks.keys()].filter((i) => !v.chunks.has(i)).sort((a, b) => a - b);
        ctx.setTotal(todo.length * CHUNK);
        for (const i of todo) {
          if (this.cfg.streamDelayMs) await new Promise((r) => setTimeout(r, this.cfg.streamDelayMs));
          if (!v.chunks.has(i)) v.chunks.set(i, parent.chunks.get(i)!);
          this.bytesCopied += CHUNK;
          await ctx.checkpoint(CHUNK);
        }
        delete v.parent;
      },
    };
  }

  async openVolume(name: string, mode: 'r' | 'rw'): Promise<BlockDevice> {
    const v = this.mustGet(name);
    const self = this;
    let closed = false;
    const check = (off: number, len: number) => {
      if (closed) throw new FailedPrecondition(`${this.name}/${name} is closed`);
      if (!Number.isInteger(off) || !Number.isInteger(len) || off < 0 || len < 0 || off + len > v.size) {
        throw new OutOfRange(`I/O at ${off}+${len} is outside ${this.name}/${name} (${v.size} bytes)`);
      }
    };
    return {
      get sizeBytes() { return v.size; },
      blockSize: CHUNK,
      async read(off, len) {
        check(off, len);
        const out = new Uint8Array(len);
        for (let p = off; p < off + len;) {
          const i = Math.floor(p / CHUNK);
          const within = p % CHUNK;
          const n = Math.min(CHUNK - within, off + len - p);
          const chunk = self.chunkOf(v, i);
          if (chunk) out.set(chunk.subarray(within, within + n), p - off);
          p += n;
        }
        return out;
      },
      async write(off, data) {
        check(off, data.length);
        if (mode !== 'rw') throw new FailedPrecondition(`${self.name}/${name} is open read-only`);
        for (let p = off; p < off + data.length;) {
          const i = Math.floor(p / CHUNK);
          const within = p % CHUNK;
          const n = Math.min(CHUNK - within, off + data.length - p);
          const next = new Uint8Array(CHUNK);
          const old = self.chunkOf(v, i);
          if (old) next.set(old);
          next.set(data.subarray(p - off, p - off + n), within);
          v.chunks.set(i, next);
          p += n;
        }
      },
      async extents(off = 0, len = v.size - off) {
        check(off, len);
        const out: Extent[] = [];
        const idx = new Set([...self.materialize(v).keys()]);
        for (const i of [...idx].sort((a, b) => a - b)) {
          const s = Math.max(i * CHUNK, off);
          const t = Math.min((i + 1) * CHUNK, off + len, v.size);
          if (t <= s) continue;
          const last = out[out.length - 1];
          if (last && last.offset + last.length === s) last.length += t - s;
          else out.push({ offset: s, length: t - s, kind: 'data' });
        }
        return out;
      },
      async flush() {
        check(0, 0);
      },
      async close() {
        closed = true;
      },
    };
  }

  async close(): Promise<void> {}

  private chunkOf(v: MemVolume, i: number): Uint8Array | undefined {
    const own = v.chunks.get(i);
    if (own || !v.parent) return own;
    const p = this.volumes.get(v.parent.volume)?.snapshots.get(v.parent.snapshot);
    return p?.chunks.get(i);
  }

  private materialize(v: MemVolume): Chunks {
    if (!v.parent) return v.chunks;
    const p = this.volumes.get(v.parent.volume)?.snapshots.get(v.parent.snapshot);
    return new Map([...(p?.chunks ?? []), ...v.chunks]);
  }

  private dependents(name: string): string[] {
    return [...this.volumes.values()].filter((c) => c.parent?.volume === name).map((c) => c.name);
  }

  /** A size is a positive whole number of bytes, at most the reported maximum. */
  private checkSize(size: unknown, name: string): asserts size is number {
    if (typeof size !== 'number' || !Number.isSafeInteger(size) || size <= 0) {
      throw new InvalidArgument(`size of ${this.name}/${name} must be a positive whole number of bytes, got ${String(size)}`);
    }
    if (size > this.cfg.maxSizeBytes) throw new InvalidArgument(`size of ${this.name}/${name} exceeds ${this.cfg.maxSizeBytes} bytes`);
  }

  private mustGet(name: string): MemVolume {
    const v = this.volumes.get(name);
    if (!v) throw new NotFound(`volume ${this.name}/${name} does not exist`, { ref: `${this.name}/${name}` });
    return v;
  }

  private mustSnap(v: MemVolume, name: string): MemSnapshot {
    const s = v.snapshots.get(name);
    if (!s) throw new NotFound(`snapshot ${this.name}/${v.name}@${name} does not exist`, { ref: `${this.name}/${v.name}@${name}` });
    return s;
  }

  private view(v: MemVolume): Volume {
    return {
      backend: this.name, name: v.name, sizeBytes: v.size, createdAt: v.createdAt,
      ...(v.parent ? { parent: `${this.name}/${v.parent.volume}@${v.parent.snapshot}` } : {}),
      ...(v.owner ? { owner: v.owner } : {}),
    };
  }

  private snapView(v: MemVolume, s: MemSnapshot): Snapshot {
    return { backend: this.name, volume: v.name, name: s.name, sizeBytes: s.size, createdAt: s.createdAt };
  }
}

function tick(): Promise<void> {
  return new Promise((r) => setImmediate(r));
}

/** Backends made by the module, by name, so tests can look inside. */
export const memoryBackends = new Map<string, MemoryBackend>();

export const memoryFactory: BackendFactory<MemoryConfig> = {
  kind: 'memory',
  description: 'in-memory test backend (not shipped)',
  configSchema: memoryConfigSchema as never,
  secretFields: ['secret'],
  async create(config) {
    const b = new MemoryBackend(config.name, config);
    memoryBackends.set(config.name, b);
    return b;
  },
};

export const memoryModule = new ContainerModule(({ bind }) => {
  bind(BackendFactory).toConstantValue(memoryFactory);
});
