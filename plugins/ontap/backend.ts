/**
 * The `ontap` backend: volumes, snapshots, FlexClones and clone split on an ONTAP-style NAS
 * appliance, through its REST API. Every mutation is an appliance job (202 + polling).
 *
 * CSI semantics, as the StorageBackend interface asks: create is idempotent by name (a duplicate
 * — code "1", including after a retried request whose first attempt did happen — is looked up and
 * returned when it matches); deleting what is gone succeeds; deleting a volume with FlexClone
 * children or a snapshot backing a clone is FailedPrecondition and changes nothing; growing is
 * allowed, shrinking is OutOfRange. Revert is ONTAP's volume restore from a snapshot. A
 * snapshot's data is read (openSnapshot) through the data plane, read-only.
 */
import {
  AlreadyExists, BackendUnavailable, CapabilitySet, isOffloadError, NotFound, OutOfRange, Unsupported, InvalidArgument,
  type BlockDevice, type ChangedExtents, type ChangedExtentsRequest, type CreateVolumeRequest, type JobTask, type Logger,
  type Page, type PageRequest, type Snapshot, type StorageBackend, type StreamOptions, type Volume,
} from '../../core/index.js';
import { BlockDiffCollection, ExtentList, Snapshot as ApiSnapshot, Volume as ApiVolume, type Volume as ApiVolumeT } from './api/schemas.js';
import { OntapClient, type MutationOutcome } from './client.js';
import type { OntapConfig } from './config.js';
import { SplitTask } from './split-task.js';
import { OntapVolumeDevice } from './volume-device.js';

const VOLUME_FIELDS = 'size,svm,create_time,comment,space,clone';
const SNAPSHOT_FIELDS = 'create_time,logical_size';
const VOLUMES = '/api/storage/volumes';
/** The volume comment records the owning principal: `offload:owner=<principal>`. */
const OWNER_PREFIX = 'offload:owner=';

const CAPS = new CapabilitySet([
  'volume.create', 'volume.delete', 'volume.resize', 'volume.list',
  'snapshot.create', 'snapshot.delete', 'snapshot.revert',
  'clone.linked', 'chain.stream',
  // Snapshots are readable through the data plane (`?snapshot.uuid=`): openSnapshot.
  ['data.read', { snapshots: true }], 'data.write', 'data.extents', 'data.dirty',
]);

/** The `ontap` StorageBackend: volumes, snapshots, FlexClones and clone split offloaded to the NAS, and its data path. */
export class OntapBackend implements StorageBackend {
  readonly kind = 'ontap';
  readonly client: OntapClient;

  constructor(
    private readonly config: OntapConfig,
    private readonly logger?: Logger,
  ) {
    this.client = new OntapClient({ ...config, logger });
  }

  get name(): string {
    return this.config.name;
  }

  async capabilities(): Promise<CapabilitySet> {
    return CAPS;
  }

  private ref(volume: string, snapshot?: string): string {
    return snapshot === undefined ? `${this.name}/${volume}` : `${this.name}/${volume}@${snapshot}`;
  }

  // ---- lookups -------------------------------------------------------------------------------

  private async findVolume(name: string): Promise<ApiVolumeT | undefined> {
    const { records } = await this.client.page(VOLUMES, ApiVolume, {
      what: `look up volume "${name}"`,
      ref: this.ref(name),
      query: { name, 'svm.name': this.config.svm, fields: VOLUME_FIELDS },
    });
    // ONTAP query values are patterns; keep the exact match only.
    return records.find((v) => v.name === name);
  }

  private async requireVolume(name: string, what: string): Promise<ApiVolumeT> {
    const v = await this.findVolume(name);
    if (!v) throw new NotFound(`${what}: volume ${this.ref(name)} does not exist`, { ref: this.ref(name), hint: 'list volumes with `offload volume list`' });
    return v;
  }

  private async findSnapshot(volumeUuid: string, volume: string, name: string): Promise<ApiSnapshot | undefined> {
    const { records } = await this.client.page(`${VOLUMES}/${volumeUuid}/snapshots`, ApiSnapshot, {
      what: `look up snapshot "${name}"`,
      ref: this.ref(volume, name),
      query: { name, fields: SNAPSHOT_FIELDS },
    });
    return records.find((s) => s.name === name);
  }

