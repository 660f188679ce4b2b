/**
 * The array's error message strings. Clients (ours, Cinder's) classify errors by substring of
 * `errors[].message`, so the mock must send exactly these and the client matches on the
 * substrings below — never on anything else.
 */
export const Messages = {
  volumeExists: 'Volume already exists.',
  snapshotExists: 'Snapshot already exists.',
  volumeNotExist: 'Volume does not exist.',
  snapshotNotExist: 'Snapshot does not exist.',
  noSuchSource: 'No such volume or snapshot.',
  volumeDestroyed: 'Volume has been destroyed.',
  snapshotDestroyed: 'Snapshot has been destroyed.',
  notDestroyed: 'Volume must be destroyed before it can be eradicated.',
  snapshotNotDestroyed: 'Snapshot must be destroyed before it can be eradicated.',
  truncation: 'Implicit truncation not permitted.',
  invalidToken: 'Invalid continuation token.',
  invalidName: 'Invalid name.',
  invalidSize: 'Invalid volume size.',
  badRequest: 'Bad request.',
  authFailed: 'Authentication failed.',
  sessionExpired: 'Session expired or invalid.',
  rateLimited: 'Rate limit exceeded.',
  forbidden: 'Forbidden.',
  notFoundPath: 'Not found.',
  /** Diff: `base_name` is not a snapshot of the compared volume (or of the compared snapshot's volume). */
  diffBaseLineage: 'The base must be a snapshot of the same volume.',
  /** Diff: `base_name` was taken after the compared snapshot. */
  diffBaseNewer: 'The base snapshot is newer than the compared snapshot.',
  /** Data plane: a write (`PUT`, `zeroes`) to a snapshot `vol.suffix`, whose data can only be read. */
  snapshotReadOnly: 'Snapshot is read-only.',
} as const;

/** Substrings a client classifies errors by (as Cinder's Pure driver does). */
export const Match = {
  alreadyExists: 'already exists',
  doesNotExist: 'does not exist',
  noSuch: 'No such volume or snapshot',
  destroyed: 'has been destroyed',
  truncation: 'truncation not permitted',
  continuation: 'continuation token',
  readOnly: 'is read-only',
} as const;

/** Names the array accepts: 1–63 of letters, digits, `_` and `-`, starting with a letter or digit. */
export const ARRAY_NAME = /^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$/;
/** Largest volume the array accepts (4 PiB). */
export const MAX_PROVISIONED = 4 * 1024 ** 5;
/** Volume sizes are whole 512-byte sectors. */
export const SECTOR = 512;
