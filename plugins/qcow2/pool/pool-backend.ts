import {
  AlreadyExists, CapabilitySet, FailedPrecondition, InvalidArgument, NotFound, OutOfRange, Unsupported,
  type BlockDevice, type Capability, type ChangedExtents, type ChangedExtentsRequest, type CommitOptions, type CreateVolumeRequest, type JobTask, type Page,
  type PageRequest, type Snapshot, type StorageBackend, type StreamOptions, type Volume,
} from '../../../core/index.js';
import { existsSync } from 'node:fs';
import { imageDevice } from '../engine/index.js';
import { changedExtents } from './changes.js';
import { commitTarget, commitTask, resolveBase, resumeChainTask, streamTask } from './chain-tasks.js';
import { abandonLayer, commitDown, commitLayers, compact, compactHidden, finishMerges, makeLayer, unlinkLayers } from './layers.js';
import type { VolumeRow } from './metadata.js';
import { checkPool, type PoolCheckReport } from './pool-check.js';
import { creationTime, forgetHolder, PoolState, type PoolOptions } from './pool-state.js';

export type { PoolOptions } from './pool-state.js';

/** The largest virtual size a qcow2 image of this cluster size can have (QEMU's 32 MiB L1 limit). */
export function maxQcow2Size(clusterSize: number): number {
  const l1Entries = (32 * 1024 * 1024) / 8;
  const perL2 = clusterSize * (clusterSize / 8);
  const max = l1Entries * perL2;
  return Math.min(max, Number.MAX_SAFE_INTEGER - (Number.MAX_SAFE_INTEGER % 512) - 511);
}

const PAGE = 100;

/**
 * The local qcow2 pool (backend kind `qcow2`): a folder of qcow2 (or raw) files whose volumes,
 * snapshots and linked clones are chains of layers, as libvirt's external snapshots make them.
 * The model, its crash safety and its limits: plugins/qcow2/README.md.
 */
export class Qcow2Pool implements StorageBackend {
  readonly kind = 'qcow2';
  readonly name: string;
  private readonly p: PoolState;
  private readonly maxSize: number;

  constructor(readonly opts: PoolOptions) {
    this.name = opts.name;
    // Every structural change first finishes a rotation's delete that a killed process left
    // `merged` (layers.ts, commitChildDown): no change may build on a chain whose file is to move.
    this.p = new PoolState(opts, finishMerges);
    // A process killed while it committed a layer down in a snapshot delete left it `merged`:
    // finished at once (every structural change would first; the chain reads right meanwhile).
    if (this.p.meta.hasMerged()) {
      void this.p.serial.run(async () => undefined).catch((e: unknown) => opts.logger?.warn(`pool ${opts.name}: finishing an interrupted snapshot delete: ${(e as Error).message}`));
    }
    this.maxSize = opts.format === 'qcow2' ? maxQcow2Size(opts.clusterSize) : Number.MAX_SAFE_INTEGER - (Number.MAX_SAFE_INTEGER % 512) - 511;
  }

  get dir(): string {
    return this.opts.dir;
  }

  async capabilities(): Promise<CapabilitySet> {
    // No clone.full: a full copy moves every byte through this host, which the broker's copier
    // does (as a job: progress, cancel, resume) over the data path, snapshots included.
    const common: (Capability | [Capability, Record<string, boolean>])[] = ['volume.delete', 'volume.resize', 'volume.list', 'data.write', 'data.extents'];
    const layered: (Capability | [Capability, Record<string, boolean>])[] = this.opts.format === 'qcow2'
      ? ['snapshot.create', 'snapshot.delete', 'snapshot.revert', 'clone.linked', 'chain.stream', 'chain.commit', ['data.read', { snapshots: true }], 'data.dirty']
      : ['data.read'];
    return new CapabilitySet([['volume.create', { maxSizeBytes: this.maxSize, sizeGranularity: 512 }], ...common, ...layered]);
  }

  // ---- volumes ----