  private toVolume(v: ApiVolumeT): Volume {
    const out: Volume = { backend: this.name, name: v.name, sizeBytes: v.size ?? 0, id: v.uuid };
    if (v.create_time) out.createdAt = v.create_time;
    if (v.clone?.is_flexclone && v.clone.parent_volume) {
      out.parent = this.ref(v.clone.parent_volume.name, v.clone.parent_snapshot?.name);
    }
    if (v.comment?.startsWith(OWNER_PREFIX)) out.owner = v.comment.slice(OWNER_PREFIX.length);
    if (v.space?.used !== undefined) out.allocatedBytes = v.space.used;
    return out;
  }

  private toSnapshot(volume: string, s: ApiSnapshot, fallbackSize: number): Snapshot {
    const out: Snapshot = { backend: this.name, volume, name: s.name, sizeBytes: s.logical_size ?? fallbackSize };
    if (s.create_time) out.createdAt = s.create_time;
    return out;
  }

  /** After a mutation whose job vanished (expired), the object itself tells whether it happened. */
  private async afterMutation<T>(outcome: MutationOutcome, what: string, ref: string, lookup: () => Promise<T | undefined>): Promise<T> {
    const found = await lookup();
    if (found !== undefined) return found;
    const detail = outcome.state === 'vanished' ? `its job ${outcome.jobUuid} expired and the result is not there` : 'the result is not there';
    throw new BackendUnavailable(`${what}: the appliance reported success but ${detail}`, { ref, hint: 'retry; the request is idempotent' });
  }

  // ---- volumes -------------------------------------------------------------------------------

  async createVolume(req: CreateVolumeRequest): Promise<Volume> {
    const ref = this.ref(req.name);
    const what = req.source
      ? `create volume ${ref} as a clone of ${this.ref(req.source.volume, req.source.snapshot)}`
      : `create volume ${ref}`;
    if (req.mode === 'full') {
      throw new Unsupported(`${what}: full clones are not done by the ontap backend`, { ref, hint: 'clone linked and split it (`offload stream`), or let the host copy it' });
    }
    if (req.sizeBytes !== undefined && (!Number.isSafeInteger(req.sizeBytes) || req.sizeBytes <= 0)) {
      throw new InvalidArgument(`${what}: size must be a positive whole number of bytes, got ${req.sizeBytes}`, { ref });
    }
    if (!req.source && req.sizeBytes === undefined) throw new InvalidArgument(`${what}: a size is needed`, { ref });
    const existing = await this.findVolume(req.name);
    if (existing) return this.sameOrConflict(existing, req, what);

    const body: Record<string, unknown> = { name: req.name, svm: { name: this.config.svm } };
    if (req.owner !== undefined) body.comment = `${OWNER_PREFIX}${req.owner}`;
    if (req.sizeBytes !== undefined) body.size = req.sizeBytes;
    if (req.source) {
      body.clone = {
        is_flexclone: true,
        parent_volume: { name: req.source.volume },
        ...(req.source.snapshot !== undefined ? { parent_snapshot: { name: req.source.snapshot } } : {}),
      };
    }
    let outcome: MutationOutcome;
    try {
      outcome = await this.client.mutate('POST', VOLUMES, { what, ref, body });
    } catch (e) {
      // Duplicate: a concurrent create, or our own earlier attempt that timed out but happened.
      if (!isOffloadError(e, 'AlreadyExists')) throw e;
      const again = await this.findVolume(req.name);
      if (!again) throw e;
      return this.sameOrConflict(again, req, what);
    }
    const created = await this.afterMutation(outcome, what, ref, () => this.findVolume(req.name));
    return this.sameOrConflict(created, req, what);
  }

