/**
 * The control API as one table: every broker verb with its method, path, request schemas, response
 * schema and the broker call that answers it. The server registers each entry (server.ts), the
 * client calls each (client.ts), /openapi.json is generated from them (openapi.ts) — one place to
 * change a route.
 *
 * Refs travel in paths as `/:backend/:name` (name = `volume` or `volume@snapshot`) and are put
 * together again before the broker sees them: the broker checks them, as it does embedded.
 */
import { z } from 'zod';
import type { Broker, ExportOptions } from '../broker-api.js';
import type { ExportInfo } from '../export/registry.js';
import type { Job, JobInfo } from '../jobs/job.js';
import type { Operation } from '../planner/plan.js';
import * as s from './schemas.js';

type Schema = z.ZodType;
export type HttpMethod = 'GET' | 'POST' | 'PUT' | 'DELETE';

/** What a route's call gets besides the broker: the request's end, and the service's hosted exports. */
export interface RouteContext {
  /** Aborted when the client goes away or the service shuts down (a long poll answers at once). */
  signal: AbortSignal;
  exports: HostedExportsApi;
}

/** Exports the service hosts: they outlive the request that started them (hosted-exports.ts). */
export interface HostedExportsApi {
  start(broker: Broker, ref: string, opts: ExportOptions): Promise<z.input<typeof s.exportStartedSchema>>;
  stop(broker: Broker, name: string, opts?: { force?: boolean }): Promise<void>;
  setClients(broker: Broker, name: string, clients: string[]): Promise<ExportInfo>;
}

export interface Route<P extends Schema = Schema, Q extends Schema = Schema, B extends Schema = Schema, R extends Schema | null = Schema | null> {
  method: HttpMethod;
  /** Fastify syntax: `/v1/volumes/:backend/:name`. */
  path: string;
  summary: string;
  params: P;
  query: Q;
  body: B;
  /** The answer's schema; null: 204 without a body. */
  response: R;
  call(broker: Broker, input: { params: z.output<P>; query: z.output<Q>; body: z.output<B> }, ctx: RouteContext): Promise<R extends Schema ? z.input<R> : void>;
}

/** A route with the defaults filled in (no params, no query, no body), its types inferred. */
function route<P extends Schema = typeof s.noParams, Q extends Schema = typeof s.noQuery, B extends Schema = typeof s.noBody, R extends Schema | null = null>(
  r: { method: HttpMethod; path: string; summary: string; params?: P; query?: Q; body?: B; response: R; call: Route<P, Q, B, R>['call'] },
): Route<P, Q, B, R> {
  return { ...r, params: r.params ?? (s.noParams as unknown as P), query: r.query ?? (s.noQuery as unknown as Q), body: r.body ?? (s.noBody as unknown as B) };
}

const refOf = (p: { backend: string; name: string }): string => `${p.backend}/${p.name}`;
const info = (job: Job): JobInfo => job.info();
const jobVerb = (verb: 'cancel' | 'pause' | 'resume' | 'complete' | 'dismiss', summary: string) => route({
  method: 'POST', path: `/v1/jobs/:id/${verb}`, summary, params: s.jobParams, response: null,
  call: (b, { params }) => b.jobs[verb](params.id),
});