  async createVolume(req: CreateVolumeRequest): Promise<Volume> {
    if (req.sizeBytes !== undefined) this.checkSize(req.sizeBytes, req.name);
    if (req.source) return this.p.serial.run(() => this.cloneLocked(req));
    if (req.sizeBytes === undefined) throw new InvalidArgument(`create ${this.p.ref(req.name)}: a size is required`, { ref: this.p.ref(req.name) });
    const size = roundUp512(req.sizeBytes);
    return this.p.serial.run(async () => {
      const existing = this.p.meta.volume(req.name);
      if (existing) {
        if (existing.sizeBytes === size && this.p.parentRef(existing) === undefined) return this.p.view(existing);
        throw new AlreadyExists(`volume ${this.p.ref(req.name)} already exists with ${existing.sizeBytes} bytes${this.p.parentRef(existing) ? ` (a clone of ${this.p.parentRef(existing)})` : ''}`, {
          ref: this.p.ref(req.name), hint: 'pick another name, or delete the existing volume first',
        });
      }
      const file = await makeLayer(this.p, req.name, null, size);
      const row: VolumeRow = { name: req.name, active: file, sizeBytes: size, owner: req.owner ?? null, createdAt: creationTime(), originVolume: null, originSnapshot: null };
      commitLayers(this.p, [file], () => this.p.meta.addVolume(row));
      return this.p.view(row);
    });
  }

  /** A linked clone: one new overlay, whatever the size (a full copy is the broker's copier's). */
  private async cloneLocked(req: CreateVolumeRequest): Promise<Volume> {
    const src = req.source!;
    const srcRef = src.snapshot === undefined ? this.p.ref(src.volume) : `${this.p.ref(src.volume)}@${src.snapshot}`;
    const sv = this.p.mustVolume(src.volume);
    const snap = src.snapshot === undefined ? undefined : this.p.meta.snapshot(src.volume, src.snapshot);
    if (src.snapshot !== undefined && !snap) {
      throw new NotFound(`snapshot ${srcRef} does not exist`, { ref: srcRef, hint: `list them with \`offload snapshot list ${this.p.ref(src.volume)}\`` });
    }
    if (req.mode === 'full' || this.opts.format !== 'qcow2') {
      throw new Unsupported(`${this.name} makes linked clones only${this.opts.format !== 'qcow2' ? ' (and none: it is a raw pool)' : ''}; a full copy of ${srcRef} moves every byte through this host`, {
        ref: srcRef, hint: 'clone through the broker (`offload clone --full`): it copies through the host as a job',
      });
    }
    const srcSize = snap ? snap.sizeBytes : sv.sizeBytes;
    const size = roundUp512(req.sizeBytes ?? srcSize);
    if (size < srcSize) {
      throw new OutOfRange(`clone ${this.p.ref(req.name)} of ${srcRef}: ${size} bytes is smaller than the source's ${srcSize}`, { ref: this.p.ref(req.name), hint: 'give at least the source size, or none' });
    }
    const existing = this.p.meta.volume(req.name);
    if (existing) {
      if (existing.sizeBytes === size && this.p.parentRef(existing) === srcRef) return this.p.view(existing);
      throw new AlreadyExists(`volume ${this.p.ref(req.name)} already exists${existing.name === src.volume ? '' : ` and is not a linked clone of ${srcRef} with ${size} bytes`}`, {
        ref: this.p.ref(req.name), hint: 'pick another name, or delete the existing volume first',
      });
    }
    const row: VolumeRow = {
      name: req.name, active: '', sizeBytes: size, owner: req.owner ?? null, createdAt: creationTime(),
      originVolume: null, originSnapshot: null,
    };
    this.p.assertNotBusy(src.volume, 'clone');
    if (snap) {
      row.active = await makeLayer(this.p, req.name, snap.layer, size);
      commitLayers(this.p, [row.active], () => this.p.meta.addVolume(row));
      return this.p.view(row);
    }
    // A linked clone of the volume itself: freeze its active layer as a hidden layer that both
    // the volume's new overlay and the clone's overlay sit on.
    await this.p.open.change(sv.name, async () => {
      const frozen = sv.active;
      const next = await makeLayer(this.p, sv.name, frozen, sv.sizeBytes);
      try {
        row.active = await makeLayer(this.p, req.name, frozen, size);
      } catch (e) {
        await abandonLayer(this.p, next);
        throw e;
      }
      commitLayers(this.p, [next, row.active], () => {
        this.p.meta.updateVolume(sv.name, { active: next });
        this.p.meta.addVolume(row);
      });
    });
    return this.p.view(row);
  }