  /** CSI: the same name with compatible arguments is the same volume; anything else is AlreadyExists. */
  private sameOrConflict(v: ApiVolumeT, req: CreateVolumeRequest, what: string): Volume {
    const ref = this.ref(req.name);
    const problems: string[] = [];
    if (req.sizeBytes !== undefined && v.size !== req.sizeBytes) problems.push(`its size is ${v.size} bytes, not ${req.sizeBytes}`);
    const parent = v.clone?.is_flexclone ? v.clone.parent_volume?.name : undefined;
    if (req.source) {
      if (parent !== req.source.volume) problems.push(parent ? `it is a clone of ${parent}` : 'it is not a clone');
      else if (req.source.snapshot !== undefined && v.clone?.parent_snapshot?.name !== req.source.snapshot) {
        problems.push(`it is a clone of snapshot ${v.clone?.parent_snapshot?.name ?? '?'}`);
      }
    } else if (parent) {
      problems.push(`it is a clone of ${parent}`);
    }
    if (problems.length > 0) {
      throw new AlreadyExists(`${what}: volume ${ref} already exists and differs: ${problems.join('; ')}`, {
        ref,
        hint: 'pick another name, or delete the existing volume first',
      });
    }
    return this.toVolume(v);
  }

  async getVolume(name: string): Promise<Volume | undefined> {
    const v = await this.findVolume(name);
    return v && this.toVolume(v);
  }

  async listVolumes(page: PageRequest = {}): Promise<Page<Volume>> {
    const what = `list volumes of ${this.name}`;
    let path = VOLUMES;
    let query: Record<string, string | number | undefined> | undefined = {
      'svm.name': this.config.svm,
      fields: VOLUME_FIELDS,
      max_records: page.limit,
    };
    if (page.token !== undefined) {
      path = decodeToken(page.token, this.config.svm, what);
      query = undefined;
    }
    const { records, next } = await this.client.page(path, ApiVolume, { what, ref: this.name, query });
    const out: Page<Volume> = { items: records.map((v) => this.toVolume(v)) };
    if (next !== undefined) out.next = Buffer.from(next).toString('base64url');
    return out;
  }

