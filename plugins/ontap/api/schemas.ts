/**
 * Zod schemas of the ONTAP-style REST resources, shared by the client (which validates what it
 * receives) and the mock appliance (whose tests validate what it sends). Field names follow the
 * public ONTAP REST API (`/api/storage/volumes`, `/api/cluster/jobs`, …). Every field except
 * the keys is optional because `fields=` selects which ones a response carries.
 */
import { z } from 'zod';

export const Link = z.object({ href: z.string() });
export const SelfLinks = z.object({ self: Link.optional(), next: Link.optional() });

/** `{"error":{"code","message","target"}}`; `code` is a string of digits. */
export const ErrorBody = z.object({
  error: z.object({
    code: z.string(),
    message: z.string(),
    target: z.string().optional(),
    arguments: z.array(z.object({ code: z.string(), message: z.string() })).optional(),
  }),
});
export type ErrorBody = z.infer<typeof ErrorBody>;

export const JobState = z.enum(['queued', 'running', 'paused', 'success', 'failure']);
export type JobState = z.infer<typeof JobState>;
export const TERMINAL_JOB_STATES: readonly JobState[] = ['success', 'failure'];

export const Job = z.object({
  uuid: z.string(),
  description: z.string().optional(),
  state: JobState.optional(),
  message: z.string().optional(),
  /** The final error code when the state is `failure` (an integer, unlike `error.code`). */
  code: z.number().int().optional(),
  error: z.object({ code: z.string(), message: z.string() }).optional(),
  start_time: z.string().optional(),
  end_time: z.string().optional(),
  svm: z.object({ name: z.string() }).optional(),
  _links: SelfLinks.optional(),
});
export type Job = z.infer<typeof Job>;

/** What a mutation answers: 202 with the job link (or 201/200 when done within `return_timeout`). */
export const JobLinkResponse = z.object({
  job: z.object({ uuid: z.string(), _links: z.object({ self: Link }) }),
  num_records: z.number().int().optional(),
  records: z.array(z.unknown()).optional(),
});
export type JobLinkResponse = z.infer<typeof JobLinkResponse>;

const NamedRef = z.object({ name: z.string(), uuid: z.string().optional() });

export const Volume = z.object({
  uuid: z.string(),
  name: z.string(),
  svm: NamedRef.optional(),
  size: z.number().int().nonnegative().optional(),
  state: z.enum(['online', 'offline', 'restricted']).optional(),
  type: z.string().optional(),
  style: z.string().optional(),
  create_time: z.string().optional(),
  comment: z.string().optional(),
  space: z.object({ size: z.number().optional(), used: z.number().optional() }).optional(),
  clone: z
    .object({
      is_flexclone: z.boolean().optional(),
      parent_volume: NamedRef.optional(),
      parent_snapshot: NamedRef.optional(),
      split_initiated: z.boolean().optional(),
      split_complete_percent: z.number().optional(),
      split_estimate: z.number().optional(),
    })
    .optional(),
  _links: SelfLinks.optional(),
});
export type Volume = z.infer<typeof Volume>;

export const Snapshot = z.object({
  uuid: z.string(),
  name: z.string(),
  create_time: z.string().optional(),
  comment: z.string().optional(),
  volume: NamedRef.optional(),
  /** Logical size of the volume when the snapshot was taken. */
  logical_size: z.number().int().nonnegative().optional(),
  _links: SelfLinks.optional(),
});
export type Snapshot = z.infer<typeof Snapshot>;

/** A collection GET: `{records, num_records, _links:{self, next?}}`. */
export function Collection<T extends z.ZodType>(item: T) {
  return z.object({ records: z.array(item), num_records: z.number().int().nonnegative(), _links: SelfLinks.optional() });
}
export interface CollectionOf<T> {
  records: T[];
  num_records: number;
  _links?: { self?: { href: string }; next?: { href: string } };
}

/** Request bodies the client sends. */
export const VolumeCreateBody = z.object({
  name: z.string(),
  svm: z.object({ name: z.string() }),
  size: z.number().int().positive().optional(),
  comment: z.string().optional(),
  clone: z
    .object({
      is_flexclone: z.boolean().optional(),
      parent_volume: z.object({ name: z.string() }),
      parent_snapshot: z.object({ name: z.string() }).optional(),
    })
    .optional(),
});
export type VolumeCreateBody = z.infer<typeof VolumeCreateBody>;

export const VolumePatchBody = z.object({
  size: z.number().int().positive().optional(),
  comment: z.string().optional(),
  clone: z.object({ split_initiated: z.boolean() }).optional(),
});
export type VolumePatchBody = z.infer<typeof VolumePatchBody>;

export const SnapshotCreateBody = z.object({ name: z.string(), comment: z.string().optional() });

/** The data plane's allocation map (our stand-in for NFS access; not part of ONTAP's API). */
export const ExtentList = z.object({
  size: z.number().int().nonnegative(),
  extents: z.array(z.object({ offset: z.number().int(), length: z.number().int(), kind: z.enum(['data', 'zero']) })),
});
export type ExtentList = z.infer<typeof ExtentList>;

/**
 * `GET /api/storage/volumes/{uuid}/block-diff`: the mock's block-level stand-in for SnapDiff (real
 * ONTAP diffs files, in sessions). A collection of byte ranges that may differ between the base
 * snapshot and the diff snapshot (or the active file system), with the unit and the size.
 */
export const BlockRange = z.object({ offset: z.number().int().nonnegative(), length: z.number().int().positive() });
export type BlockRange = z.infer<typeof BlockRange>;
export const BlockDiffCollection = Collection(BlockRange).extend({
  /** The unit ranges are whole multiples of (except where clipped to the asked range). */
  block_size: z.number().int().positive(),
  /** The compared snapshot's (or the volume's) size. */
  size: z.number().int().nonnegative(),
});
export type BlockDiffCollection = z.infer<typeof BlockDiffCollection>;
