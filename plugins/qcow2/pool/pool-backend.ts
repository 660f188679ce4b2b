/**
 * The local qcow2 storage pool: a folder of qcow2 files, backend kind `qcow2`.
 *
 * ## Snapshot model: external layers, as libvirt does
 *
 * Every volume is a chain of qcow2 files ("layers") in the pool folder. The top of the chain is
 * the volume's *active* layer: the only one guests write. Every layer below it is *frozen*:
 * never written again except by a merge that keeps what it reads unchanged. Backing references
 * are plain file names (relative, same folder), so `qemu-img info --backing-chain` on any file
 * shows the real chain and a VM can be started from a volume's active file.
 *
 * - snapshot v@s: the active layer A is frozen and becomes s's layer; v continues in a new empty
 *   overlay on A. Instant: one small file, whatever the volume's size.
 * - linked clone of v@s: a new empty overlay on s's layer, owned by the clone. Instant.
 * - linked clone of v itself: as a snapshot without a name (a *hidden* frozen layer) on which
 *   both v's new overlay and the clone's overlay sit.
 * - full clone: a new standalone file into which the source chain's data ranges are copied
 *   (sparse: unallocated and zero ranges are not written).
 * - revert v to s: a new empty overlay on s's layer becomes v's active layer; the old active
 *   layer is deleted (nothing can sit on an active layer). Instant.
 * - delete v@s: refused (FailedPrecondition) while another volume's layer sits directly on s's
 *   layer (a linked clone of s: stream it first). Otherwise the layer loses its name and is
 *   compacted: with no layer on it, its file is deleted; with exactly one layer X on it, it is
 *   merged into X (a stream of X down to the snapshot's own parent: X gets the clusters it did
 *   not have, which changes nothing X reads, then X is re-pointed and the file deleted); with
 *   several layers on it (e.g. after a revert and a new snapshot) it stays as a hidden layer
 *   until they are gone.
 * - delete v: refused (FailedPrecondition) while another volume's layer sits on one of v's
 *   layers; otherwise every layer of v goes, snapshots included.
 * - stream c (chain.stream): pull every cluster of the layers below c's own layers (up to
 *   `base`) into c's lowest own layer, then re-point it; c then depends on nothing (or on base).
 *   It runs on the shared open image while the volume is in use.
 * - commit c (chain.commit): merge c's active layer into the layer below it and continue on that
 *   layer (an active commit with pivot). Only when that layer is c's own and nothing else sits on
 *   it: a snapshot's layer is merged only when `base` names that snapshot (its point in time is
 *   given up, so the caller must say so); another volume's layer never (stream instead).
 *
 * ## Metadata and crashes
 *
 * SQLite in the pool folder (metadata.ts). A file is created only after a `pending` row names it,
 * and the row turns `ready` in the same transaction that makes it part of a volume; a file is
 * deleted only after its row turned `deleting` in the transaction that dropped its last user.
 * So a crash never leaves a ghost volume, and every half-made or half-deleted file is named by a
 * row that `pool check --repair` finishes. Files the metadata does not name are not ours: they
 * are reported, never deleted.
 *
 * One process at a time should change a pool; each call reads the metadata afresh, so
 * successive CLI invocations and a long-running broker can take turns.
 */
