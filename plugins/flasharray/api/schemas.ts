/**
 * Zod schemas of the FlashArray REST 2.x resources and envelopes we use. One set, shared by the
 * client (which parses what an array answers) and the mock appliance (whose answers a test checks
 * against them). Field names follow the public REST 2.x reference; objects are loose so that a
 * real array's extra fields pass through the client untouched.
 */
import { z } from 'zod';

/** `{id, name}`: how REST 2.x points at another object (a copy's `source`, a snapshot's volume). */
export const Reference = z.looseObject({
  id: z.string().optional(),
  name: z.string().optional(),
});
export type Reference = z.infer<typeof Reference>;

/** Space accounting in bytes (a subset of the array's `space` object). */
export const Space = z.looseObject({
  data_reduction: z.number().nullable().optional(),
  snapshots: z.number().nullable().optional(),
  thin_provisioning: z.number().nullable().optional(),
  total_physical: z.number().nullable().optional(),
  total_provisioned: z.number().nullable().optional(),
  unique: z.number().nullable().optional(),
  virtual: z.number().nullable().optional(),
});
export type Space = z.infer<typeof Space>;

export const Volume = z.looseObject({
  id: z.string(),
  name: z.string(),
  serial: z.string(),
  /** Creation time, milliseconds since the epoch. */
  created: z.number().int(),
  destroyed: z.boolean(),
  /** Milliseconds until a destroyed volume is eradicated; null while it is not destroyed. */
  time_remaining: z.number().int().nullable(),
  provisioned: z.number().int().nonnegative(),
  /** The volume or snapshot this one was copied from, or null. */
  source: Reference.nullable(),
  subtype: z.string(),
  connection_count: z.number().int(),
  space: Space,
});
export type Volume = z.infer<typeof Volume>;

export const VolumeSnapshot = z.looseObject({
  id: z.string(),
  /** `<volume>.<suffix>` */
  name: z.string(),
  suffix: z.string(),
  serial: z.string(),
  created: z.number().int(),
  destroyed: z.boolean(),
  time_remaining: z.number().int().nullable(),
  provisioned: z.number().int().nonnegative(),
  /** The volume the snapshot was taken of. */
  source: Reference,
  space: Space,
});
export type VolumeSnapshot = z.infer<typeof VolumeSnapshot>;

/** The list envelope of every collection GET (and of POST/PATCH answers). */
function makeListEnvelope<T extends z.ZodType>(item: T) {
  return z.looseObject({
    continuation_token: z.string().nullable().optional(),
    more_items_remaining: z.boolean().optional(),
    total_item_count: z.number().int().nullable().optional(),
    items: z.array(item),
  });
}
// One envelope per item schema: the client asks for one on every list call, and a new zod schema
// compiles its parser again on first use: ~0.15 ms of the 1.45 a volume's delete took on the mock.
const envelopes = new WeakMap<z.ZodType, ReturnType<typeof makeListEnvelope>>();
export function ListEnvelope<T extends z.ZodType>(item: T): ReturnType<typeof makeListEnvelope<T>> {
  let env = envelopes.get(item);
  if (!env) envelopes.set(item, (env = makeListEnvelope(item)));
  return env as ReturnType<typeof makeListEnvelope<T>>;
}
export interface ListPage<T> {
  continuation_token?: string | null;
  more_items_remaining?: boolean;
  total_item_count?: number | null;
  items: T[];
}

export const VolumeList = ListEnvelope(Volume);
export const VolumeSnapshotList = ListEnvelope(VolumeSnapshot);

/** The array's own errors: almost always HTTP 400. */
export const ErrorEnvelope = z.looseObject({
  errors: z.array(z.looseObject({
    context: z.string().nullable().optional(),
    message: z.string(),
    location_context: z.unknown().optional(),
  })).min(1),
});
export type ErrorEnvelope = z.infer<typeof ErrorEnvelope>;

/** Errors from the API gateway in front of the array (403, 429). */
export const GatewayError = z.looseObject({ message: z.string() });

export const ApiVersions = z.looseObject({ version: z.array(z.string()).min(1) });

export const LoginResponse = ListEnvelope(z.looseObject({ username: z.string() }));

// ---- request bodies ----

export const VolumePost = z.strictObject({
  provisioned: z.number().int().optional(),
  source: z.looseObject({ id: z.string().optional(), name: z.string().optional() }).optional(),
  subtype: z.string().optional(),
});
export type VolumePost = z.infer<typeof VolumePost>;

export const VolumePatch = z.strictObject({
  provisioned: z.number().int().optional(),
  destroyed: z.boolean().optional(),
  name: z.string().optional(),
});
export type VolumePatch = z.infer<typeof VolumePatch>;

export const VolumeSnapshotPost = z.strictObject({ suffix: z.string().optional() });
export type VolumeSnapshotPost = z.infer<typeof VolumeSnapshotPost>;

export const VolumeSnapshotPatch = z.strictObject({
  destroyed: z.boolean().optional(),
  suffix: z.string().optional(),
});
export type VolumeSnapshotPatch = z.infer<typeof VolumeSnapshotPatch>;

// ---- data plane (the mock's documented stand-in for iSCSI/FC) ----

export const DataExtent = z.strictObject({
  offset: z.number().int().nonnegative(),
  length: z.number().int().positive(),
  kind: z.enum(['data', 'zero']),
});
export const DataExtents = z.looseObject({
  size: z.number().int().nonnegative(),
  extents: z.array(DataExtent),
});
export type DataExtents = z.infer<typeof DataExtents>;

/**
 * `GET /api/2.N/volumes/diff` (the mock's stand-in for Purity's REST 1.x `GET volume/{name}/diff`):
 * a list envelope of changed byte ranges, plus the unit they are in and the compared object's size.
 */
export const DiffRange = z.looseObject({
  offset: z.number().int().nonnegative(),
  length: z.number().int().positive(),
});
export type DiffRange = z.infer<typeof DiffRange>;
export const VolumeDiffList = ListEnvelope(DiffRange).extend({
  /** The unit of the answer, in bytes: ranges are whole units except where clipped to the segment. */
  block_size: z.number().int().positive(),
  /** The compared volume's or snapshot's size. */
  provisioned: z.number().int().nonnegative(),
});
export type VolumeDiffList = z.infer<typeof VolumeDiffList>;

export const ZeroRange = z.strictObject({
  offset: z.number().int().nonnegative(),
  length: z.number().int().nonnegative(),
});
