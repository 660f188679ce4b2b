/**
 * The `flasharray` StorageBackend: volumes, snapshots and copies are offloaded to the array
 * (instant, thin, done by the array); the data path goes through the mock's HTTP stand-in for
 * iSCSI/FC.
 *
 * CSI semantics on an API that has none of its own:
 * - create is idempotent by name: a create whose answer was lost (reset, timeout) and is
 *   retried meets "already exists"; we then read the volume and return it when it matches
 *   (same size, same copy source), else AlreadyExists. A name still held by a destroyed volume
 *   (pending eradication — e.g. a delete that was interrupted) is eradicated and created anew.
 * - delete = destroy + eradicate; "does not exist" and "has been destroyed" count as progress,
 *   so deleting what is gone succeeds and an interrupted delete can be repeated. A volume with
 *   snapshots is FailedPrecondition (the array would destroy them along with it).
 * - grow only: shrinking is OutOfRange before the array is asked (it would need `truncate`).
 * - revert = overwrite the volume with a copy of its snapshot (instant); the size becomes the
 *   snapshot's.
 * - a snapshot's data is read through the data plane as `vol.suffix` (openSnapshot), read-only.
 * Every request is therefore safe to repeat, which is what lets the client retry anything.
 */
import {
  AlreadyExists, CapabilitySet, FailedPrecondition, InvalidArgument, NotFound, OutOfRange, Unsupported,
  type BlockDevice, type ChangedExtents, type ChangedExtentsRequest, type CreateVolumeRequest, type Extent, type Page,
  type PageRequest, type Snapshot, type StorageBackend, type Volume,
} from '../../core/index.js';
import { ARRAY_NAME, MAX_PROVISIONED, Match, SECTOR } from './api/messages.js';
import { Volume as ApiVolume, VolumeSnapshot as ApiSnapshot } from './api/schemas.js';
import { apiMessage, type FlashArrayClient } from './client.js';

/** Largest byte range sent in one data-plane request. */
const IO_SPLIT = 8 * 1024 * 1024;

const CAPS = new CapabilitySet([
  // Names the array can hold are narrower than the broker's: say so where callers can see it.
  ['volume.create', { maxSizeBytes: MAX_PROVISIONED, sizeGranularity: SECTOR, maxNameLength: 63, namePattern: ARRAY_NAME.source }],
  'volume.delete', 'volume.resize', 'volume.list',
  'snapshot.create', 'snapshot.delete', 'snapshot.revert',
  'clone.full',
  // Snapshots are readable through the data plane as `vol.suffix` (openSnapshot).
  ['data.read', { snapshots: true }], 'data.write', 'data.extents', 'data.dirty',
]);

/** The `flasharray` StorageBackend: volumes, snapshots and clones offloaded to the array, and its data path. */
export class FlashArrayBackend implements StorageBackend {
  readonly kind = 'flasharray';

  constructor(readonly name: string, private readonly client: FlashArrayClient) {}

  async capabilities(): Promise<CapabilitySet> {
    return CAPS;
  }

  // ---------- volumes ----------

  async createVolume(req: CreateVolumeRequest): Promise<Volume> {
    const name = this.arrayName(req.name, 'volume name');
    if (req.mode === 'linked') {
      throw new Unsupported(`flasharray "${this.name}" cannot make a linked clone of ${this.ref(req.source?.volume ?? '')}`, {
        ref: this.ref(name), hint: 'array copies are independent (clone.full, instant and thin on the array); ask for mode "full"',
      });
    }
    if (req.source) return this.copyVolume(name, req.source, req.sizeBytes);
    if (req.sizeBytes === undefined) throw new InvalidArgument(`creating ${this.ref(name)} needs a size`, { ref: this.ref(name) });
    const size = this.roundSize(req.sizeBytes, name);
    const what = `create volume ${name}`;
    const post = () => this.client.api('POST', 'volumes', { what, ref: this.ref(name), query: { names: name }, body: { provisioned: size } });
    try {
      return this.toVolume(this.firstVolume((await this.retryOverDestroyed(name, post)).body, what));
    } catch (e) {
      if (!(e instanceof AlreadyExists)) throw e;
      // Maybe our own earlier try, whose answer was lost: the same volume is the answer.
      const existing = (e.data?.existing as ApiVolume | undefined) ?? await this.findVolume(name);
      if (existing && !existing.destroyed && existing.provisioned === size && !existing.source) return this.toVolume(existing);
      throw new AlreadyExists(`volume ${this.ref(name)} already exists${existing ? ` with ${existing.provisioned} bytes${existing.source?.name ? ` (a copy of ${existing.source.name})` : ''}` : ''}; asked for a new ${size}-byte volume`, {
        ref: this.ref(name), hint: 'choose another name, or delete the existing volume first',
      });
    }
  }

