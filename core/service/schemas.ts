/**
 * What crosses the wire of the control API, as zod schemas: the server validates requests with
 * them, the client parses responses with them, and /openapi.json is generated from them.
 *
 * Requests are strict (an unknown field is a 400) and check shapes only — a number is a number —
 * while the broker checks meaning (a size > 0, a valid name), so that an error reads the same
 * embedded or through the service. Response schemas are not strict: the client checks an answer
 * against its schema but keeps the answer as it came, so a field the broker adds later passes
 * through an older client untouched.
 */
import { z } from 'zod';
import { ERROR_CODES } from '../model/errors.js';

// ---- requests ----

/** A ref in a path: `/…/:backend/:name`, where name is `volume` or `volume@snapshot`. */
export const refParams = z.strictObject({ backend: z.string(), name: z.string() });
export const backendParams = z.strictObject({ backend: z.string() });
export const jobParams = z.strictObject({ id: z.string() });
export const exportParams = z.strictObject({ name: z.string() });
export const noParams = z.strictObject({});
export const noQuery = z.strictObject({});
/** A request without a body (a POST verb such as cancel). */
export const noBody = z.undefined();

const speed = z.number().optional();
const prefer = z.enum(['native', 'host']).optional();

export const createBody = z.strictObject({ sizeBytes: z.number(), owner: z.string().optional() });
export const resizeBody = z.strictObject({ sizeBytes: z.number() });
export const pageQuery = z.strictObject({ limit: z.coerce.number().int().optional(), token: z.string().optional() });
export const fileExportBody = z.strictObject({
  file: z.string(), format: z.string().optional(), overwrite: z.boolean().optional(), speed, verify: z.boolean().optional(),
});
export const fileImportBody = z.strictObject({
  file: z.string(), format: z.string().optional(), create: z.boolean().optional(), owner: z.string().optional(), speed, verify: z.boolean().optional(),
});
export const cloneBody = z.strictObject({
  source: z.string(), target: z.string(), mode: z.enum(['linked', 'full']).optional(), sizeBytes: z.number().optional(),
  owner: z.string().optional(), prefer, verify: z.boolean().optional(), speed,
  instant: z.boolean().optional(), copyOnRead: z.boolean().optional(),
});
export const chainBody = z.strictObject({ base: z.string().optional(), speed }).optional();
export const instantCloneBody = z.strictObject({
  pairs: z.array(z.strictObject({ source: z.string(), target: z.string() })).min(1), speed, owner: z.string().optional(), copyOnRead: z.boolean().optional(),
});
export const liveCopyBody = z.strictObject({
  pairs: z.array(z.strictObject({ source: z.string(), target: z.string() })).default([]), speed, mode: z.enum(['background', 'write-blocking']).optional(),
  resume: z.string().optional(),
});
export const copyBody = z.strictObject({
  source: z.string(), target: z.string(), speed, verify: z.boolean().optional(), prefer,
  live: z.boolean().optional(), mode: z.enum(['background', 'write-blocking']).optional(), since: z.string().optional(),
});

const ref = z.string();
/** An operation to plan (core/planner/plan.ts). */
export const operationBody = z.discriminatedUnion('op', [
  z.strictObject({ op: z.literal('create'), ref, sizeBytes: z.number() }),
  z.strictObject({ op: z.literal('clone'), source: ref, target: ref, mode: z.enum(['linked', 'full']).optional(), sizeBytes: z.number().optional(), prefer }),
  z.strictObject({ op: z.literal('stream'), ref, base: z.string().optional() }),
  z.strictObject({ op: z.literal('commit'), ref, base: z.string().optional() }),
  z.strictObject({ op: z.literal('copy'), source: ref, target: ref, prefer }),
  z.strictObject({ op: z.literal('snapshot'), ref }),
  z.strictObject({ op: z.literal('revert'), ref }),
  z.strictObject({ op: z.literal('delete'), ref }),
  z.strictObject({ op: z.literal('resize'), ref, sizeBytes: z.number() }),
  z.strictObject({ op: z.literal('export'), source: ref, file: z.string(), format: z.string().optional() }),
  z.strictObject({ op: z.literal('import'), file: z.string(), target: ref, create: z.boolean().optional() }),
]);

export const jobsQuery = z.strictObject({ status: z.string().optional(), all: z.stringbool().optional() });
export const speedBody = z.strictObject({ bytesPerSecond: z.number() });
/** A long poll: the answer comes when the job concludes or after timeoutMs (at most a minute), whichever is first. */
export const waitQuery = z.strictObject({ timeoutMs: z.coerce.number().int().min(0).max(60_000).optional() });
export const exportClientsBody = z.strictObject({ clients: z.array(z.string()) });
export const stopExportQuery = z.strictObject({ force: z.stringbool().optional() });
export const maintenanceBody = z.strictObject({ reason: z.string() });
export const listenSchema = z.union([
  z.strictObject({ host: z.string().optional(), port: z.number().optional() }),
  z.strictObject({ socket: z.string() }),
]);
export const exportBody = z.strictObject({ ref: z.string(), name: z.string().optional(), readOnly: z.boolean().optional(), listen: listenSchema.optional(), clients: z.array(z.string()).optional() });

