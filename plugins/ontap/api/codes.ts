/**
 * ONTAP error codes the plugin branches on. The first four are the codes real drivers classify
 * (Trident `abstraction_error.go`, Cinder); the others are this mock's own, used where ONTAP's
 * exact code is not public, and kept distinct so that the mapping stays unambiguous.
 */
export const OntapCode = {
  /** "duplicate entry": an object with that name exists. */
  DUPLICATE: '1',
  /** "entry doesn't exist". */
  NOT_FOUND: '4',
  /** The volume is busy (a job is running on it). */
  VOLUME_BUSY: '524486',
  /** Size error (e.g. shrinking below what is used, or zero). */
  SIZE_ERROR: '917534',
  /** Snapshot copy is locked (backs a FlexClone) and cannot be deleted (code seen in Trident comments). */
  SNAPSHOT_LOCKED: '1638555',
  /** Mock: the volume has FlexClone children and cannot be deleted. */
  HAS_CLONES: '917640',
  /** Mock: a request field is missing or invalid. */
  INVALID_INPUT: '262179',
  /** Mock: the job was cancelled by a user. */
  JOB_CANCELLED: '262290',
  /** Mock: the credentials are wrong. */
  NOT_AUTHORIZED: '6691623',
  /** Mock: the volume is not a FlexClone (split requested on a plain volume). */
  NOT_A_CLONE: '917888',
  /** Mock: a data-plane write to a snapshot's data, which is read-only. */
  READ_ONLY: '917905',
} as const;
export type OntapCode = (typeof OntapCode)[keyof typeof OntapCode];