  /** Offloaded copy (clone.full): the array copies a volume or snapshot instantly. */
  private async copyVolume(name: string, source: { volume: string; snapshot?: string }, sizeBytes: number | undefined): Promise<Volume> {
    const srcName = source.snapshot === undefined ? source.volume : `${source.volume}.${source.snapshot}`;
    const srcRef = source.snapshot === undefined ? this.ref(source.volume) : `${this.ref(source.volume)}@${source.snapshot}`;
    const srcSize = await this.sourceSize(source, srcRef);
    const size = sizeBytes === undefined ? srcSize : this.roundSize(sizeBytes, name);
    if (size < srcSize) {
      throw new OutOfRange(`a clone of ${srcRef} cannot be smaller than it (${size} < ${srcSize} bytes)`, { ref: this.ref(name), hint: 'ask for at least the source size' });
    }
    const what = `copy ${srcName} to volume ${name}`;
    const post = () => this.client.api('POST', 'volumes', { what, ref: this.ref(name), query: { names: name }, body: { source: { name: srcName } } });
    let volume: Volume;
    try {
      volume = this.toVolume(this.firstVolume((await this.retryOverDestroyed(name, post)).body, what));
    } catch (e) {
      if (e instanceof NotFound && apiMessage(e)?.includes(Match.noSuch)) {
        throw new NotFound(`clone source ${srcRef} does not exist`, { ref: srcRef, cause: e });
      }
      if (!(e instanceof AlreadyExists)) throw e;
      // A retried copy whose first answer was lost: the same copy is fine, anything else is not.
      const existing = (e.data?.existing as ApiVolume | undefined) ?? await this.findVolume(name);
      if (!existing || existing.destroyed || existing.source?.name !== srcName || existing.provisioned > size) {
        throw new AlreadyExists(`volume ${this.ref(name)} already exists and is not a copy of ${srcRef}`, {
          ref: this.ref(name), hint: 'choose another name, or delete the existing volume first',
        });
      }
      volume = this.toVolume(existing);
    }
    return volume.sizeBytes < size ? this.resizeVolume(name, size) : volume;
  }

  async getVolume(name: string): Promise<Volume | undefined> {
    const v = await this.findVolume(name);
    return v && !v.destroyed ? this.toVolume(v) : undefined;
  }

  async listVolumes(page?: PageRequest): Promise<Page<Volume>> {
    if (page?.limit !== undefined && (!Number.isInteger(page.limit) || page.limit < 1)) {
      throw new InvalidArgument(`page limit must be a positive integer, got ${page.limit}`);
    }
    const p = await this.client.page('volumes', ApiVolume, { destroyed: false }, page, `list volumes of ${this.name}`);
    return { items: p.items.map((v) => this.toVolume(v)), ...(p.next ? { next: p.next } : {}) };
  }

  async resizeVolume(name: string, sizeBytes: number): Promise<Volume> {
    this.arrayName(name, 'volume name');
    const current = await this.getVolume(name);
    if (!current) throw new NotFound(`volume ${this.ref(name)} does not exist`, { ref: this.ref(name) });
    const size = this.roundSize(sizeBytes, name);
    if (size < current.sizeBytes) {
      throw new OutOfRange(`volume ${this.ref(name)} cannot shrink from ${current.sizeBytes} to ${size} bytes`, { ref: this.ref(name), hint: 'volumes can only grow' });
    }
    if (size === current.sizeBytes) return current;
    const what = `resize volume ${name}`;
    const { body } = await this.client.api('PATCH', 'volumes', { what, ref: this.ref(name), query: { names: name }, body: { provisioned: size } });
    return this.toVolume(this.firstVolume(body, what));
  }

