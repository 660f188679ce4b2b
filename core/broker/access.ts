import type { StorageBackend } from '../backend/storage-backend.js';
import { ADMIN, type Principal } from '../locks/principal.js';
import { AlreadyExists, NotFound, PermissionDenied } from '../model/errors.js';
import { volumeKey, type VolumeRef } from '../model/refs.js';
import type { Volume } from '../model/types.js';
import { call, type BrokerState } from './state.js';

/**
 * Who may see and touch what: an administrator everything; a tenant only the volumes recorded as
 * its own (others do not exist for it: NotFound), and only its own jobs.
 */
export class Access {
  constructor(private readonly s: BrokerState, readonly principal: Principal) {}

  get isAdmin(): boolean {
    return this.principal.role === 'admin';
  }

  /** The owner a new volume gets: the tenant itself, or whom an administrator names (default: itself). */
  ownerFor(requested: string | undefined): string {
    if (this.principal.role === 'tenant') {
      if (requested !== undefined && requested !== this.principal.id) throw new PermissionDenied(`tenant ${this.principal.id} cannot create volumes for ${requested}`);
      return this.principal.id;
    }
    return requested ?? this.principal.id;
  }

  async mayAccess(ref: VolumeRef): Promise<boolean> {
    return this.isAdmin || (await this.s.ownerOf(volumeKey(ref))) === this.principal.id;
  }

  async assertOwns(ref: VolumeRef): Promise<void> {
    if (!(await this.mayAccess(ref))) throw notFoundVolume(volumeKey(ref));
  }

  mayAccessJob(owner: string): boolean {
    return this.isAdmin || owner === this.principal.id;
  }

  /** Of a backend's volumes, those this principal may see, each with its owner (withOwner): one read of the owner records. */
  async visible(backend: string, vols: readonly Volume[]): Promise<Volume[]> {
    const owners = await this.s.ownersOf(vols.map((v) => `${backend}/${v.name}`));
    const out: Volume[] = [];
    for (const v of vols) {
      const owner = owners.get(`${backend}/${v.name}`);
      if (!this.isAdmin && owner !== this.principal.id) continue;
      out.push({ ...v, owner: owner ?? ADMIN.id });
    }
    return out;
  }

  /**
   * A volume with its owner: its record's, else the administrators' (ADMIN.id), as access is
   * judged; not an owner the backend keeps (ONTAP's comment), which anyone could have set.
   */
  async withOwner(v: Volume): Promise<Volume> {
    return { ...v, owner: (await this.s.ownerOf(`${v.backend}/${v.name}`)) ?? ADMIN.id };
  }

  /**
   * The owner a create or clone into `ref` records. Creating is idempotent, so the name may exist:
   * then it keeps its owner, and nobody else's create may return it (AlreadyExists). A volume
   * without an owner record (an administrator's, or one made outside the broker) belongs to the
   * administrators. A record of a volume that is not there means nothing: its removal did not
   * happen (a broker killed after deleting the volume, before the record), and the name is free.
   */
  async targetOwner(ref: VolumeRef, backend: StorageBackend, owner: string, explicit: boolean): Promise<string> {
    const refText = volumeKey(ref);
    const existing = await this.s.ownerOf(refText);
    if ((existing ?? ADMIN.id) === owner) return owner;
    // An administrator's own create of a name nobody holds: whatever is there is the administrators'.
    if (existing === undefined && this.isAdmin && !explicit) return owner;
    if (!(await call(backend, 'get', refText, () => backend.getVolume(ref.volume)))) return owner;
    if (existing !== undefined && this.isAdmin && !explicit) return existing;
    const holder = existing ?? 'the administrators';
    throw new AlreadyExists(`${refText} already exists and belongs to ${this.isAdmin ? holder : 'someone else'}`, { ref: refText, hint: 'choose another name' });
  }
}

export function notFoundVolume(ref: string): NotFound {
  return new NotFound(`volume ${ref} does not exist`, { ref, hint: 'list volumes with `offload volume list BACKEND`' });
}
