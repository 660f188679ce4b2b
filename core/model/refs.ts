import { InvalidArgument } from './errors.js';

/** A volume on a backend: `backend/volume`. */
export interface VolumeRef { backend: string; volume: string }
/** A snapshot of a volume: `backend/volume@snapshot`. */
export interface SnapshotRef extends VolumeRef { snapshot: string }
export type Ref = VolumeRef | SnapshotRef;

const NAME = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$/;

/** Names: 1–128 chars of [A-Za-z0-9._-], not starting with `.` or `-`. */
export function isValidName(name: unknown): name is string {
  return typeof name === 'string' && NAME.test(name);
}

export function assertName(name: unknown, what = 'name'): string {
  if (!isValidName(name)) {
    const shown = typeof name === 'string' ? JSON.stringify(name.length > 40 ? `${name.slice(0, 40)}…` : name) : String(name);
    throw new InvalidArgument(`invalid ${what} ${shown}`, {
      hint: 'names are 1–128 characters of A-Z a-z 0-9 . _ - and do not start with . or -',
    });
  }
  return name;
}

export function isSnapshotRef(ref: Ref): ref is SnapshotRef {
  return typeof (ref as SnapshotRef).snapshot === 'string';
}

/** Parse `backend/volume` or `backend/volume@snapshot`; anything else is InvalidArgument. */
export function parseRef(text: string): Ref {
  if (typeof text !== 'string') throw new InvalidArgument(`invalid ref ${String(text)}`);
  const slash = text.indexOf('/');
  if (slash < 0) {
    throw new InvalidArgument(`invalid ref "${text}": expected backend/volume or backend/volume@snapshot`);
  }
  const backend = text.slice(0, slash);
  const rest = text.slice(slash + 1);
  const at = rest.indexOf('@');
  const volume = at < 0 ? rest : rest.slice(0, at);
  assertName(backend, `backend name in ref "${text}"`);
  assertName(volume, `volume name in ref "${text}"`);
  if (at < 0) return { backend, volume };
  const snapshot = assertName(rest.slice(at + 1), `snapshot name in ref "${text}"`);
  return { backend, volume, snapshot };
}

export function parseVolumeRef(text: string): VolumeRef {
  const ref = parseRef(text);
  if (isSnapshotRef(ref)) throw new InvalidArgument(`"${text}" is a snapshot ref; a volume ref is needed here`);
  return ref;
}

export function parseSnapshotRef(text: string): SnapshotRef {
  const ref = parseRef(text);
  if (!isSnapshotRef(ref)) throw new InvalidArgument(`"${text}" is a volume ref; a snapshot ref (backend/volume@snapshot) is needed here`);
  return ref;
}

export function formatRef(ref: Ref): string {
  return isSnapshotRef(ref) ? `${ref.backend}/${ref.volume}@${ref.snapshot}` : `${ref.backend}/${ref.volume}`;
}

/** The lock key of a ref: snapshots lock their volume. */
export function volumeKey(ref: Ref): string {
  return `${ref.backend}/${ref.volume}`;
}

/** The lock key of one snapshot (held beside its volume's key by what reads or deletes that snapshot). */
export function snapshotKey(ref: SnapshotRef): string {
  return `${ref.backend}/${ref.volume}@${ref.snapshot}`;
}