  async deleteVolume(name: string): Promise<void> {
    if (!ARRAY_NAME.test(name)) return; // the array cannot hold it, so it is gone
    const ref = this.ref(name);
    let snapshots: ApiSnapshot[];
    try {
      snapshots = await this.client.all('volume-snapshots', ApiSnapshot, { source_names: name, destroyed: false }, `list snapshots of ${name}`, ref);
    } catch (e) {
      if (e instanceof NotFound) return;
      throw e;
    }
    if (snapshots.length > 0) {
      throw new FailedPrecondition(`volume ${ref} has ${snapshots.length} snapshot(s) (${snapshots.slice(0, 3).map((s) => s.suffix).join(', ')}${snapshots.length > 3 ? ', …' : ''})`, {
        ref, hint: 'delete its snapshots first', data: { snapshots: snapshots.map((s) => s.suffix) },
      });
    }
    await this.destroyAndEradicate('volumes', name, ref);
  }

  // ---------- snapshots ----------

  async createSnapshot(volume: string, name: string): Promise<Snapshot> {
    this.arrayName(volume, 'volume name');
    const suffix = this.arrayName(name, 'snapshot name');
    const full = `${volume}.${suffix}`;
    const ref = `${this.ref(volume)}@${name}`;
    const what = `snapshot volume ${volume} as ${full}`;
    const post = () => this.client.api('POST', 'volume-snapshots', { what, ref, query: { source_names: volume }, body: { suffix } });
    try {
      const { body } = await this.retryOverDestroyed(full, post, 'volume-snapshots');
      return this.toSnapshot(this.firstSnapshot(body, what));
    } catch (e) {
      if (e instanceof NotFound) throw new NotFound(`volume ${this.ref(volume)} does not exist`, { ref: this.ref(volume), cause: e });
      if (!(e instanceof AlreadyExists)) throw e;
      // Same name and source (a retried create): the snapshot that is there is the answer.
      const existing = (e.data?.existing as ApiSnapshot | undefined) ?? await this.findSnapshot(full);
      if (existing && !existing.destroyed) return this.toSnapshot(existing);
      throw e;
    }
  }

  async listSnapshots(volume: string): Promise<Snapshot[]> {
    if (!ARRAY_NAME.test(volume)) throw new NotFound(`volume ${this.ref(volume)} does not exist`, { ref: this.ref(volume) });
    const items = await this.client.all('volume-snapshots', ApiSnapshot, { source_names: volume, destroyed: false }, `list snapshots of ${volume}`, this.ref(volume));
    // Oldest first, as the pool lists them (the array lists by name); a tie keeps the array's order.
    return items.map((s, i) => ({ s, i })).sort((a, b) => a.s.created - b.s.created || a.i - b.i).map(({ s }) => this.toSnapshot(s));
  }

  async deleteSnapshot(volume: string, name: string): Promise<void> {
    if (!ARRAY_NAME.test(volume) || !ARRAY_NAME.test(name)) return;
    await this.destroyAndEradicate('volume-snapshots', `${volume}.${name}`, `${this.ref(volume)}@${name}`);
  }

  async revertVolume(volume: string, snapshot: string): Promise<void> {
    this.arrayName(volume, 'volume name');
    this.arrayName(snapshot, 'snapshot name');
    const ref = `${this.ref(volume)}@${snapshot}`;
    const full = `${volume}.${snapshot}`;
    if (!(await this.getVolume(volume))) throw new NotFound(`volume ${this.ref(volume)} does not exist`, { ref: this.ref(volume) });
    const snap = await this.findSnapshot(full);
    if (!snap || snap.destroyed) throw new NotFound(`snapshot ${ref} does not exist`, { ref });
    await this.client.api('POST', 'volumes', {
      what: `revert volume ${volume} to ${full}`, ref, query: { names: volume, overwrite: true }, body: { source: { name: full } },
    });
  }

  // ---------- changed blocks ----------

