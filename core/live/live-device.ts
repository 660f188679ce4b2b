import type { BlockDevice, ByteRange } from '../backend/block-device.js';
import { FailedPrecondition, InvalidArgument, NotFound } from '../model/errors.js';
import type { Extent } from '../model/types.js';
import type { DirtyMap } from './dirty-map.js';
import type { RangeLocks } from './range-locks.js';

/** Where write-blocking writes go as well, and what keeps them from crossing the copier's ranges. */
export interface SyncTarget {
  device: BlockDevice;
  locks: RangeLocks;
  /**
   * What the copier has still to copy: a write whose every granule is dirty in it goes to the
   * source only (the copier copies it anyway); the target gets only writes to copied ranges.
   */
  pending?: DirtyMap;
  /** Told of a write the target refused: the range is marked dirty instead, for the copier. */
  onError?(e: unknown, range: ByteRange): void;
}

/** What a live copy's write-intent record asks of each write to the source (core/live/write-intent.ts). */
export interface WriteGuard {
  /** Before the write lands: resolves once it may (undefined: at once); rejects when it must not. */
  begin(offset: number, length: number): Promise<void> | undefined;
  /** The write has ended, landed or not. */
  end(offset: number, length: number): void;
}

/**
 * A device in use — what an export serves — that a live job can watch and switch underneath its
 * clients, as QEMU's block layer lets mirror.c do (dirty bitmaps, write notifiers, and
 * bdrv_replace_node at the pivot):
 *
 * - every request goes to the current device;
 * - a write (write, writeFua, writeZeroes, discard) marks the watching dirty maps once it has
 *   landed, so a copier that read the range before it landed copies it again;
 * - with a sync target (write-blocking mode), a write to a range the copier has copied is also
 *   written to the target before it is acknowledged, under the range lock the copier takes, and
 *   marks nothing unless the target refused it; a write to a range still to be copied goes to the
 *   source only: the copier copies it anyway (QEMU's active mirror writes both sides always, and
 *   the guest waits for the target where it need not);
 * - `pause` holds new requests and waits for those in flight, so that a pivot (`switchTo`) or a
 *   last pass sees both sides still; nothing in flight is ever sent to the old device afterwards;
 * - with a guard (a live copy's write-intent record), a write lands only once the guard lets it;
 *   `holdWrites` holds writes (reads go on) until a guard is set: a copy resumed after a crash
 *   records them before any lands.
 */
export class LiveDevice implements BlockDevice {
  private dev: BlockDevice;
  private readonly maps = new Set<DirtyMap>();
  private sync: SyncTarget | undefined;
  private inFlight = 0;
  private drained: (() => void)[] = [];
  private gate: Promise<void> | undefined;
  private openGate: (() => void) | undefined;
  private guard: WriteGuard | undefined;
  private writeHold: Promise<void> | undefined;
  private openWrites: (() => void) | undefined;

  constructor(device: BlockDevice) {
    this.dev = device;
    const zeroes = (d: BlockDevice, offset: number, length: number) => (d.writeZeroes ? d.writeZeroes(offset, length) : d.write(offset, new Uint8Array(length)));
    this.readInto = device.readInto && ((buf, offset) => this.run(async () => {
      if (this.dev.readInto) await this.dev.readInto(buf, offset);
      else buf.set(await this.dev.read(offset, buf.length));
    }));
    this.writeFua = device.writeFua && ((offset, data) => this.writing(offset, data.length, (d) => (d.writeFua ? d.writeFua(offset, data) : d.write(offset, data).then(() => d.flush()))));
    this.writeZeroes = device.writeZeroes && ((offset, length) => this.writing(offset, length, (d) => zeroes(d, offset, length)));
    // A discarded range may read as zeros afterwards: the target follows with zeroes, so it counts as a write.
    this.discard = device.discard && ((offset, length) => this.writing(offset, length, (d, isTarget) => (isTarget ? zeroes(d, offset, length) : d.discard ? d.discard(offset, length) : Promise.resolve())));
    this.allocationDepth = device.allocationDepth && ((offset, length) => this.run(() => (this.dev.allocationDepth ? this.dev.allocationDepth(offset, length) : Promise.resolve([{ offset, length, depth: 1 }]))));
  }