// ---- responses ----

export const principalSchema = z.object({ id: z.string(), role: z.enum(['admin', 'tenant']) });
const limits = z.record(z.string(), z.union([z.number(), z.string(), z.boolean()]));
export const backendSchema = z.object({ name: z.string(), kind: z.string(), capabilities: z.record(z.string(), limits) });

export const volumeSchema = z.object({
  backend: z.string(), name: z.string(), sizeBytes: z.number(), createdAt: z.string().optional(), id: z.string().optional(), parent: z.string().optional(),
  owner: z.string().optional(), allocatedBytes: z.number().optional(),
});
export const volumePageSchema = z.object({ items: z.array(volumeSchema), next: z.string().optional() });
export const backupBody = z.strictObject({ source: z.string(), to: z.string(), speed });
export const backupGroupBody = z.strictObject({ pairs: z.array(z.strictObject({ source: z.string(), to: z.string() })).min(1), speed });
export const restoreBody = z.strictObject({ point: z.string(), to: z.string(), speed });
export const backupPointSchema = z.object({ ref: z.string(), point: z.number(), sizeBytes: z.number(), createdAt: z.string().optional() });

export const changesQuery = z.strictObject({
  since: z.string(), offset: z.coerce.number().int().optional(), length: z.coerce.number().int().optional(),
});
export const changesSchema = z.object({
  extents: z.array(z.object({ offset: z.number(), length: z.number() })), granularity: z.number(), sizeBytes: z.number(),
});

export const snapshotSchema = z.object({
  backend: z.string(), volume: z.string(), name: z.string(), sizeBytes: z.number(), createdAt: z.string().optional(),
});

const jobStatus = z.enum(['created', 'running', 'paused', 'ready', 'standby', 'waiting', 'pending', 'aborting', 'concluded']);
export const jobInfoSchema = z.object({
  id: z.string(), type: z.string(), status: jobStatus, executor: z.string(), ref: z.string(), owner: z.string(),
  progress: z.object({ current: z.number(), total: z.number() }), speed: z.number(),
  error: z.object({ code: z.enum(ERROR_CODES as [string, ...string[]]), message: z.string() }).optional(),
  cancelled: z.boolean(), createdAt: z.string(), updatedAt: z.string(),
  runner: z.object({ host: z.string(), pid: z.number(), seenAt: z.string() }).optional(),
  orphaned: z.boolean().optional(), plan: z.unknown().optional(), params: z.record(z.string(), z.unknown()),
  authoritative: z.object({ side: z.enum(['source', 'target']), ref: z.string(), refs: z.array(z.string()).optional() }).optional(),
  resumeSince: z.array(z.string().nullable()).optional(),
  suspended: z.boolean().optional(),
  crashed: z.boolean().optional(),
  resumedBy: z.string().optional(),
});
export const jobWaitSchema = z.object({ concluded: z.boolean(), job: jobInfoSchema });
/** startClone: a native clone is done (`volume`); one through the host is a job. */
export const cloneStartSchema = z.union([z.object({ volume: volumeSchema }), z.object({ job: jobInfoSchema })]);

export const planSchema = z.object({
  operation: z.record(z.string(), z.unknown()), supported: z.boolean(), reason: z.string(),
  steps: z.array(z.object({ action: z.string(), executor: z.string(), hostBytes: z.number().optional(), reason: z.string() })),
});
export const lockSchema = z.object({
  key: z.string(), mode: z.enum(['shared', 'exclusive', 'maintenance']),
  holder: z.object({ id: z.string(), principal: z.string(), role: z.string(), description: z.string() }),
});
export const exportInfoSchema = z.object({
  name: z.string(), ref: z.string(), uri: z.string(), readOnly: z.boolean(), owner: z.string(),
  connections: z.number().optional(), startedAt: z.string(), pid: z.number(), liveJob: z.string().optional(), clients: z.array(z.string()).optional(),
});
export const exportStartedSchema = z.object({ name: z.string(), ref: z.string(), uri: z.string(), readOnly: z.boolean(), clients: z.array(z.string()).optional() });

/** Every error answer: `{ error: OffloadError.toJSON() }`. */
export const errorSchema = z.object({
  error: z.object({
    code: z.string(), message: z.string(), ref: z.string().optional(), hint: z.string().optional(), data: z.record(z.string(), z.unknown()).optional(),
  }),
});