  /**
   * `data.dirty` through the array's volume diff (`GET volumes/diff`): `names` is the volume, or
   * its snapshot `volume.until`; `base_name` is `volume.since`. The array answers in whole blocks
   * of its tracking unit, clipped to the segment; a snapshot pending eradication counts as gone.
   */
  async changedExtents(volume: string, req: ChangedExtentsRequest): Promise<ChangedExtents> {
    const ref = this.ref(volume);
    const snapRef = (s: string) => `${ref}@${s}`;
    for (const [k, v] of [['offset', req.offset], ['length', req.length]] as const) {
      if (v !== undefined && (!Number.isSafeInteger(v) || v < 0)) {
        throw new InvalidArgument(`changed extents of ${ref}: ${k} must be a non-negative whole number of bytes, got ${v}`, { ref });
      }
    }
    if (!ARRAY_NAME.test(volume)) throw new NotFound(`volume ${ref} does not exist`, { ref });
    for (const s of [req.since, req.until]) {
      if (s !== undefined && !ARRAY_NAME.test(s)) throw new NotFound(`snapshot ${snapRef(s)} does not exist`, { ref: snapRef(s) });
    }
    const name = req.until === undefined ? volume : `${volume}.${req.until}`;
    const base = `${volume}.${req.since}`;
    let answer: Awaited<ReturnType<FlashArrayClient['volumeDiff']>>;
    try {
      answer = await this.client.volumeDiff(name, base, { offset: req.offset, length: req.length }, req.until === undefined ? ref : snapRef(req.until));
    } catch (e) {
      const said = apiMessage(e);
      if (said === undefined || !(e instanceof NotFound || said.includes(Match.destroyed))) throw e;
      // Which one is missing: the volume itself, or one of the two snapshots.
      const context = (e as NotFound).data?.context;
      if (context === volume || !(await this.getVolume(volume))) throw new NotFound(`volume ${ref} does not exist`, { ref, cause: e });
      const missing = context === base ? req.since : req.until ?? req.since;
      throw new NotFound(`snapshot ${snapRef(missing)} does not exist`, { ref: snapRef(missing), cause: e });
    }
    const start = Math.min(req.offset ?? 0, answer.provisioned);
    const end = req.length === undefined ? answer.provisioned : Math.min(answer.provisioned, start + req.length);
    return { extents: mergeRanges(answer.ranges, start, end), granularity: answer.blockSize, sizeBytes: answer.provisioned };
  }

  // ---------- data path ----------

  async openVolume(name: string, mode: 'r' | 'rw'): Promise<BlockDevice> {
    const v = await this.getVolume(name);
    if (!v) throw new NotFound(`volume ${this.ref(name)} does not exist`, { ref: this.ref(name) });
    return new FlashArrayDevice(this.client, name, this.ref(name), v.sizeBytes, mode);
  }

  /**
   * `data.read` of a snapshot: its data as the data plane serves it (`vol.suffix`), read-only —
   * every kind of write is refused (FailedPrecondition) without asking the array. A snapshot the
   * array does not list, or lists destroyed (pending eradication), is NotFound.
   */
  async openSnapshot(volume: string, snapshot: string): Promise<BlockDevice> {
    const ref = this.ref(volume);
    const sref = `${ref}@${snapshot}`;
    if (!ARRAY_NAME.test(volume)) throw new NotFound(`volume ${ref} does not exist`, { ref });
    const full = `${volume}.${snapshot}`;
    const s = ARRAY_NAME.test(snapshot) ? await this.findSnapshot(full) : undefined;
    if (!s || s.destroyed) {
      if (!(await this.getVolume(volume))) throw new NotFound(`volume ${ref} does not exist`, { ref });
      throw new NotFound(`snapshot ${sref} does not exist`, { ref: sref, hint: `list them with \`offload snapshot list ${ref}\`` });
    }
    return new FlashArrayDevice(this.client, full, sref, s.provisioned, 'r', 'snapshot');
  }

  async close(): Promise<void> {
    await this.client.logout();
  }

  // ---------- helpers ----------

  private ref(volume: string): string {
    return `${this.name}/${volume}`;
  }

  /** Names the array cannot hold are refused here, with what to do. */
  private arrayName(name: string, what: string): string {
    if (!ARRAY_NAME.test(name)) {
      throw new InvalidArgument(`invalid ${what} "${name}" for flasharray "${this.name}"`, {
        hint: 'array names are 1–63 characters of letters, digits, _ and -, starting with a letter or digit (no dots)',
      });
    }
    return name;
  }

