import { randomBytes } from 'node:crypto';
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { Busy, currentBoot, FailedPrecondition, NotFound, type Logger, type Snapshot, type Volume } from '../../../core/index.js';
import { openImage, type Image } from '../engine/index.js';
import { METADATA_FILE, PoolMetadata, type LayerRow, type VolumeRow } from './metadata.js';
import { OpenVolumes } from './open-volumes.js';
import { Serial } from './serial.js';

export interface PoolOptions {
  name: string;
  /** Absolute path of the pool folder (exists, writable). */
  dir: string;
  format: 'qcow2' | 'raw';
  clusterSize: number;
  allowBackingOutsidePool: boolean;
  logger?: Logger;
  /** Test hooks: the points where the crash tests stop the process (afterFileCreated: a layer file made, not yet recorded as ready). */
  hooks?: {
    afterFileCreated?: (file: string) => void | Promise<void>;
    /**
     * An active commit (a snapshot delete's commit down, a commit job): about to copy; with the
     * volume's writers held and the change lock taken, in sync (before its record) and recorded
     * (before the switch); switched (writes go to the new layer).
     */
    activeCommit?: (stage: 'copying' | 'in-sync' | 'recorded' | 'switched') => void | Promise<void>;
    /** A snapshot delete committing a frozen layer down into the deleted snapshot's: copied (durable), marked `merged`, renamed over the child's file. */
    commitChildDown?: (stage: 'copied' | 'marked' | 'renamed') => void | Promise<void>;
  };
}

/**
 * What every part of the pool shares (the backend facade, the layer life cycle, the chain jobs,
 * pool check): its folder and metadata, the open images, the serial section structural changes
 * run in, the volumes a job works on, and how files and rows are named to users.
 */
export class PoolState {
  readonly meta: PoolMetadata;
  readonly open: OpenVolumes;
  /**
   * Structural changes (create, delete, snapshot, revert, the end of a job) run one at a time, in
   * this process and across the processes that open the pool (its metadata holds the lock).
   */
  readonly serial: Serial;
  /** This pool object among the processes (and pool objects) sharing the folder: `BOOT.RANDOM`. */
  private readonly holder = `${BOOT}.${randomBytes(8).toString('hex')}`;

  /** This pool object's id in the rows it writes (pool_lock, open_volumes). */
  get holderId(): string {
    return this.holder;
  }

  /** Whether another process (or pool object) has the volume open: see notOpenElsewhere. */
  isOpenElsewhere(volume: string): boolean {
    return this.meta.openedBy(volume, this.holder).some((o) => holderAlive(o.pid, o.holder));
  }
  /** Volumes a stream or commit job is working on: structural changes wait for it (Busy). */
  private readonly busy = new Map<string, string>();
  /** Layer files this process is creating right now (their pending rows are not orphans). */
  readonly inFlight = new Set<string>();
  /** Snapshot layers open for reading in this process (openSnapshot), by file: a commit down would change what they read. */
  private readonly snapshotReaders = new Map<string, number>();

  /** openSnapshot of the layer `file`: registered here and, for the other processes, in the metadata; the returned function ends it. */
  readSnapshot(file: string): () => void {
    const n = this.snapshotReaders.get(file) ?? 0;
    if (n === 0) this.meta.startReading(file, this.holder);
    this.snapshotReaders.set(file, n + 1);
    let done = false;
    return () => {
      if (done) return;
      done = true;
      const left = (this.snapshotReaders.get(file) ?? 1) - 1;
      if (left > 0) return void this.snapshotReaders.set(file, left);
      this.snapshotReaders.delete(file);
      try {
        this.meta.stopReading(file, this.holder);
      } catch {
        // the metadata is closing: the row dies with this holder (closeAll, or its pid is checked)
      }
    };
  }

  /** Whether a snapshot reader, in this process or another, has the layer `file` open: nothing may write into it. */
  isReadAsSnapshot(file: string): boolean {
    if (this.snapshotReaders.has(file)) return true;
    return this.meta.readersOf(file, this.holder).some((r) => {
      if (holderAlive(r.pid, r.holder)) return true;
      this.meta.stopReading(file, r.holder); // its process is gone
      return false;
    });
  }