  /** The bitmaps of the device requests go to now (after a switch, the target's). */
  dirtyBitmaps(): string[] {
    return this.dev.dirtyBitmaps?.() ?? [];
  }

  dirtyExtents(name: string, offset: number, length: number): Promise<ByteRange[]> {
    return this.run(() => {
      if (!this.dev.dirtyExtents) throw new NotFound(`no dirty bitmap ${JSON.stringify(name)} on this device`);
      return this.dev.dirtyExtents(name, offset, length);
    });
  }

  /** The device requests go to now. */
  get current(): BlockDevice {
    return this.dev;
  }

  get sizeBytes(): number {
    return this.dev.sizeBytes;
  }

  get blockSize(): number | undefined {
    return this.dev.blockSize;
  }

  /** Mark `map` with every write from now on; returns the detach. */
  watch(map: DirtyMap): () => void {
    if (map.sizeBytes !== this.sizeBytes) throw new InvalidArgument(`a dirty map of ${map.sizeBytes} bytes cannot watch a device of ${this.sizeBytes}`);
    this.maps.add(map);
    return () => void this.maps.delete(map);
  }

  /** Every write to the source asks `guard` first, from now until the returned detach (or a switch). */
  setGuard(guard: WriteGuard): () => void {
    if (this.guard) throw new FailedPrecondition('the device has a write guard already');
    this.guard = guard;
    this.openWrites?.();
    return () => {
      if (this.guard === guard) this.guard = undefined;
    };
  }

  /** Whether writes are held (holdWrites) and no guard has let them go. */
  get writesHeld(): boolean {
    return this.writeHold !== undefined && this.guard === undefined;
  }

  /**
   * Hold every write (reads go on) until a guard is set, or `until` settles: resolved, the writes
   * go on unguarded; rejected, they fail with its reason.
   */
  holdWrites(until: Promise<void>): void {
    if (this.writeHold) throw new FailedPrecondition('the device holds its writes already');
    const hold = new Promise<void>((resolve, reject) => {
      this.openWrites = resolve;
      until.then(resolve, reject);
    });
    hold.catch(() => undefined);
    this.writeHold = hold;
    void hold.then(() => {
      if (this.writeHold === hold) this.writeHold = undefined;
    }, () => undefined);
  }

  /** Write-blocking mode on (a target) or off (undefined). */
  setSyncTarget(target: SyncTarget | undefined): void {
    if (target && target.device.sizeBytes < this.sizeBytes) {
      throw new InvalidArgument(`the target (${target.device.sizeBytes} bytes) is smaller than the device (${this.sizeBytes})`);
    }
    this.sync = target;
  }

  /**
   * Hold new requests and wait for those in flight; `fn` runs with the device quiet, then
   * requests go on (to whatever device is current then). Pauses do not nest.
   */
  async paused<T>(fn: () => Promise<T>): Promise<T> {
    if (this.gate) throw new FailedPrecondition('the device is already paused');
    this.gate = new Promise<void>((r) => (this.openGate = r));
    try {
      if (this.inFlight > 0) await new Promise<void>((r) => this.drained.push(r));
      return await fn();
    } finally {
      const open = this.openGate!;
      this.gate = undefined;
      this.openGate = undefined;
      open();
    }
  }

  /** Send every later request to `device` (call within paused()); returns the device it replaces. */
  switchTo(device: BlockDevice): BlockDevice {
    if (!this.gate) throw new FailedPrecondition('switch devices only while paused: requests in flight would go to the old one');
    if (device.sizeBytes < this.sizeBytes) throw new InvalidArgument(`the new device (${device.sizeBytes} bytes) is smaller than the old (${this.sizeBytes})`);
    const old = this.dev;
    this.dev = device;
    this.sync = undefined;
    this.maps.clear();
    this.guard = undefined;
    return old;
  }