  /** Sizes are whole 512-byte sectors on the array: round up (CSI allows a larger volume). */
  private roundSize(sizeBytes: number, name: string): number {
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0) {
      throw new InvalidArgument(`invalid size ${sizeBytes} for ${this.ref(name)}: a positive whole number of bytes is needed`, { ref: this.ref(name) });
    }
    const size = Math.ceil(sizeBytes / SECTOR) * SECTOR;
    if (size > MAX_PROVISIONED) {
      throw new OutOfRange(`size ${sizeBytes} for ${this.ref(name)} is larger than the array allows (${MAX_PROVISIONED} bytes)`, { ref: this.ref(name) });
    }
    return size;
  }

  /**
   * Run a create; if the name is held by a destroyed object (pending eradication: "has been
   * destroyed", or "already exists" while the array lists it destroyed), eradicate it and
   * create once more.
   */
  private async retryOverDestroyed<T>(name: string, create: () => Promise<T>, resource: 'volumes' | 'volume-snapshots' = 'volumes'): Promise<T> {
    try {
      return await create();
    } catch (e) {
      let destroyed = apiMessage(e)?.includes(Match.destroyed) ?? false;
      if (!destroyed && e instanceof AlreadyExists) {
        const found = resource === 'volumes' ? await this.findVolume(name) : await this.findSnapshot(name);
        destroyed = found?.destroyed ?? false;
        if (!destroyed) throw new AlreadyExists(e.message, { ref: e.ref, data: { ...e.data, existing: found } });
      }
      if (!destroyed) throw e;
      await this.eradicate(resource, name, `${this.name}/${name}`);
      return create();
    }
  }

  private async destroyAndEradicate(resource: 'volumes' | 'volume-snapshots', name: string, ref: string): Promise<void> {
    const kind = resource === 'volumes' ? 'volume' : 'snapshot';
    try {
      await this.client.api('PATCH', resource, { what: `destroy ${kind} ${name}`, ref, query: { names: name }, body: { destroyed: true } });
    } catch (e) {
      if (e instanceof NotFound) return;
      if (!apiMessage(e)?.includes(Match.destroyed)) throw e;
    }
    await this.eradicate(resource, name, ref);
  }

  private async eradicate(resource: 'volumes' | 'volume-snapshots', name: string, ref: string): Promise<void> {
    try {
      await this.client.api('DELETE', resource, { what: `eradicate ${resource === 'volumes' ? 'volume' : 'snapshot'} ${name}`, ref, query: { names: name } });
    } catch (e) {
      if (!(e instanceof NotFound)) throw e;
    }
  }

  /** The volume as the array lists it (destroyed ones included), or undefined. */
  private async findVolume(name: string): Promise<ApiVolume | undefined> {
    if (!ARRAY_NAME.test(name)) return undefined;
    try {
      const p = await this.client.page('volumes', ApiVolume, { names: name }, undefined, `get volume ${name}`, this.ref(name));
      return p.items.find((v) => v.name === name);
    } catch (e) {
      if (e instanceof NotFound) return undefined;
      throw e;
    }
  }

  private async findSnapshot(full: string): Promise<ApiSnapshot | undefined> {
    try {
      const p = await this.client.page('volume-snapshots', ApiSnapshot, { names: full }, undefined, `get snapshot ${full}`);
      return p.items.find((s) => s.name === full);
    } catch (e) {
      if (e instanceof NotFound) return undefined;
      throw e;
    }
  }

  private async sourceSize(source: { volume: string; snapshot?: string }, srcRef: string): Promise<number> {
    if (!ARRAY_NAME.test(source.volume) || (source.snapshot !== undefined && !ARRAY_NAME.test(source.snapshot))) {
      throw new NotFound(`clone source ${srcRef} does not exist`, { ref: srcRef });
    }
    if (source.snapshot === undefined) {
      const v = await this.getVolume(source.volume);
      if (!v) throw new NotFound(`clone source ${srcRef} does not exist`, { ref: srcRef });
      return v.sizeBytes;
    }
    const s = await this.findSnapshot(`${source.volume}.${source.snapshot}`);
    if (!s || s.destroyed) throw new NotFound(`clone source ${srcRef} does not exist`, { ref: srcRef });
    return s.provisioned;
  }

  private firstVolume(body: unknown, what: string): ApiVolume {
    const r = ApiVolume.safeParse((body as { items?: unknown[] } | undefined)?.items?.[0]);
    if (!r.success) throw new InvalidArgument(`${what} on flasharray "${this.name}": the array's answer holds no volume`);
    return r.data;
  }

  private firstSnapshot(body: unknown, what: string): ApiSnapshot {
    const r = ApiSnapshot.safeParse((body as { items?: unknown[] } | undefined)?.items?.[0]);
    if (!r.success) throw new InvalidArgument(`${what} on flasharray "${this.name}": the array's answer holds no snapshot`);
    return r.data;
  }

  private toVolume(v: ApiVolume): Volume {
    const out: Volume = { backend: this.name, name: v.name, sizeBytes: v.provisioned, createdAt: new Date(v.created).toISOString(), id: v.id };
    if (typeof v.space.virtual === 'number') out.allocatedBytes = v.space.virtual;
    return out;
  }

  private toSnapshot(s: ApiSnapshot): Snapshot {
    return { backend: this.name, volume: s.source.name ?? s.name.slice(0, -(s.suffix.length + 1)), name: s.suffix, sizeBytes: s.provisioned, createdAt: new Date(s.created).toISOString() };
  }
}