  async getVolume(name: string): Promise<Volume | undefined> {
    const v = this.p.meta.volume(name);
    return v && this.p.view(v, true);
  }

  async listVolumes(page?: PageRequest): Promise<Page<Volume>> {
    let after: string | undefined;
    if (page?.token !== undefined) {
      after = Buffer.from(page.token, 'base64url').toString();
      if (!after || Buffer.from(after).toString('base64url') !== page.token) {
        throw new InvalidArgument(`invalid page token "${page.token}"`, { hint: 'pass back the `next` token of the previous page unchanged' });
      }
    }
    const limit = Math.max(1, Math.min(page?.limit ?? PAGE, PAGE));
    const rows = this.p.meta.volumes(after, limit);
    const items = rows.map((r) => this.p.view(r));
    const last = rows[rows.length - 1];
    return last && this.p.meta.countVolumesAfter(last.name) > 0 ? { items, next: Buffer.from(last.name).toString('base64url') } : { items };
  }

  async resizeVolume(name: string, sizeBytes: number): Promise<Volume> {
    this.checkSize(sizeBytes, name);
    const size = roundUp512(sizeBytes);
    return this.p.serial.run(async () => {
      const v = this.p.mustVolume(name);
      if (size < v.sizeBytes) {
        throw new OutOfRange(`cannot shrink ${this.p.ref(name)} from ${v.sizeBytes} to ${size} bytes`, { ref: this.p.ref(name), hint: 'volumes can only grow' });
      }
      if (size === v.sizeBytes) return this.p.view(v);
      this.p.assertNotBusy(name, 'resize');
      this.p.open.assertNotOpenElsewhere(name, 'resizing it');
      const ov = this.p.open.acquire(name);
      try {
        await ov.lock.exclusive(async () => (await ov.current()).resize(size));
      } finally {
        await this.p.open.release(ov);
      }
      this.p.meta.updateVolume(name, { sizeBytes: size });
      return this.p.view(this.p.mustVolume(name));
    });
  }

  async deleteVolume(name: string): Promise<void> {
    return this.p.serial.run(async () => {
      const v = this.p.meta.volume(name);
      if (!v) return;
      this.p.assertNotBusy(name, 'delete');
      this.p.open.assertNotOpenElsewhere(name, 'deleting it');
      const own = this.p.meta.layersOf(name).filter((l) => l.state !== 'deleting');
      const ownFiles = new Set(own.map((l) => l.file));
      const dependents = new Set<string>();
      for (const l of own) for (const c of this.p.meta.children(l.file)) if (c.volume !== name) dependents.add(c.volume);
      if (dependents.size > 0) {
        const list = [...dependents].sort().map((d) => this.p.ref(d)).join(', ');
        throw new FailedPrecondition(`cannot delete ${this.p.ref(name)}: linked clones depend on it: ${list}`, {
          ref: this.p.ref(name), hint: `stream the clones first (\`offload stream ${this.p.ref([...dependents][0]!)}\`) or delete them`,
          data: { dependents: [...dependents].sort() },
        });
      }
      // The foreign layer the volume sits on (a clone's source), compacted once we are gone.
      const below = own.map((l) => l.parent).find((p) => p !== null && !ownFiles.has(p)) ?? null;
      await this.p.open.forget(name);
      this.p.meta.tx(() => {
        this.p.meta.removeVolume(name);
        for (const l of own) this.p.meta.setLayerState(l.file, 'deleting');
      });
      await unlinkLayers(this.p, own.map((l) => l.file));
      if (below !== null) await compact(this.p, below);
    });
  }

  // ---- snapshots ----