export const ROUTES = {
  whoami: route({
    method: 'GET', path: '/v1/whoami', summary: 'the principal this request acts as', response: s.principalSchema,
    call: async (b) => ({ ...b.principal }),
  }),
  backends: route({
    method: 'GET', path: '/v1/backends', summary: 'configured backends and their capabilities', response: z.array(s.backendSchema),
    call: async (b) => (await b.backends()).map((x) => ({ name: x.name, kind: x.kind, capabilities: x.capabilities.toJSON() as Record<string, Record<string, number | string | boolean>> })),
  }),

  'volumes.create': route({
    method: 'PUT', path: '/v1/volumes/:backend/:name', summary: 'create a volume (idempotent by name)', params: s.refParams, body: s.createBody, response: s.volumeSchema,
    call: (b, { params, body }) => b.volumes.create(refOf(params), body),
  }),
  'volumes.get': route({
    method: 'GET', path: '/v1/volumes/:backend/:name', summary: 'one volume', params: s.refParams, response: s.volumeSchema,
    call: (b, { params }) => b.volumes.get(refOf(params)),
  }),
  'volumes.list': route({
    method: 'GET', path: '/v1/backends/:backend/volumes', summary: 'volumes of a backend, a page at a time', params: s.backendParams, query: s.pageQuery, response: s.volumePageSchema,
    call: (b, { params, query }) => b.volumes.list(params.backend, query),
  }),
  'volumes.listAll': route({
    method: 'GET', path: '/v1/backends/:backend/volumes/all', summary: 'every volume of a backend', params: s.backendParams, response: z.array(s.volumeSchema),
    call: (b, { params }) => b.volumes.listAll(params.backend),
  }),
  'volumes.resize': route({
    method: 'POST', path: '/v1/volumes/:backend/:name/resize', summary: 'grow a volume', params: s.refParams, body: s.resizeBody, response: s.volumeSchema,
    call: (b, { params, body }) => b.volumes.resize(refOf(params), body.sizeBytes),
  }),
  'volumes.delete': route({
    method: 'DELETE', path: '/v1/volumes/:backend/:name', summary: 'delete a volume', params: s.refParams, response: null,
    call: (b, { params }) => b.volumes.delete(refOf(params)),
  }),
  'volumes.changes': route({
    method: 'GET', path: '/v1/volumes/:backend/:name/changes', summary: 'the ranges that changed since a snapshot (name = volume or volume@snapshot; data.dirty)',
    params: s.refParams, query: s.changesQuery, response: s.changesSchema,
    call: (b, { params, query }) => b.volumes.changes(refOf(params), query),
  }),
  'volumes.exportTo': route({
    method: 'POST', path: '/v1/volumes/:backend/:name/export', summary: 'copy a volume or snapshot into a new image file (a file of the service\'s host), as a job',
    params: s.refParams, body: s.fileExportBody, response: s.jobInfoSchema,
    call: async (b, { params, body: { file, ...opts } }) => info(await b.volumes.exportTo(refOf(params), file, opts)),
  }),
  'volumes.importFrom': route({
    method: 'POST', path: '/v1/volumes/:backend/:name/import', summary: 'copy an image file (of the service\'s host) into a volume, as a job',
    params: s.refParams, body: s.fileImportBody, response: s.jobInfoSchema,
    call: async (b, { params, body: { file, ...opts } }) => info(await b.volumes.importFrom(file, refOf(params), opts)),
  }),

  'snapshots.create': route({
    method: 'PUT', path: '/v1/snapshots/:backend/:name', summary: 'take a snapshot (name = volume@snapshot)', params: s.refParams, response: s.snapshotSchema,
    call: (b, { params }) => b.snapshots.create(refOf(params)),
  }),
  'snapshots.list': route({
    method: 'GET', path: '/v1/volumes/:backend/:name/snapshots', summary: 'snapshots of a volume', params: s.refParams, response: z.array(s.snapshotSchema),
    call: (b, { params }) => b.snapshots.list(refOf(params)),
  }),
  'snapshots.delete': route({
    method: 'DELETE', path: '/v1/snapshots/:backend/:name', summary: 'delete a snapshot', params: s.refParams, response: null,
    call: (b, { params }) => b.snapshots.delete(refOf(params)),
  }),
  'snapshots.revert': route({
    method: 'POST', path: '/v1/snapshots/:backend/:name/revert', summary: 'revert a volume to a snapshot', params: s.refParams, response: null,
    call: (b, { params }) => b.snapshots.revert(refOf(params)),
  }),

  'backups.start': route({
    method: 'POST', path: '/v1/backups', summary: 'take the next point of a volume\'s backup (full first, then only the changes), as a job', body: s.backupBody, response: s.jobInfoSchema,
    call: async (b, { body: { source, ...opts } }) => info(await b.backups.start(source, opts)),
  }),
  'backups.startGroup': route({
    method: 'POST', path: '/v1/backup-groups', summary: 'the next point of several volumes\' backups (the disks of one VM) as one job: markers at one instant, points all or none', body: s.backupGroupBody, response: s.jobInfoSchema,
    call: async (b, { body: { pairs, ...opts } }) => info(await b.backups.startGroup(pairs, opts)),
  }),
  'backups.list': route({
    method: 'GET', path: '/v1/backups/:backend/:name', summary: 'the points of a backup volume, oldest first', params: s.refParams, response: z.array(s.backupPointSchema),
    call: (b, { params }) => b.backups.list(refOf(params)),
  }),
  'backups.restore': route({
    method: 'POST', path: '/v1/restores', summary: 'copy a backup point into a volume (created when missing), as a job', body: s.restoreBody, response: s.jobInfoSchema,
    call: async (b, { body: { point, ...opts } }) => info(await b.backups.restore(point, opts)),
  }),

  startClone: route({
    method: 'POST', path: '/v1/clones', summary: 'clone a volume or snapshot: done at once natively (volume), or a job through the host (job)', body: s.cloneBody, response: s.cloneStartSchema,
    call: async (b, { body: { source, target, ...opts } }) => {
      const started = await b.startClone(source, target, opts);
      return started.job ? { job: started.job.info() } : { volume: started.volume };
    },
  }),
  stream: route({
    method: 'POST', path: '/v1/volumes/:backend/:name/stream', summary: 'make a volume independent of its parent (or of everything above base), as a job',
    params: s.refParams, body: s.chainBody, response: s.jobInfoSchema,
    call: async (b, { params, body }) => info(await b.stream(refOf(params), body ?? {})),
  }),
  commit: route({
    method: 'POST', path: '/v1/volumes/:backend/:name/commit', summary: 'merge a volume into its parent (or base), as a job',
    params: s.refParams, body: s.chainBody, response: s.jobInfoSchema,
    call: async (b, { params, body }) => info(await b.commit(refOf(params), body ?? {})),
  }),
  copy: route({
    method: 'POST', path: '/v1/copies', summary: 'copy a volume\'s data into another existing volume, as a job', body: s.copyBody, response: s.jobInfoSchema,
    call: async (b, { body: { source, target, ...opts } }) => info(await b.copy(source, target, opts)),
  }),
  instantClone: route({
    method: 'POST', path: '/v1/instant-clones', summary: 'instant clones of several volumes as one fill job (the disks of one VM): every target usable at once', body: s.instantCloneBody, response: s.jobInfoSchema,
    call: async (b, { body: { pairs, ...opts } }) => info(await b.instantClone(pairs, opts)),
  }),
  liveCopy: route({
    method: 'POST', path: '/v1/live-copies', summary: 'live copy of several volumes in use as one job (the disks of one VM): ready when all are, complete switches all or none', body: s.liveCopyBody, response: s.jobInfoSchema,
    call: async (b, { body: { pairs, ...opts } }) => info(await b.liveCopy(pairs, opts)),
  }),
  plan: route({
    method: 'POST', path: '/v1/plan', summary: 'explain how an operation would run, without running it', body: s.operationBody, response: s.planSchema,
    call: async (b, { body }) => {
      const plan = await b.plan(body as Operation);
      return { ...plan, operation: { ...plan.operation } };
    },
  }),

  'jobs.list': route({
    method: 'GET', path: '/v1/jobs', summary: 'jobs this principal may see (status=orphaned: those nobody runs)', query: s.jobsQuery, response: z.array(s.jobInfoSchema),
    call: (b, { query }) => b.jobs.list(query),
  }),
  'jobs.get': route({
    method: 'GET', path: '/v1/jobs/:id', summary: 'one job', params: s.jobParams, response: s.jobInfoSchema,
    call: async (b, { params }) => info(await b.jobs.get(params.id)),
  }),
  'jobs.cancel': jobVerb('cancel', 'cancel a job'),
  'jobs.pause': jobVerb('pause', 'pause a job'),
  'jobs.resume': jobVerb('resume', 'resume a paused job'),
  'jobs.complete': jobVerb('complete', 'switch over a job that is ready'),
  'jobs.dismiss': jobVerb('dismiss', 'forget a concluded job'),
  'jobs.setSpeed': route({
    method: 'POST', path: '/v1/jobs/:id/speed', summary: 'change a job\'s speed limit (bytes/s, 0 = unlimited)', params: s.jobParams, body: s.speedBody, response: null,
    call: (b, { params, body }) => b.jobs.setSpeed(params.id, body.bytesPerSecond),
  }),
  'jobs.wait': route({
    method: 'GET', path: '/v1/jobs/:id/wait', summary: 'long poll: answers when the job concludes or after timeoutMs (default 10 s); the client asks again',
    params: s.jobParams, query: s.waitQuery, response: s.jobWaitSchema,
    call: (b, { params, query }, ctx) => waitForJob(b, params.id, query.timeoutMs ?? 10_000, ctx.signal),
  }),
  'jobs.takeOver': route({
    method: 'POST', path: '/v1/jobs/:id/take-over', summary: 'take over an orphaned job: the service runs it from its checkpoint', params: s.jobParams, response: s.jobInfoSchema,
    call: async (b, { params }) => info(await b.jobs.takeOver(params.id)),
  }),

  'locks.list': route({
    method: 'GET', path: '/v1/locks', summary: 'locks held now', response: z.array(s.lockSchema),
    call: (b) => b.locks.list(),
  }),
  'locks.maintenance': route({
    method: 'PUT', path: '/v1/locks/:backend/:name', summary: 'place a maintenance lock (administrators)', params: s.refParams, body: s.maintenanceBody, response: null,
    call: (b, { params, body }) => b.locks.maintenance(refOf(params), body.reason),
  }),
  'locks.release': route({
    method: 'DELETE', path: '/v1/locks/:backend/:name', summary: 'remove a maintenance lock (administrators)', params: s.refParams, response: null,
    call: (b, { params }) => b.locks.release(refOf(params)),
  }),

  'exports.start': route({
    method: 'POST', path: '/v1/exports', summary: 'serve a volume over NBD from the service (kept across service restarts until stopped)', body: s.exportBody, response: s.exportStartedSchema,
    call: (b, { body: { ref, ...opts } }, ctx) => ctx.exports.start(b, ref, opts),
  }),
  'exports.list': route({
    method: 'GET', path: '/v1/exports', summary: 'exports served now (by the service and other processes sharing its state)', response: z.array(s.exportInfoSchema),
    call: (b) => b.exports.list(),
  }),
  'exports.stop': route({
    method: 'DELETE', path: '/v1/exports/:name', summary: 'stop an export (force: one under a live copy, cancelling the copy first)', params: s.exportParams, query: s.stopExportQuery, response: null,
    call: (b, { params, query }, ctx) => ctx.exports.stop(b, params.name, query.force ? { force: true } : {}),
  }),
  'exports.setClients': route({
    method: 'PUT', path: '/v1/exports/:name/clients', summary: 'the TLS clients an export admits from now on (connected ones stay; [] admits none)', params: s.exportParams, body: s.exportClientsBody, response: s.exportInfoSchema,
    call: (b, { params, body }, ctx) => ctx.exports.setClients(b, params.name, body.clients),
  }),
  'exports.reloadTls': route({
    method: 'POST', path: '/v1/exports/reload-tls', summary: "read the service's NBD TLS credentials again (administrators): new handshakes use them, connected clients stay",
    response: z.object({ reloaded: z.number().int(), failed: z.array(z.string()) }),
    call: (b) => b.exports.reloadTls(),
  }),
} as const;

export type RouteId = keyof typeof ROUTES;

/**
 * A long poll on a job: its info once it has concluded, or as it is when `timeoutMs` passed or the
 * request ended. Follows the job through its events (a job another process runs: polled), so a
 * timed-out poll leaves nothing behind.
 */
export async function waitForJob(broker: Broker, id: string, timeoutMs: number, signal: AbortSignal): Promise<{ concluded: boolean; job: JobInfo }> {
  const job = await broker.jobs.get(id);
  if (job.info().status !== 'concluded' && !signal.aborted) {
    await new Promise<void>((done) => {
      const finish = () => {
        off();
        clearTimeout(timer);
        signal.removeEventListener('abort', finish);
        done();
      };
      const off = job.on((e) => { if (e.job.status === 'concluded') finish(); });
      const timer = setTimeout(finish, timeoutMs);
      signal.addEventListener('abort', finish);
      if (job.info().status === 'concluded') finish(); // concluded before we listened
    });
  }
  const now = job.info().status === 'concluded' ? job.info() : (await broker.jobs.get(id)).info();
  return { concluded: now.status === 'concluded', job: now };
}