  async resizeVolume(name: string, sizeBytes: number): Promise<Volume> {
    const ref = this.ref(name);
    const what = `resize volume ${ref} to ${sizeBytes} bytes`;
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0) throw new InvalidArgument(`${what}: size must be a positive whole number of bytes`, { ref });
    const v = await this.requireVolume(name, what);
    const current = v.size ?? 0;
    if (sizeBytes < current) {
      throw new OutOfRange(`${what}: the volume is ${current} bytes and cannot shrink`, { ref, hint: `pass a size of at least ${current} bytes` });
    }
    if (sizeBytes === current) return this.toVolume(v);
    const outcome = await this.client.mutate('PATCH', `${VOLUMES}/${v.uuid}`, { what, ref, body: { size: sizeBytes } });
    const after = await this.afterMutation(outcome, what, ref, () => this.findVolume(name));
    return this.toVolume(after);
  }

  async deleteVolume(name: string): Promise<void> {
    const ref = this.ref(name);
    const what = `delete volume ${ref}`;
    const v = await this.findVolume(name);
    if (!v) return;
    try {
      const outcome = await this.client.mutate('DELETE', `${VOLUMES}/${v.uuid}`, { what, ref });
      if (outcome.state === 'vanished' && (await this.findVolume(name))) {
        throw new BackendUnavailable(`${what}: its job ${outcome.jobUuid} expired and the volume is still there`, { ref, hint: 'retry the delete' });
      }
    } catch (e) {
      if (isOffloadError(e, 'NotFound')) return; // deleted meanwhile: the goal is reached
      throw e;
    }
  }

  // ---- snapshots -----------------------------------------------------------------------------

  async createSnapshot(volume: string, name: string): Promise<Snapshot> {
    const ref = this.ref(volume, name);
    const what = `create snapshot ${ref}`;
    const v = await this.requireVolume(volume, what);
    const lookup = () => this.findSnapshot(v.uuid, volume, name);
    const existing = await lookup();
    if (existing) return this.toSnapshot(volume, existing, v.size ?? 0);
    let outcome: MutationOutcome;
    try {
      outcome = await this.client.mutate('POST', `${VOLUMES}/${v.uuid}/snapshots`, { what, ref, body: { name } });
    } catch (e) {
      if (!isOffloadError(e, 'AlreadyExists')) throw e;
      const again = await lookup();
      if (!again) throw e;
      return this.toSnapshot(volume, again, v.size ?? 0);
    }
    return this.toSnapshot(volume, await this.afterMutation(outcome, what, ref, lookup), v.size ?? 0);
  }

  async listSnapshots(volume: string): Promise<Snapshot[]> {
    const what = `list snapshots of ${this.ref(volume)}`;
    const v = await this.requireVolume(volume, what);
    const all = await this.client.all(`${VOLUMES}/${v.uuid}/snapshots`, ApiSnapshot, {
      what,
      ref: this.ref(volume),
      query: { fields: SNAPSHOT_FIELDS },
    });
    // Oldest first, as the pool lists them (the appliance pages its collections by uuid, so its
    // order says nothing about time); a tie keeps the appliance's order.
    const time = (s: ApiSnapshot) => (s.create_time ? Date.parse(s.create_time) : NaN);
    const sorted = all.map((s, i) => ({ s, i, t: time(s) }))
      .sort((a, b) => (Number.isNaN(a.t) || Number.isNaN(b.t) || a.t === b.t ? a.i - b.i : a.t - b.t));
    return sorted.map(({ s }) => this.toSnapshot(volume, s, v.size ?? 0));
  }

  async deleteSnapshot(volume: string, name: string): Promise<void> {
    const ref = this.ref(volume, name);
    const what = `delete snapshot ${ref}`;
    const v = await this.findVolume(volume);
    if (!v) return;
    const s = await this.findSnapshot(v.uuid, volume, name);
    if (!s) return;
    try {
      await this.client.mutate('DELETE', `${VOLUMES}/${v.uuid}/snapshots/${s.uuid}`, { what, ref });
    } catch (e) {
      if (isOffloadError(e, 'NotFound')) return;
      throw e;
    }
  }

  async revertVolume(volume: string, snapshot: string): Promise<void> {
    const ref = this.ref(volume, snapshot);
    const what = `revert volume ${this.ref(volume)} to snapshot ${snapshot}`;
    const v = await this.requireVolume(volume, what);
    if (!(await this.findSnapshot(v.uuid, volume, snapshot))) {
      throw new NotFound(`${what}: snapshot ${ref} does not exist`, { ref, hint: `list snapshots with \`offload snapshot list ${this.ref(volume)}\`` });
    }
    await this.client.mutate('PATCH', `${VOLUMES}/${v.uuid}`, { what, ref, query: { 'restore_to.snapshot.name': snapshot } });
  }

  // ---- jobs and data -------------------------------------------------------------------------

  async streamVolume(name: string, opts: StreamOptions): Promise<JobTask> {
    const ref = this.ref(name);
    if (opts.base !== undefined) {
      throw new Unsupported(`stream ${ref} up to ${opts.base}: an ONTAP clone split always makes the clone fully independent`, {
        ref,
        hint: 'stream without a base',
      });
    }
    await this.requireVolume(name, `stream ${ref}`);
    return this.splitTask(name);
  }

  private splitTask(volume: string): SplitTask {
    return new SplitTask(
      { backend: this.name, volume, svm: this.config.svm },
      {
        client: this.client,
        pollIntervalMs: this.config.pollIntervalMs,
        pollMaxIntervalMs: this.config.pollMaxIntervalMs,
        findVolume: (n) => this.findVolume(n),
      },
    );
  }

  async resumeTask(type: string, params: Record<string, unknown>): Promise<JobTask | undefined> {
    if (type !== 'stream' || typeof params.volume !== 'string') return undefined;
    return this.splitTask(params.volume);
  }

  /**
   * `data.dirty` through the appliance's block diff (`GET …/volumes/{uuid}/block-diff`, the mock's
   * block-level stand-in for SnapDiff): base snapshot `since`, diff snapshot `until` (absent: the
   * active file system), every page by `_links.next`.
   */
  async changedExtents(volume: string, req: ChangedExtentsRequest): Promise<ChangedExtents> {
    const ref = this.ref(volume);
    const what = `changed extents of ${ref} since ${req.since}${req.until === undefined ? '' : ` until ${req.until}`}`;
    for (const [k, v] of [['offset', req.offset], ['length', req.length]] as const) {
      if (v !== undefined && (!Number.isSafeInteger(v) || v < 0)) {
        throw new InvalidArgument(`${what}: ${k} must be a non-negative whole number of bytes, got ${v}`, { ref });
      }
    }
    const v = await this.requireVolume(volume, what);
    let pages: BlockDiffCollection[];
    try {
      pages = await this.client.pages(`${VOLUMES}/${v.uuid}/block-diff`, BlockDiffCollection, {
        what, ref,
        query: { 'base_snapshot.name': req.since, 'diff_snapshot.name': req.until, offset: req.offset, length: req.length },
      });
    } catch (e) {
      if (!isOffloadError(e, 'NotFound')) throw e;
      const target = e.data?.target;
      const missing = target === 'base_snapshot.name' ? req.since : target === 'diff_snapshot.name' ? req.until : undefined;
      if (missing === undefined) throw new NotFound(`${what}: volume ${ref} does not exist`, { ref, cause: e });
      throw new NotFound(`${what}: snapshot ${this.ref(volume, missing)} does not exist`, {
        ref: this.ref(volume, missing), hint: `list snapshots with \`offload snapshot list ${ref}\``, cause: e,
      });
    }
    const last = pages[pages.length - 1]!;
    const start = Math.min(req.offset ?? 0, last.size);
    const end = req.length === undefined ? last.size : Math.min(last.size, start + req.length);
    const extents: { offset: number; length: number }[] = [];
    for (const r of pages.flatMap((p) => p.records).sort((a, b) => a.offset - b.offset)) {
      const s = Math.max(start, r.offset);
      const t = Math.min(end, r.offset + r.length);
      if (t <= s) continue;
      const prev = extents[extents.length - 1];
      if (prev && prev.offset + prev.length >= s) prev.length = Math.max(prev.offset + prev.length, t) - prev.offset;
      else extents.push({ offset: s, length: t - s });
    }
    return { extents, granularity: last.block_size, sizeBytes: last.size };
  }

  async openVolume(name: string, mode: 'r' | 'rw'): Promise<BlockDevice> {
    const ref = this.ref(name);
    const v = await this.requireVolume(name, `open volume ${ref}`);
    return new OntapVolumeDevice(this.client, v.uuid, v.size ?? 0, mode, ref);
  }

  /**
   * `data.read` of a snapshot: its data through the data plane (`?snapshot.uuid=`, the stand-in
   * for the volume's `.snapshot` directory over NFS), read-only. The snapshot is named by uuid
   * from here on, so one deleted and taken again under the same name is never read in its place.
   */
  async openSnapshot(volume: string, snapshot: string): Promise<BlockDevice> {
    const ref = this.ref(volume, snapshot);
    const what = `open snapshot ${ref}`;
    const v = await this.requireVolume(volume, what);
    const s = await this.findSnapshot(v.uuid, volume, snapshot);
    if (!s) throw new NotFound(`${what}: snapshot ${ref} does not exist`, { ref, hint: `list snapshots with \`offload snapshot list ${this.ref(volume)}\`` });
    // The size the volume had when the snapshot was taken; an appliance that does not list it
    // tells it through the data plane.
    const size = s.logical_size ?? (await this.client.request('GET', `/data/volumes/${v.uuid}/extents`, {
      what: `${what}: its size`, ref, query: { 'snapshot.uuid': s.uuid, offset: 0, length: 0 }, schema: ExtentList,
    })).data.size;
    return new OntapVolumeDevice(this.client, v.uuid, size, 'r', ref, s.uuid);
  }
}

function decodeToken(token: string, svm: string, what: string): string {
  const href = Buffer.from(token, 'base64url').toString('utf8');
  const ok = href.startsWith(`${VOLUMES}?`) && new URL(href, 'http://token').searchParams.get('svm.name') === svm;
  if (!ok) {
    throw new InvalidArgument(`${what}: invalid page token`, { hint: 'pass back the `next` token of the previous page, unchanged' });
  }
  return href;
}