  async createSnapshot(volume: string, name: string): Promise<Snapshot> {
    this.p.needLayers('snapshot');
    return this.p.serial.run(async () => {
      const v = this.p.mustVolume(volume);
      const existing = this.p.meta.snapshot(volume, name);
      if (existing) return this.p.snapView(existing);
      this.p.assertNotBusy(volume, 'snapshot');
      const createdAt = new Date().toISOString();
      await this.p.open.change(volume, async () => {
        const next = await makeLayer(this.p, volume, v.active, v.sizeBytes);
        commitLayers(this.p, [next], () => {
          this.p.meta.addSnapshot({ volume, name, layer: v.active, sizeBytes: v.sizeBytes, createdAt });
          this.p.meta.updateVolume(volume, { active: next });
        });
      });
      return this.p.snapView(this.p.meta.snapshot(volume, name)!);
    });
  }

  async listSnapshots(volume: string): Promise<Snapshot[]> {
    this.p.mustVolume(volume);
    return this.p.meta.snapshots(volume).map((s) => this.p.snapView(s));
  }

  async deleteSnapshot(volume: string, name: string): Promise<void> {
    return this.p.serial.run(async () => {
      const s = this.p.meta.snapshot(volume, name);
      if (!s) return;
      const sref = `${this.p.ref(volume)}@${name}`;
      const clones = this.p.meta.children(s.layer).filter((c) => c.volume !== volume).map((c) => c.volume);
      if (clones.length > 0) {
        const list = [...new Set(clones)].sort();
        throw new FailedPrecondition(`cannot delete ${sref}: linked clones are made from it: ${list.map((c) => this.p.ref(c)).join(', ')}`, {
          ref: sref, hint: `stream the clones first (\`offload stream ${this.p.ref(list[0]!)}\`) or delete them`, data: { dependents: list },
        });
      }
      this.p.assertNotBusy(volume, 'delete a snapshot of');
      this.p.meta.removeSnapshot(volume, name);
      if (!(await commitDown(this.p, s.layer))) await compact(this.p, s.layer);
      // Leftovers of earlier deletes: the snapshot asked for is gone whatever becomes of them.
      await compactHidden(this.p, volume).catch((e: unknown) => this.opts.logger?.warn(`pool ${this.name}: compacting the hidden layers of ${this.p.ref(volume)}: ${(e as Error).message}`));
    });
  }

  async revertVolume(volume: string, snapshot: string): Promise<void> {
    this.p.needLayers('revert');
    return this.p.serial.run(async () => {
      const v = this.p.mustVolume(volume);
      const s = this.p.meta.snapshot(volume, snapshot);
      if (!s) {
        throw new NotFound(`snapshot ${this.p.ref(volume)}@${snapshot} does not exist`, { ref: `${this.p.ref(volume)}@${snapshot}`, hint: `list them with \`offload snapshot list ${this.p.ref(volume)}\`` });
      }
      this.p.assertNotBusy(volume, 'revert');
      const old = this.p.meta.layer(v.active)!;
      await this.p.open.change(volume, async () => {
        const next = await makeLayer(this.p, volume, s.layer, s.sizeBytes);
        commitLayers(this.p, [next], () => {
          this.p.meta.updateVolume(volume, { active: next, sizeBytes: s.sizeBytes });
          this.p.meta.setLayerState(old.file, 'deleting');
        });
      });
      await unlinkLayers(this.p, [old.file]);
      if (old.parent !== null) await compact(this.p, old.parent);
    });
  }

  // ---- chain jobs ----

  async streamVolume(name: string, opts: StreamOptions): Promise<JobTask> {
    this.p.needLayers('stream');
    const v = this.p.mustVolume(name);
    const { target, below } = this.p.bottomOwn(v);
    const base = opts.base !== undefined && opts.base !== '' ? resolveBase(this.p, v, below, opts.base) : null;
    return streamTask(this.p, name, target, base);
  }

  async commitVolume(name: string, opts: CommitOptions): Promise<JobTask> {
    this.p.needLayers('commit');
    const v = this.p.mustVolume(name);
    return commitTask(this.p, name, v.active, commitTarget(this.p, v, opts.base));
  }

  async resumeTask(type: string, params: Record<string, unknown>): Promise<JobTask | undefined> {
    return resumeChainTask(this.p, type, params);
  }

  // ---- data path ----