  /** `beforeChange`: run at the start of every structural change, under the change lock (Serial's `first`). */
  constructor(readonly opts: PoolOptions, beforeChange?: (p: PoolState) => Promise<void>) {
    this.meta = new PoolMetadata(join(opts.dir, METADATA_FILE));
    liveHolders.add(this.holder);
    this.serial = new Serial({ tryLock: () => this.meta.tryLock(this.holder, holderAlive), unlock: () => this.meta.unlock(this.holder) }, `pool ${opts.name}`,
      async () => beforeChange?.(this));
    this.open = new OpenVolumes((v) => this.openLayer(this.mustVolume(v).active, false), {
      opened: (v) => this.meta.openVolume(v, this.holder),
      closed: (v) => this.meta.closeVolume(v, this.holder),
      elsewhere: (v, what) => this.notOpenElsewhere(v, what),
    });
  }

  /**
   * Busy when another process (or another pool object of this one) has the volume open: changing
   * its layers now would pull them from under that process's open image.
   */
  notOpenElsewhere(volume: string, what: string): void {
    const others = this.meta.openedBy(volume, this.holder).filter((o) => {
      if (!holderAlive(o.pid, o.holder)) {
        this.meta.closeVolume(volume, o.holder); // its process is gone
        return false;
      }
      return true;
    });
    if (others.length === 0) return;
    const pids = [...new Set(others.map((o) => o.pid))].join(', ');
    throw new Busy(`volume ${this.ref(volume)} is open in another process (pid ${pids}): ${what} would change its layers under that process's writes`, {
      ref: this.ref(volume), hint: 'stop what uses it there (its export, job or open device) first', data: { pids: others.map((o) => o.pid) },
    });
  }

  get name(): string { return this.opts.name; }
  get dir(): string { return this.opts.dir; }

  abs(file: string): string {
    return join(this.dir, file);
  }

  ref(volume: string): string {
    return `${this.name}/${volume}`;
  }

  openLayer(file: string, readOnly: boolean): Promise<Image> {
    return openImage(this.abs(file), { readOnly, format: this.opts.format, ...(this.opts.allowBackingOutsidePool ? {} : { allowedRoot: this.dir }) });
  }

  mustVolume(name: string): VolumeRow {
    const v = this.meta.volume(name);
    if (!v) throw new NotFound(`volume ${this.ref(name)} does not exist`, { ref: this.ref(name), hint: `list volumes with \`offload volume list ${this.name}\`` });
    return v;
  }

  needLayers(what: string): void {
    if (this.opts.format !== 'qcow2') {
      throw new FailedPrecondition(`${this.name} is a raw pool: ${what} needs qcow2 layers`, { ref: this.name, hint: 'use a pool with format qcow2' });
    }
  }

  // ---- volumes a job works on ----

  claim(volume: string, what: string): void {
    this.assertNotBusy(volume, what);
    this.busy.set(volume, what);
  }

  release(volume: string): void {
    this.busy.delete(volume);
  }

  /** `merged` layers finishMerges could not finish, with the volumes over them it holds Busy. */
  private readonly stuck = new Map<string, string[]>();

  /** finishMerges failed on `file`: the volumes over it (those no job holds) are Busy until it is finished. */
  stick(file: string, volumes: string[], why: string): void {
    if (this.stuck.has(file)) return;
    const held = volumes.filter((v) => !this.busy.has(v));
    for (const v of held) this.busy.set(v, 'snapshot delete (interrupted, not finished: see `offload pool check`)');
    this.stuck.set(file, held);
    this.opts.logger?.warn(`pool ${this.name}: cannot finish the interrupted snapshot delete that merged ${file}: ${why}; ${volumes.map((v) => this.ref(v)).join(', ')} cannot be changed until it is`);
  }

  /** The layers stick() holds volumes for. */
  stuckLayers(): string[] {
    return [...this.stuck.keys()];
  }

  /** `file` is finished (or no longer `merged`): its volumes may change again. */
  unstick(file: string): void {
    for (const v of this.stuck.get(file) ?? []) this.busy.delete(v);
    this.stuck.delete(file);
  }