/** Ranges sorted, those that touch or overlap merged, and clipped to [start, end). */
function mergeRanges(ranges: readonly { offset: number; length: number }[], start: number, end: number): { offset: number; length: number }[] {
  const out: { offset: number; length: number }[] = [];
  for (const r of [...ranges].sort((a, b) => a.offset - b.offset)) {
    const s = Math.max(start, r.offset);
    const t = Math.min(end, r.offset + r.length);
    if (t <= s) continue;
    const prev = out[out.length - 1];
    if (prev && prev.offset + prev.length >= s) prev.length = Math.max(prev.offset + prev.length, t) - prev.offset;
    else out.push({ offset: s, length: t - s });
  }
  return out;
}

/**
 * The data path of one volume or snapshot over the mock's HTTP data plane. A read-only device (a
 * volume opened "r", or a snapshot) refuses every kind of write, trim included, with
 * FailedPrecondition and never asks the array; a read-write one has no `discard` (a trim changes
 * nothing, on the source and on a mirror's target alike).
 */
class FlashArrayDevice implements BlockDevice {
  readonly blockSize = SECTOR;
  /** Present on a read-only device only: a trim is refused like any write. */
  readonly discard?: (offset: number, length: number) => Promise<void>;
  private closed = false;

  /** `name` is the array's: a volume, or a snapshot `vol.suffix` (`kind: 'snapshot'`, always read-only). */
  constructor(private readonly client: FlashArrayClient, private readonly name: string, private readonly ref: string,
    readonly sizeBytes: number, private readonly mode: 'r' | 'rw', private readonly kind: 'volume' | 'snapshot' = 'volume') {
    if (mode === 'r') this.discard = async (offset, length) => this.check(offset, length, true);
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    this.check(offset, length, false);
    const out = Buffer.alloc(length);
    for (let done = 0; done < length; done += IO_SPLIT) {
      const n = Math.min(IO_SPLIT, length - done);
      (await this.client.readData(this.name, offset + done, n)).copy(out, done);
    }
    return out;
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    this.check(offset, data.length, true);
    for (let done = 0; done < data.length; done += IO_SPLIT) {
      await this.client.writeData(this.name, offset + done, data.subarray(done, Math.min(data.length, done + IO_SPLIT)));
    }
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    this.check(offset, length, true);
    await this.client.zeroData(this.name, offset, length);
  }

  async extents(offset = 0, length = this.sizeBytes - offset): Promise<Extent[]> {
    this.check(offset, length, false);
    if (length === 0) return [];
    return (await this.client.extents(this.name, offset, length)).extents;
  }

  async flush(): Promise<void> {
    // Each write is acknowledged once the array holds it; nothing is buffered here.
    this.check(0, 0, false);
  }

  async close(): Promise<void> {
    this.closed = true;
  }

  private check(offset: number, length: number, write: boolean): void {
    const ref = this.ref;
    if (this.closed) throw new FailedPrecondition(`${this.kind} ${ref} is closed`, { ref });
    if (write && this.kind === 'snapshot') {
      throw new FailedPrecondition(`snapshot ${ref} is read-only`, { ref, hint: 'copy or clone it to a volume to change its data' });
    }
    if (write && this.mode !== 'rw') throw new FailedPrecondition(`volume ${ref} was opened read-only`, { ref, hint: 'open it with mode "rw" to write' });
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.sizeBytes) {
      throw new OutOfRange(`range ${offset}+${length} is outside ${this.kind} ${ref} (${this.sizeBytes} bytes)`, { ref });
    }
  }
}