  /** The volume's data path over its one shared open image (live writes and jobs see each other). */
  async openVolume(name: string, mode: 'r' | 'rw'): Promise<BlockDevice> {
    // Registered under the pool's change lock: no other process is between its check that the
    // volume is open nowhere else and its change of the volume's layers.
    const ov = await this.p.serial.run(async () => {
      this.p.mustVolume(name);
      return this.p.open.acquire(name);
    });
    try {
      return await imageDevice((fn) => ov.lock.shared(async () => fn(await ov.current())), {
        mode, ref: this.p.ref(name), blockSize: this.opts.format === 'qcow2' ? this.opts.clusterSize : 512,
        onClose: (o) => this.p.open.release(ov, o),
      });
    } catch (e) {
      await this.p.open.release(ov);
      throw e;
    }
  }

  /** A snapshot's data, read-only: its frozen layer (and what lies below it), opened on its own. */
  async openSnapshot(volume: string, snapshot: string): Promise<BlockDevice> {
    this.p.needLayers('reading a snapshot');
    this.p.mustVolume(volume);
    const s = this.p.meta.snapshot(volume, snapshot);
    const sref = `${this.p.ref(volume)}@${snapshot}`;
    if (!s) throw new NotFound(`snapshot ${sref} does not exist`, { ref: sref, hint: `list them with \`offload snapshot list ${this.p.ref(volume)}\`` });
    // Registered before the layer is opened, then the snapshot looked up again: a delete that
    // did not see this reader removed the snapshot first (a delete's reader check comes after).
    const done = this.p.readSnapshot(s.layer);
    let img;
    try {
      if (this.p.meta.snapshot(volume, snapshot)?.layer !== s.layer) throw new NotFound(`snapshot ${sref} does not exist`, { ref: sref });
      img = await this.p.openLayer(s.layer, true);
    } catch (e) {
      done();
      throw e;
    }
    try {
      return await imageDevice(img, { mode: 'r', ref: sref, onClose: () => { done(); return img.close(); } });
    } catch (e) {
      done();
      await img.close();
      throw e;
    }
  }

  /** `data.dirty`: from the layers of the two points' chains (changes.ts). */
  async changedExtents(volume: string, req: ChangedExtentsRequest): Promise<ChangedExtents> {
    return changedExtents(this.p, volume, req);
  }

  /** The files of a volume's chain, top (active) first, as absolute paths: what to give qemu or libvirt. */
  chainFiles(volume: string): string[] {
    // A `merged` layer whose file is gone was renamed over its child's (commitChildDown): the
    // files' headers no longer name it, whatever the metadata says until the change is finished.
    return this.p.meta.chain(this.p.mustVolume(volume).active).filter((l) => l.state !== 'merged' || existsSync(this.p.abs(l.file))).map((l) => this.p.abs(l.file));
  }

  /** `pool check`: metadata against files (see pool-check.ts); `repair` finishes interrupted work. */
  async check(opts: { repair?: boolean } = {}): Promise<PoolCheckReport> {
    return this.p.serial.run(() => checkPool(this.p, opts), { bare: true });
  }

  async close(): Promise<void> {
    await this.p.serial.runLocal(async () => {
      await this.p.open.closeAll();
      forgetHolder(this.p);
      this.p.meta.close();
    });
  }

  private checkSize(size: unknown, name: string): void {
    const r = this.p.ref(name);
    if (typeof size !== 'number' || !Number.isSafeInteger(size)) {
      throw new InvalidArgument(`size of ${r} must be a whole number of bytes, got ${JSON.stringify(size) ?? String(size)}`, { ref: r });
    }
    if (size <= 0) throw new InvalidArgument(`size of ${r} must be greater than 0, got ${size}`, { ref: r });
    if (size > this.maxSize) {
      throw new InvalidArgument(`size of ${r} (${size} bytes) exceeds the largest ${this.opts.format} image of this pool (${this.maxSize} bytes)`, {
        ref: r, hint: this.opts.format === 'qcow2' ? 'a larger clusterSize allows larger volumes' : undefined,
      });
    }
  }
}

function roundUp512(n: number): number {
  return Math.ceil(n / 512) * 512;
}