import { randomBytes } from 'node:crypto';
import { statSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import {
  AlreadyExists, Busy, CapabilitySet, FailedPrecondition, InvalidArgument, NotFound, OutOfRange,
  type BlockDevice, type Capability, type CommitOptions, type CreateVolumeRequest, type JobTask, type Logger, type Page,
  type PageRequest, type Snapshot, type StorageBackend, type StreamOptions, type Volume,
} from '../../../core/index.js';
import { createImage, openImage, type Image } from '../index.js';
import { runCommit, runStream } from '../jobs/index.js';
import { copyAllocated } from './full-copy.js';
import { autoCompleting, inlineContext } from './inline-context.js';
import { METADATA_FILE, PoolMetadata, type LayerRow, type VolumeRow } from './metadata.js';
import { OpenVolumes } from './open-volumes.js';
import { checkPool, type PoolCheckReport } from './pool-check.js';
import { Serial } from './serial.js';
import { volumeDevice } from './volume-device.js';

export interface PoolOptions {
  name: string;
  /** Absolute path of the pool folder (exists, writable). */
  dir: string;
  format: 'qcow2' | 'raw';
  clusterSize: number;
  allowBackingOutsidePool: boolean;
  logger?: Logger;
  /** Test hooks: called right after a layer file was created, before it is recorded as ready. */
  hooks?: { afterFileCreated?: (file: string) => void | Promise<void> };
}

/** The largest virtual size a qcow2 image of this cluster size can have (QEMU's 32 MiB L1 limit). */
export function maxQcow2Size(clusterSize: number): number {
  const l1Entries = (32 * 1024 * 1024) / 8;
  const perL2 = clusterSize * (clusterSize / 8);
  const max = l1Entries * perL2;
  return Math.min(max, Number.MAX_SAFE_INTEGER - (Number.MAX_SAFE_INTEGER % 512) - 511);
}

const PAGE = 100;

export class Qcow2Pool implements StorageBackend {
  readonly kind = 'qcow2';
  readonly name: string;
  readonly meta: PoolMetadata;
  private readonly serial = new Serial();
  private readonly open: OpenVolumes;
  /** Volumes a stream or commit job is working on: structural changes wait for it (Busy). */
  private readonly busy = new Map<string, string>();
  /** Layer files this process is creating right now (their pending rows are not orphans). */
  readonly inFlight = new Set<string>();
  private readonly maxSize: number;

  constructor(readonly opts: PoolOptions) {
    this.name = opts.name;
    this.meta = new PoolMetadata(join(opts.dir, METADATA_FILE));
    this.open = new OpenVolumes((v) => this.openActive(v));
    this.maxSize = opts.format === 'qcow2' ? maxQcow2Size(opts.clusterSize) : Number.MAX_SAFE_INTEGER - (Number.MAX_SAFE_INTEGER % 512) - 511;
  }

  get dir(): string {
    return this.opts.dir;
  }

  async capabilities(): Promise<CapabilitySet> {
    const common: Capability[] = ['volume.delete', 'volume.resize', 'volume.list', 'clone.full', 'data.read', 'data.write', 'data.extents'];
    const layered: Capability[] = this.opts.format === 'qcow2'
      ? ['snapshot.create', 'snapshot.delete', 'snapshot.revert', 'clone.linked', 'chain.stream', 'chain.commit']
      : [];
    return new CapabilitySet([['volume.create', { maxSizeBytes: this.maxSize, sizeGranularity: 512 }], ...common, ...layered]);
  }

  // ---- volumes ----

  async createVolume(req: CreateVolumeRequest): Promise<Volume> {
    if (req.sizeBytes !== undefined) this.checkSize(req.sizeBytes, req.name);
    if (req.source) return this.serial.run(() => this.cloneLocked(req));
    if (req.sizeBytes === undefined) throw new InvalidArgument(`create ${this.ref(req.name)}: a size is required`, { ref: this.ref(req.name) });
    const size = roundUp512(req.sizeBytes);
    return this.serial.run(async () => {
      const existing = this.meta.volume(req.name);
      if (existing) {
        if (existing.sizeBytes === size && this.parentRef(existing) === undefined) return this.view(existing);
        throw new AlreadyExists(`volume ${this.ref(req.name)} already exists with ${existing.sizeBytes} bytes${this.parentRef(existing) ? ` (a clone of ${this.parentRef(existing)})` : ''}`, {
          ref: this.ref(req.name), hint: 'pick another name, or delete the existing volume first',
        });
      }
      const file = await this.makeLayer(req.name, null, size);
      const row: VolumeRow = { name: req.name, active: file, sizeBytes: size, owner: req.owner ?? null, createdAt: new Date().toISOString(), originVolume: null, originSnapshot: null };
      this.meta.tx(() => {
        this.meta.setLayerState(file, 'ready');
        this.meta.addVolume(row);
      });
      this.inFlight.delete(file);
      return this.view(row);
    });
  }

  private async cloneLocked(req: CreateVolumeRequest): Promise<Volume> {
    const src = req.source!;
    const srcRef = src.snapshot === undefined ? this.ref(src.volume) : `${this.ref(src.volume)}@${src.snapshot}`;
    const sv = this.mustVolume(src.volume);
    const snap = src.snapshot === undefined ? undefined : this.meta.snapshot(src.volume, src.snapshot);
    if (src.snapshot !== undefined && !snap) {
      throw new NotFound(`snapshot ${srcRef} does not exist`, { ref: srcRef, hint: `list them with \`offload snapshot list ${this.ref(src.volume)}\`` });
    }
    const mode = req.mode ?? (this.opts.format === 'qcow2' ? 'linked' : 'full');
    if (mode === 'linked' && this.opts.format !== 'qcow2') {
      throw new FailedPrecondition(`${this.name} is a raw pool: linked clones need qcow2 layers`, { ref: srcRef, hint: 'clone with mode "full"' });
    }
    const srcSize = snap ? snap.sizeBytes : sv.sizeBytes;
    const size = roundUp512(req.sizeBytes ?? srcSize);
    if (size < srcSize) {
      throw new OutOfRange(`clone ${this.ref(req.name)} of ${srcRef}: ${size} bytes is smaller than the source's ${srcSize}`, { ref: this.ref(req.name), hint: 'give at least the source size, or none' });
    }
    const existing = this.meta.volume(req.name);
    if (existing) {
      const wantParent = mode === 'linked' ? srcRef : undefined;
      if (existing.sizeBytes === size && this.parentRef(existing) === wantParent) return this.view(existing);
      throw new AlreadyExists(`volume ${this.ref(req.name)} already exists${existing.name === src.volume ? '' : ` and is not a ${mode} clone of ${srcRef} with ${size} bytes`}`, {
        ref: this.ref(req.name), hint: 'pick another name, or delete the existing volume first',
      });
    }
    const row: VolumeRow = {
      name: req.name, active: '', sizeBytes: size, owner: req.owner ?? null, createdAt: new Date().toISOString(),
      originVolume: null, originSnapshot: null,
    };
    if (mode === 'full') {
      row.active = await this.makeLayer(req.name, null, size);
      try {
        await this.fullCopy(sv, snap?.layer, row.active);
      } catch (e) {
        await this.abandonLayer(row.active);
        throw e;
      }
      this.meta.tx(() => {
        this.meta.setLayerState(row.active, 'ready');
        this.meta.addVolume(row);
      });
      this.inFlight.delete(row.active);
      return this.view(row);
    }
    this.assertNotBusy(src.volume, 'clone');
    if (snap) {
      row.active = await this.makeLayer(req.name, snap.layer, size);
      this.meta.tx(() => {
        this.meta.setLayerState(row.active, 'ready');
        this.meta.addVolume(row);
      });
      this.inFlight.delete(row.active);
      return this.view(row);
    }
    // A linked clone of the volume itself: freeze its active layer as a hidden layer that both
    // the volume's new overlay and the clone's overlay sit on.
    await this.open.change(sv.name, async () => {
      const frozen = sv.active;
      const next = await this.makeLayer(sv.name, frozen, sv.sizeBytes);
      try {
        row.active = await this.makeLayer(req.name, frozen, size);
      } catch (e) {
        await this.abandonLayer(next);
        throw e;
      }
      this.meta.tx(() => {
        this.meta.setLayerState(next, 'ready');
        this.meta.setLayerState(row.active, 'ready');
        this.meta.updateVolume(sv.name, { active: next });
        this.meta.addVolume(row);
      });
      this.inFlight.delete(next);
      this.inFlight.delete(row.active);
    });
    return this.view(row);
  }

  private async fullCopy(sv: VolumeRow, snapLayer: string | undefined, targetFile: string): Promise<void> {
    const target = await openImage(this.abs(targetFile), { readOnly: false, ...this.rootOpt() });
    try {
      if (snapLayer !== undefined) {
        const src = await this.openLayer(snapLayer, true);
        try {
          await copyAllocated((o, l) => src.read(o, l), () => src.map(), target);
        } finally {
          await src.close();
        }
        return;
      }
      // The volume itself: read through its shared open image, so writes in flight are seen.
      const ov = this.open.acquire(sv.name);
      try {
        await ov.lock.shared(async () => {
          const img = await ov.current();
          await copyAllocated((o, l) => img.read(o, l), () => img.map(), target);
        });
      } finally {
        await this.open.release(ov);
      }
    } finally {
      await target.close();
    }
  }

  async getVolume(name: string): Promise<Volume | undefined> {
    const v = this.meta.volume(name);
    return v && this.view(v, true);
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
    const rows = this.meta.volumes(after, limit);
    const items = rows.map((r) => this.view(r));
    const last = rows[rows.length - 1];
    return last && this.meta.countVolumesAfter(last.name) > 0 ? { items, next: Buffer.from(last.name).toString('base64url') } : { items };
  }

  async resizeVolume(name: string, sizeBytes: number): Promise<Volume> {
    this.checkSize(sizeBytes, name);
    const size = roundUp512(sizeBytes);
    return this.serial.run(async () => {
      const v = this.mustVolume(name);
      if (size < v.sizeBytes) {
        throw new OutOfRange(`cannot shrink ${this.ref(name)} from ${v.sizeBytes} to ${size} bytes`, { ref: this.ref(name), hint: 'volumes can only grow' });
      }
      if (size === v.sizeBytes) return this.view(v);
      this.assertNotBusy(name, 'resize');
      const ov = this.open.acquire(name);
      try {
        await ov.lock.exclusive(async () => (await ov.current()).resize(size));
      } finally {
        await this.open.release(ov);
      }
      this.meta.updateVolume(name, { sizeBytes: size });
      return this.view(this.mustVolume(name));
    });
  }

  async deleteVolume(name: string): Promise<void> {
    return this.serial.run(async () => {
      const v = this.meta.volume(name);
      if (!v) return;
      this.assertNotBusy(name, 'delete');
      const own = this.meta.layersOf(name).filter((l) => l.state !== 'deleting');
      const ownFiles = new Set(own.map((l) => l.file));
      const dependents = new Set<string>();
      for (const l of own) for (const c of this.meta.children(l.file)) if (c.volume !== name) dependents.add(c.volume);
      if (dependents.size > 0) {
        const list = [...dependents].sort().map((d) => this.ref(d)).join(', ');
        throw new FailedPrecondition(`cannot delete ${this.ref(name)}: linked clones depend on it: ${list}`, {
          ref: this.ref(name), hint: `stream the clones first (\`offload stream ${this.ref([...dependents][0]!)}\`) or delete them`,
          data: { dependents: [...dependents].sort() },
        });
      }
      // The foreign layer the volume sits on (a clone's source), compacted once we are gone.
      const below = own.map((l) => l.parent).find((p) => p !== null && !ownFiles.has(p)) ?? null;
      await this.open.forget(name);
      this.meta.tx(() => {
        this.meta.removeVolume(name);
        for (const l of own) this.meta.setLayerState(l.file, 'deleting');
      });
      await this.unlinkLayers(own.map((l) => l.file));
      if (below !== null) await this.compact(below);
    });
  }

  // ---- snapshots ----

  async createSnapshot(volume: string, name: string): Promise<Snapshot> {
    this.needLayers('snapshot');
    return this.serial.run(async () => {
      const v = this.mustVolume(volume);
      const existing = this.meta.snapshot(volume, name);
      if (existing) return this.snapView(existing);
      this.assertNotBusy(volume, 'snapshot');
      const createdAt = new Date().toISOString();
      await this.open.change(volume, async () => {
        const next = await this.makeLayer(volume, v.active, v.sizeBytes);
        this.meta.tx(() => {
          this.meta.setLayerState(next, 'ready');
          this.meta.addSnapshot({ volume, name, layer: v.active, sizeBytes: v.sizeBytes, createdAt });
          this.meta.updateVolume(volume, { active: next });
        });
        this.inFlight.delete(next);
      });
      return this.snapView(this.meta.snapshot(volume, name)!);
    });
  }

  async listSnapshots(volume: string): Promise<Snapshot[]> {
    this.mustVolume(volume);
    return this.meta.snapshots(volume).map((s) => this.snapView(s));
  }

  async deleteSnapshot(volume: string, name: string): Promise<void> {
    return this.serial.run(async () => {
      const s = this.meta.snapshot(volume, name);
      if (!s) return;
      const sref = `${this.ref(volume)}@${name}`;
      const clones = this.meta.children(s.layer).filter((c) => c.volume !== volume).map((c) => c.volume);
      if (clones.length > 0) {
        const list = [...new Set(clones)].sort();
        throw new FailedPrecondition(`cannot delete ${sref}: linked clones are made from it: ${list.map((c) => this.ref(c)).join(', ')}`, {
          ref: sref, hint: `stream the clones first (\`offload stream ${this.ref(list[0]!)}\`) or delete them`, data: { dependents: list },
        });
      }
      this.assertNotBusy(volume, 'delete a snapshot of');
      this.meta.removeSnapshot(volume, name);
      await this.compact(s.layer);
    });
  }

  async revertVolume(volume: string, snapshot: string): Promise<void> {
    this.needLayers('revert');
    return this.serial.run(async () => {
      const v = this.mustVolume(volume);
      const s = this.meta.snapshot(volume, snapshot);
      if (!s) {
        throw new NotFound(`snapshot ${this.ref(volume)}@${snapshot} does not exist`, { ref: `${this.ref(volume)}@${snapshot}`, hint: `list them with \`offload snapshot list ${this.ref(volume)}\`` });
      }
      this.assertNotBusy(volume, 'revert');
      const old = this.meta.layer(v.active)!;
      await this.open.change(volume, async () => {
        const next = await this.makeLayer(volume, s.layer, s.sizeBytes);
        this.meta.tx(() => {
          this.meta.setLayerState(next, 'ready');
          this.meta.updateVolume(volume, { active: next, sizeBytes: s.sizeBytes });
          this.meta.setLayerState(old.file, 'deleting');
        });
        this.inFlight.delete(next);
      });
      await this.unlinkLayers([old.file]);
      if (old.parent !== null) await this.compact(old.parent);
    });
  }

  // ---- chain jobs ----

  async streamVolume(name: string, opts: StreamOptions): Promise<JobTask> {
    this.needLayers('stream');
    const v = this.mustVolume(name);
    const { target, below } = this.bottomOwn(v);
    let base: string | null = null;
    if (opts.base !== undefined && opts.base !== '') {
      base = this.resolveBase(v, below, opts.base);
    }
    return this.streamTask(name, target, base);
  }

  private streamTask(volume: string, target: string, base: string | null): JobTask {
    return {
      type: 'stream',
      params: { volume, target, base },
      run: async (ctx) => {
        const v = this.mustVolume(volume);
        const layer = this.meta.layer(target);
        if (!layer || layer.volume !== volume || this.meta.chain(v.active).every((l) => l.file !== target)) {
          throw new FailedPrecondition(`stream ${this.ref(volume)}: the volume's layers changed since the job was made`, { ref: this.ref(volume), hint: 'start the stream again' });
        }
        if (layer.parent === base) return; // nothing above base to pull
        this.claim(volume, 'stream');
        try {
          await this.withWritable(volume, target, (img) => runStream(img, base === null ? {} : { base: this.abs(base) }, ctx));
          await this.serial.run(async () => {
            const old = layer.parent;
            const affected = this.volumesAbove(target);
            this.meta.setParent(target, base);
            await this.open.reopen(affected);
            if (old !== null) await this.compact(old);
          });
        } finally {
          this.release(volume);
        }
      },
    };
  }

  async commitVolume(name: string, opts: CommitOptions): Promise<JobTask> {
    this.needLayers('commit');
    const v = this.mustVolume(name);
    const into = this.commitTarget(v, opts.base);
    return this.commitTask(name, v.active, into);
  }

  /** The layer a commit of `v` merges into, or the reason it cannot. */
  private commitTarget(v: VolumeRow, base: string | undefined): string {
    const active = this.meta.layer(v.active)!;
    const r = this.ref(v.name);
    if (active.parent === null) {
      throw new FailedPrecondition(`commit ${r}: the volume has no parent layer to merge into`, { ref: r, hint: 'a volume without snapshots or source has nothing to commit into' });
    }
    const parent = this.meta.layer(active.parent)!;
    if (parent.volume !== v.name) {
      const src = this.layerRef(parent.file);
      throw new FailedPrecondition(`commit ${r}: its parent ${src} belongs to ${this.ref(parent.volume)} and is shared; merging into it would change ${src}`, {
        ref: r, hint: `stream ${r} to make it independent instead`,
      });
    }
    const others = this.meta.children(parent.file).filter((c) => c.file !== active.file);
    if (others.length > 0) {
      throw new FailedPrecondition(`commit ${r}: its parent layer ${this.layerRef(parent.file)} is also the base of ${others.map((o) => this.layerRef(o.file)).join(', ')}`, {
        ref: r, hint: 'delete or stream those first',
      });
    }
    const snaps = this.meta.snapshotsOnLayer(parent.file);
    if (snaps.length > 0) {
      const names = snaps.map((s) => s.name);
      const ok = base !== undefined && snaps.some((s) => base === s.name || base === `${v.name}@${s.name}` || base === `${r}@${s.name}`);
      if (!ok) {
        throw new FailedPrecondition(`commit ${r}: merging into its parent layer gives up snapshot ${names.map((n) => `${r}@${n}`).join(', ')}`, {
          ref: r, hint: `pass --base ${names[0]} to commit into it (the snapshot goes), or delete the snapshot instead`,
        });
      }
    } else if (base !== undefined && base !== '') {
      throw new InvalidArgument(`commit ${r}: base ${JSON.stringify(base)} is not the volume's parent layer`, { ref: r, hint: 'a pool volume commits into its direct parent only' });
    }
    return parent.file;
  }

  private commitTask(volume: string, top: string, into: string): JobTask {
    return {
      type: 'commit',
      params: { volume, top, into },
      run: async (ctx) => {
        const v = this.mustVolume(volume);
        if (v.active === into) return; // pivoted already (a resumed job whose work was done)
        if (v.active !== top || this.meta.layer(top)?.parent !== into) {
          throw new FailedPrecondition(`commit ${this.ref(volume)}: the volume's layers changed since the job was made`, { ref: this.ref(volume), hint: 'start the commit again' });
        }
        this.commitTarget(v, this.meta.snapshotsOnLayer(into)[0]?.name);
        this.claim(volume, 'commit');
        try {
          const ov = this.open.acquire(volume);
          try {
            const img = await ov.lock.shared(() => ov.current());
            await runCommit(img, { base: this.abs(into), active: true }, autoCompleting(ctx));
            // The open image now writes to `into`; record the pivot and drop the old top.
            await this.serial.run(async () => {
              await ov.swap(async () => {
                this.meta.tx(() => {
                  for (const s of this.meta.snapshotsOnLayer(into)) this.meta.removeSnapshot(s.volume, s.name);
                  this.meta.updateVolume(volume, { active: into });
                  this.meta.setLayerState(top, 'deleting');
                });
              });
              await this.unlinkLayers([top]);
            });
          } finally {
            await this.open.release(ov);
          }
        } finally {
          this.release(volume);
        }
      },
    };
  }

  async resumeTask(type: string, params: Record<string, unknown>): Promise<JobTask | undefined> {
    const str = (k: string) => (typeof params[k] === 'string' ? params[k] as string : undefined);
    const volume = str('volume');
    if (volume === undefined || !this.meta.volume(volume)) return undefined;
    if (type === 'stream' && str('target') !== undefined) {
      const base = params.base === null ? null : str('base');
      if (base === undefined) return undefined;
      return this.streamTask(volume, str('target')!, base);
    }
    if (type === 'commit' && str('top') !== undefined && str('into') !== undefined) return this.commitTask(volume, str('top')!, str('into')!);
    return undefined;
  }

  // ---- data path ----

  async openVolume(name: string, mode: 'r' | 'rw'): Promise<BlockDevice> {
    this.mustVolume(name);
    const ov = this.open.acquire(name);
    try {
      const size = await ov.lock.shared(async () => (await ov.current()).virtualSize);
      return volumeDevice(ov, this.ref(name), mode, size, this.opts.format === 'qcow2' ? this.opts.clusterSize : 512, () => this.open.release(ov));
    } catch (e) {
      await this.open.release(ov);
      throw e;
    }
  }

  /** The files of a volume's chain, top (active) first, as absolute paths: what to give qemu or libvirt. */
  chainFiles(volume: string): string[] {
    return this.meta.chain(this.mustVolume(volume).active).map((l) => this.abs(l.file));
  }

  /** `pool check`: metadata against files (see pool-check.ts); `repair` finishes interrupted work. */
  async check(opts: { repair?: boolean } = {}): Promise<PoolCheckReport> {
    return this.serial.run(() => checkPool(this, opts));
  }

  async close(): Promise<void> {
    await this.serial.run(async () => {
      await this.open.closeAll();
      this.meta.close();
    });
  }

  // ---- layers ----

  /** Create a layer file, named by a pending row first (so a crash leaves a row pointing at it). */
  private async makeLayer(volume: string, parent: string | null, size: number): Promise<string> {
    for (let attempt = 0; ; attempt++) {
      const file = `${volume}.${randomBytes(4).toString('hex')}.${this.opts.format}`;
      if (this.meta.layer(file)) continue;
      this.meta.addLayer({ file, volume, parent, state: 'pending', pid: process.pid });
      this.inFlight.add(file);
      try {
        await createImage(this.abs(file), parent === null
          ? { format: this.opts.format, size, ...(this.opts.format === 'qcow2' ? { clusterSize: this.opts.clusterSize } : {}) }
          : { format: 'qcow2', size, clusterSize: this.opts.clusterSize, backingFile: parent, backingFormat: 'qcow2' });
      } catch (e) {
        this.meta.removeLayer(file);
        this.inFlight.delete(file);
        if ((e as { code?: string }).code === 'AlreadyExists' && attempt < 5) continue; // a foreign file has the name
        throw e;
      }
      await this.opts.hooks?.afterFileCreated?.(file);
      return file;
    }
  }

  /** Undo a layer that was made but never recorded as ready. */
  private async abandonLayer(file: string): Promise<void> {
    await rm(this.abs(file), { force: true });
    this.meta.removeLayer(file);
    this.inFlight.delete(file);
  }

  /** Delete files whose rows are `deleting`, then the rows. */
  private async unlinkLayers(files: string[]): Promise<void> {
    for (const f of files) {
      await rm(this.abs(f), { force: true });
      this.meta.removeLayer(f);
    }
  }

  /**
   * A frozen layer that lost a user (its snapshot name, a child): delete it when nothing sits on
   * it, merge it into its one child, or keep it (hidden) while several layers sit on it.
   */
  private async compact(file: string): Promise<void> {
    const row = this.meta.layer(file);
    if (!row || row.state !== 'ready') return;
    if (this.meta.snapshotsOnLayer(file).length > 0 || this.meta.volumeByActive(file)) return;
    const children = this.meta.children(file);
    if (children.length === 0) {
      this.meta.setLayerState(file, 'deleting');
      await this.unlinkLayers([file]);
      if (row.parent !== null) await this.compact(row.parent);
      return;
    }
    if (children.length > 1) return;
    const child = children[0]!;
    if (child.state !== 'ready' || this.busy.has(child.volume)) return;
    // Merge into the child: it pulls the clusters it lacks from this layer, then skips it.
    const affected = this.volumesAbove(child.file);
    await this.withWritable(child.volume, child.file, (img) =>
      runStream(img, row.parent === null ? {} : { base: this.abs(row.parent) }, inlineContext(`merge ${file}`)));
    this.meta.tx(() => {
      this.meta.setParent(child.file, row.parent);
      this.meta.setLayerState(file, 'deleting');
    });
    await this.open.reopen(affected);
    await this.unlinkLayers([file]);
  }

  /**
   * Run `fn` on a read-write image of `file`: the volume's shared open image when `file` is its
   * active layer, else a private read-write open of that frozen layer.
   */
  private async withWritable(volume: string, file: string, fn: (img: Image) => Promise<void>): Promise<void> {
    const v = this.mustVolume(volume);
    if (v.active === file) {
      const ov = this.open.acquire(volume);
      try {
        const img = await ov.lock.shared(() => ov.current());
        await fn(img);
      } finally {
        await this.open.release(ov);
      }
      return;
    }
    const img = await this.openLayer(file, false);
    try {
      await fn(img);
      await img.flush();
    } finally {
      await img.close();
    }
  }

  /** Volumes whose chain goes through `file` (their open images hold it). */
  private volumesAbove(file: string): string[] {
    return this.meta.volumes().filter((v) => this.meta.chain(v.active).some((l) => l.file === file)).map((v) => v.name);
  }

  /** The lowest layer of v's own chain, and the foreign layer under it (null when independent). */
  private bottomOwn(v: VolumeRow): { target: string; below: string | null } {
    let target = v.active;
    for (const l of this.meta.chain(v.active)) {
      if (l.volume !== v.name) return { target, below: l.file };
      target = l.file;
    }
    return { target, below: null };
  }

  /** `base` of a stream: a snapshot (`vol@snap` or a snapshot name) or a volume in the chain below. */
  private resolveBase(v: VolumeRow, below: string | null, base: string): string {
    const r = this.ref(v.name);
    const chain = below === null ? [] : this.meta.chain(below);
    const at = base.indexOf('@');
    for (const l of chain) {
      const snaps = this.meta.snapshotsOnLayer(l.file);
      const hit = at >= 0
        ? snaps.some((s) => `${s.volume}@${s.name}` === base || `${this.ref(s.volume)}@${s.name}` === base)
        : snaps.some((s) => s.name === base) || l.volume === base || this.ref(l.volume) === base;
      if (hit) return l.file;
    }
    throw new NotFound(`stream ${r}: base ${JSON.stringify(base)} is not below the volume's own layers`, {
      ref: r, hint: chain.length === 0 ? 'the volume depends on nothing: there is nothing to stream' : `ancestors: ${chain.map((l) => this.layerRef(l.file)).join(', ')}`,
    });
  }

  private async openActive(volume: string): Promise<Image> {
    const v = this.mustVolume(volume);
    return this.openLayer(v.active, false);
  }

  private openLayer(file: string, readOnly: boolean): Promise<Image> {
    return openImage(this.abs(file), { readOnly, format: this.opts.format, ...this.rootOpt() });
  }

  private rootOpt(): { allowedRoot?: string } {
    return this.opts.allowBackingOutsidePool ? {} : { allowedRoot: this.dir };
  }

  abs(file: string): string {
    return join(this.dir, file);
  }

  // ---- helpers ----

  private claim(volume: string, what: string): void {
    this.assertNotBusy(volume, what);
    this.busy.set(volume, what);
  }

  private release(volume: string): void {
    this.busy.delete(volume);
  }

  private assertNotBusy(volume: string, what: string): void {
    const job = this.busy.get(volume);
    if (job) throw new Busy(`cannot ${what} ${this.ref(volume)}: a ${job} job is running on it`, { ref: this.ref(volume), hint: 'wait for the job to end or cancel it' });
  }

  private needLayers(what: string): void {
    if (this.opts.format !== 'qcow2') {
      throw new FailedPrecondition(`${this.name} is a raw pool: ${what} needs qcow2 layers`, { ref: this.name, hint: 'use a pool with format qcow2' });
    }
  }

  private checkSize(size: unknown, name: string): void {
    const r = this.ref(name);
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

  private mustVolume(name: string): VolumeRow {
    const v = this.meta.volume(name);
    if (!v) throw new NotFound(`volume ${this.ref(name)} does not exist`, { ref: this.ref(name), hint: `list volumes with \`offload volume list ${this.name}\`` });
    return v;
  }

  ref(volume: string): string {
    return `${this.name}/${volume}`;
  }

  /** A layer as users know it: `backend/vol@snap`, `backend/vol` (active or hidden layer of vol). */
  layerRef(file: string): string {
    const row = this.meta.layer(file);
    if (!row) return file;
    const snap = this.meta.snapshotsOnLayer(file)[0];
    return snap ? `${this.ref(snap.volume)}@${snap.name}` : this.ref(row.volume);
  }

  /** The ref a volume still depends on: the first foreign layer of its chain. */
  parentRef(v: VolumeRow): string | undefined {
    const { below } = this.bottomOwn(v);
    return below === null ? undefined : this.layerRef(below);
  }

  private view(v: VolumeRow, withAllocation = false): Volume {
    const parent = this.parentRef(v);
    const out: Volume = { backend: this.name, name: v.name, sizeBytes: v.sizeBytes, createdAt: v.createdAt };
    if (parent !== undefined) out.parent = parent;
    if (v.owner !== null) out.owner = v.owner;
    if (withAllocation) out.allocatedBytes = this.allocated(v.name);
    return out;
  }

  /** Bytes the volume's own files take on disk (what deleting it frees). */
  private allocated(volume: string): number {
    let total = 0;
    for (const l of this.meta.layersOf(volume)) {
      try {
        total += statBlocks(this.abs(l.file));
      } catch {
        // a missing file is pool check's business
      }
    }
    return total;
  }

  private snapView(s: { volume: string; name: string; sizeBytes: number; createdAt: string }): Snapshot {
    return { backend: this.name, volume: s.volume, name: s.name, sizeBytes: s.sizeBytes, createdAt: s.createdAt };
  }

  /** For pool check: pending rows whose writer is gone. */
  isAbandoned(row: LayerRow): boolean {
    if (row.pid === process.pid) return !this.inFlight.has(row.file);
    try {
      process.kill(row.pid, 0);
      return false;
    } catch (e) {
      return (e as NodeJS.ErrnoException).code === 'ESRCH';
    }
  }

  /** For pool check: the open layers of this process are not checked or repaired under a writer. */
  isOpen(file: string): boolean {
    return this.meta.volumes().some((v) => v.active === file && this.open.get(v.name)?.isOpen);
  }
}

function statBlocks(path: string): number {
  return statSync(path).blocks * 512;
}

function roundUp512(n: number): number {
  return Math.ceil(n / 512) * 512;
}