  isBusy(volume: string): boolean {
    return this.busy.has(volume);
  }

  assertNotBusy(volume: string, what: string): void {
    const job = this.busy.get(volume);
    if (job) throw new Busy(`cannot ${what} ${this.ref(volume)}: a ${job} job is running on it`, { ref: this.ref(volume), hint: 'wait for the job to end or cancel it' });
  }

  // ---- chains ----

  /** The lowest layer of v's own chain, and the foreign layer under it (null when independent). */
  bottomOwn(v: VolumeRow): { target: string; below: string | null } {
    let target = v.active;
    for (const l of this.meta.chain(v.active)) {
      if (l.volume !== v.name) return { target, below: l.file };
      target = l.file;
    }
    return { target, below: null };
  }

  /** Volumes whose chain goes through `file` (their open images hold it). */
  volumesAbove(file: string): string[] {
    return this.meta.volumes().filter((v) => this.meta.chain(v.active).some((l) => l.file === file)).map((v) => v.name);
  }

  // ---- how users see rows ----

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

  view(v: VolumeRow, withAllocation = false): Volume {
    const parent = this.parentRef(v);
    // Its id: the time it was made, to the millisecond (the pool's rows have no other identity a volume made again under its name would not share).
    const out: Volume = { backend: this.name, name: v.name, sizeBytes: v.sizeBytes, createdAt: v.createdAt, id: v.createdAt };
    if (parent !== undefined) out.parent = parent;
    if (v.owner !== null) out.owner = v.owner;
    if (withAllocation) out.allocatedBytes = this.allocated(v.name);
    return out;
  }

  snapView(s: { volume: string; name: string; sizeBytes: number; createdAt: string }): Snapshot {
    return { backend: this.name, volume: s.volume, name: s.name, sizeBytes: s.sizeBytes, createdAt: s.createdAt };
  }

  /** Bytes the volume's own files take on disk (what deleting it frees). */
  private allocated(volume: string): number {
    let total = 0;
    for (const l of this.meta.layersOf(volume)) {
      try {
        total += statSync(this.abs(l.file)).blocks * 512;
      } catch {
        // a missing file is pool check's business
      }
    }
    return total;
  }

  // ---- for pool check ----

  /** A pending row whose writer is gone. */
  isAbandoned(row: LayerRow): boolean {
    if (row.pid === process.pid) return !this.inFlight.has(row.file);
    return !pidAlive(row.pid);
  }

  /** The open layers of this process are not checked or repaired under a writer. */
  isOpen(file: string): boolean {
    return this.meta.volumes().some((v) => v.active === file && this.open.get(v.name)?.isOpen);
  }
}

/**
 * The pool objects alive in this process. A row of this pid with a holder not among them is left
 * by a process that died and whose pid this one got again (a container's pid 1, restarted), or
 * by a pool object of this process that was closed.
 */
const liveHolders = new Set<string>();

/** This machine's boot, in the holders this process writes. */
const BOOT = currentBoot();

/**
 * A new volume's creation time, which is also its id (Volume.id): never the same twice in this
 * process, so that a volume deleted and made again at once under its name still has another.
 */
export function creationTime(): string {
  lastCreation = Math.max(Date.now(), lastCreation + 1);
  return new Date(lastCreation).toISOString();
}
let lastCreation = 0;

/**
 * Whether the holder of a pool_lock or open_volumes row still lives. A row of an earlier boot
 * (after a power loss) does not, whatever process has its pid now. (Holders of builds before the
 * boot was in them have no dot: judged by pid alone.)
 */
function holderAlive(pid: number, holder: string): boolean {
  const dot = holder.indexOf('.');
  if (dot >= 0 && holder.slice(0, dot) !== BOOT) return false;
  return pid === process.pid ? liveHolders.has(holder) : pidAlive(pid);
}

/** This pool object is closed: its rows no longer hold anything. */
export function forgetHolder(state: PoolState): void {
  liveHolders.delete(state.holderId);
}

/** Whether a process of this host is alive (EPERM: it is, someone else's). */
function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code !== 'ESRCH';
  }
}
