/**
 * One open read-write image per volume per process, shared by every BlockDevice and job on that
 * volume, so live writes and jobs see each other's changes through the same caches and the
 * same allocator (two writers on one qcow2 file would corrupt it).
 *
 * The image is opened lazily from the volume's current active layer and dropped when the
 * layer changes (snapshot, revert, pivot after a commit, end of a stream): the next I/O opens
 * the new top. Guest I/O holds the lock shared; a swap holds it exclusively.
 */
import { FailedPrecondition, RwLock } from '../../../core/index.js';
import type { CloseOptions, Image } from '../engine/index.js';

/** The one open image of a volume in this process, with the lock that guards swapping it. */
export class OpenVolume {
  readonly lock = new RwLock();
  private image: Image | undefined;
  private opening: Promise<Image> | undefined;
  /** BlockDevices and jobs using this volume. */
  users = 0;
  deleted = false;
  closed = false;

  constructor(readonly name: string, private readonly openActive: () => Promise<Image>) {}

  /** The active image (opened on first use). Call under `lock.shared` or `lock.exclusive`. */
  async current(): Promise<Image> {
    if (this.deleted) throw new FailedPrecondition(`volume ${this.name} was deleted while open`, { ref: this.name, hint: 'close the device' });
    if (this.closed) throw new FailedPrecondition(`volume ${this.name}: its pool was closed`, { ref: this.name, hint: 'open the broker again' });
    if (this.image) return this.image;
    this.opening ??= this.openActive().then((img) => {
      this.image = img;
      return img;
    }).finally(() => { this.opening = undefined; });
    return this.opening;
  }

  /** Whether an image is open right now (without opening one). */
  get isOpen(): boolean {
    return this.image !== undefined;
  }

  /**
   * Quiesce I/O, flush the active image, run `change` (which may replace the active layer on
   * disk and in the metadata), then close the old image so the next I/O opens the new top.
   * If `change` throws, the open image stays as it was.
   */
  async swap<T>(change: () => Promise<T>): Promise<T> {
    return this.lock.exclusive(async () => {
      if (this.image) await this.image.flush();
      const out = await change();
      await this.dropImage();
      return out;
    });
  }

  /** Close the image (after a flush, or as `opts` says); the next I/O reopens. Call under the exclusive lock. */
  async dropImage(opts?: CloseOptions): Promise<void> {
    const img = this.image;
    this.image = undefined;
    if (img) await img.close(opts);
  }
}

/** What other processes sharing the pool learn of this one's open volumes (see PoolState). */
export interface OpenVolumesShared {
  opened(volume: string): void;
  closed(volume: string): void;
  /** Throws Busy when another process has the volume open (`what`: the change refused). */
  elsewhere(volume: string, what: string): void;
}

/** The open volumes of a pool, by name, counted by their users. */
export class OpenVolumes {
  private readonly map = new Map<string, OpenVolume>();

  constructor(private readonly openActive: (volume: string) => Promise<Image>, private readonly shared?: OpenVolumesShared) {}

  /** Get (or make) the shared handle of a volume and count one more user. */
  acquire(name: string): OpenVolume {
    let ov = this.map.get(name);
    if (!ov) {
      ov = new OpenVolume(name, () => this.openActive(name));
      this.map.set(name, ov);
      this.shared?.opened(name);
    }
    ov.users++;
    return ov;
  }

  /** One user fewer; the last one closes the image (as `opts` says: Image.close). */
  async release(ov: OpenVolume, opts?: CloseOptions): Promise<void> {
    ov.users--;
    if (ov.users > 0) return;
    if (this.map.get(ov.name) === ov) {
      this.map.delete(ov.name);
      this.shared?.closed(ov.name);
    }
    await ov.lock.exclusive(() => ov.dropImage(opts));
  }

  get(name: string): OpenVolume | undefined {
    return this.map.get(name);
  }

  /**
   * Run a change of the volume's active layer: quiesced and re-opened afterwards when the
   * volume is open in this process, plainly otherwise.
   */
  async change<T>(name: string, fn: () => Promise<T>, what = 'changing its active layer'): Promise<T> {
    this.shared?.elsewhere(name, what);
    const ov = this.map.get(name);
    return ov ? ov.swap(fn) : fn();
  }

  /** Volumes whose open image must be re-opened because their chain changed below the top. */
  async reopen(names: Iterable<string>): Promise<void> {
    // Not refused when another process has one open: a stream or merge below its top leaves its
    // content as it was, and that process reads the old layers through the files it has open.
    for (const n of names) {
      const ov = this.map.get(n);
      if (ov) await ov.swap(async () => undefined);
    }
  }

  /** Busy when another process has `name` open (a change is about to pull its layers away). */
  assertNotOpenElsewhere(name: string, what: string): void {
    this.shared?.elsewhere(name, what);
  }

  /** A deleted volume: its devices fail from now on. */
  async forget(name: string): Promise<void> {
    const ov = this.map.get(name);
    if (!ov) return;
    this.map.delete(name);
    this.shared?.closed(name);
    await ov.lock.exclusive(async () => {
      ov.deleted = true;
      await ov.dropImage();
    });
  }

  async closeAll(): Promise<void> {
    for (const ov of [...this.map.values()]) {
      this.map.delete(ov.name);
      try {
        this.shared?.closed(ov.name);
      } catch {
        // the metadata is closing too: the row dies with this process (its pid is checked)
      }
      await ov.lock.exclusive(async () => {
        ov.closed = true;
        await ov.dropImage();
      }).catch(() => undefined);
    }
  }
}