  read(offset: number, length: number): Promise<Uint8Array> {
    return this.run(() => this.dev.read(offset, length));
  }

  extents(offset?: number, length?: number): Promise<Extent[]> {
    return this.run(() => this.dev.extents(offset, length));
  }

  write(offset: number, data: Uint8Array): Promise<void> {
    return this.writing(offset, data.length, (d) => d.write(offset, data));
  }

  // The optional methods exist as the first device has them (an NBD server advertises what it
  // finds, e.g. fast zeroes); after a switch to a device without one, it is done another way.
  readonly readInto: BlockDevice['readInto'];
  readonly writeFua: BlockDevice['writeFua'];
  readonly writeZeroes: BlockDevice['writeZeroes'];
  readonly discard: BlockDevice['discard'];
  readonly allocationDepth: BlockDevice['allocationDepth'];

  flush(): Promise<void> {
    return this.run(async () => {
      await this.dev.flush();
      await this.sync?.device.flush();
    });
  }

  /**
   * Flush the device it serves, not a sync target, as bulk I/O: as durable as any flush, written
   * back at a pace that leaves the guest's I/O first where the device can. For a live copy, before
   * its record lets regions go (a trim) or a point names what its target equals (a stop); not held
   * by a pause (it changes no data), so it may run inside one.
   */
  flushSource(): Promise<void> {
    return this.dev.flush({ background: true });
  }

  close(): Promise<void> {
    return this.dev.close();
  }

  /** A write to the current device, then to the sync target (under its range lock) or into the dirty maps. */
  private async writing(offset: number, length: number, op: (d: BlockDevice, isTarget: boolean) => Promise<void>): Promise<void> {
    // Held before it counts as in flight: a pause does not wait for a write that waits for a guard.
    if (this.writeHold && !this.guard) await this.writeHold;
    return this.run(async () => {
      const guard = this.guard;
      const wait = guard?.begin(offset, length);
      try {
        if (wait) await wait;
        await this.landing(offset, length, op);
      } finally {
        guard?.end(offset, length);
      }
    });
  }

  /** The write itself: to the current device, then to the sync target (under its range lock) or into the dirty maps. */
  private async landing(offset: number, length: number, op: (d: BlockDevice, isTarget: boolean) => Promise<void>): Promise<void> {
    const sync = this.sync;
    if (!sync) {
      await op(this.dev, false);
      this.mark(offset, length);
      return;
    }
    // Both sides at once (the range lock keeps the copier out meanwhile): the guest waits for the
    // slower of the two, not their sum. Whatever failed leaves the range to be copied again.
    await sync.locks.run(offset, length, async () => {
      if (sync.pending?.isAllDirty(offset, length)) {
        // Still to be copied (the copier clears a range under this lock before reading it).
        await op(this.dev, false);
        this.mark(offset, length);
        return;
      }
      const [source, target] = await Promise.allSettled([op(this.dev, false), op(sync.device, true)]);
      if (source.status === 'rejected') {
        this.mark(offset, length); // the target may hold what the source does not: copied again from the source
        throw source.reason;
      }
      if (target.status === 'rejected') {
        this.mark(offset, length);
        sync.onError?.(target.reason, { offset, length });
      }
    });
  }

  private mark(offset: number, length: number): void {
    for (const m of this.maps) m.mark(offset, Math.min(length, m.sizeBytes - offset));
  }

  /** A request, counted in flight (held first while paused). */
  private async run<T>(fn: () => Promise<T>): Promise<T> {
    while (this.gate) await this.gate;
    this.inFlight++;
    try {
      return await fn();
    } finally {
      if (--this.inFlight === 0 && this.drained.length > 0) for (const r of this.drained.splice(0)) r();
    }
  }
}
