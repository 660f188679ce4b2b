/**
 * The ONTAP-style mock appliance as a real `node:http` server: the REST API under `/api`
 * (HTTP Basic auth on every request) with a block-level stand-in for SnapDiff
 * (`GET /api/storage/volumes/{uuid}/block-diff`, README.md), the data plane under `/data` (a
 * documented stand-in for NFS access to a volume's disk image, and read-only to a snapshot's with
 * `?snapshot.name=` or `?snapshot.uuid=`), and the fault rules' admin
 * endpoint `/_admin/faults`
 * (the appliance kit's grammar, with this appliance's own actions from faults.ts).
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import {
  answerWithFaults, drain, faultAdmin, HttpError, parseJson, readBody, sendReply, serveHttp, shortPageOf, sleep, type FaultInjectorOf, type Reply,
} from '../../appliance-kit/index.js';
import { OntapCode } from '../api/codes.js';
import { SnapshotCreateBody, VolumeCreateBody, VolumePatchBody, type BlockDiffCollection, type CollectionOf } from '../api/schemas.js';
import { ApiError, invalid, notFound } from './api-error.js';
import { OntapAppliance, type ApplianceOptions, type JobFault } from './appliance.js';
import { faultGrammar, type FaultAction, type FaultConfigInput } from './faults.js';
import { filterRecords, pageRecords, selectFields } from './query.js';
import type { JobRecord, SnapshotRecord, VolumeRecord } from './records.js';

export interface OntapMockOptions extends ApplianceOptions {
  port?: number;
  host?: string;
  username?: string;
  password?: string;
  /** Fault rules to start with (the appliance kit's grammar). */
  faults?: FaultConfigInput;
}

export interface OntapMock {
  /** `http://host:port`, the endpoint a backend config points at. */
  readonly url: string;
  readonly port: number;
  readonly username: string;
  readonly password: string;
  readonly faults: FaultInjectorOf<typeof faultGrammar>;
  readonly appliance: OntapAppliance;
  close(): Promise<void>;
}

export const MOCK_DEFAULTS = { port: 8082, host: '127.0.0.1', username: 'admin', password: 'netapp123', svm: 'svm0' } as const;

/** Largest request body: a data-plane write (the plugin sends 4 MiB) or a JSON document. */
const MAX_BODY = 64 * 1024 * 1024;
const HAL_JSON = 'application/hal+json';

const json = (status: number, body: unknown, headers?: Record<string, string>): Reply => ({ status, body, headers });

export async function startOntapMock(opts: OntapMockOptions = {}): Promise<OntapMock> {
  const username = opts.username ?? MOCK_DEFAULTS.username;
  const password = opts.password ?? MOCK_DEFAULTS.password;
  const appliance = new OntapAppliance({ svms: [MOCK_DEFAULTS.svm], ...opts });
  const faults = faultGrammar.injector();
  if (opts.faults) faults.configure(opts.faults);
  const expectedAuth = `Basic ${Buffer.from(`${username}:${password}`).toString('base64')}`;

  async function serve(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://mock');
    const method = (req.method ?? 'GET').toUpperCase();
    if (req.headers.authorization !== expectedAuth) {
      await drain(req);
      const body = { error: { code: OntapCode.NOT_AUTHORIZED, message: 'not authorized for that command' } };
      return sendReply(res, json(401, body, { 'www-authenticate': 'Basic realm="ontap"' }), HAL_JSON);
    }
    if (url.pathname.startsWith('/_admin/')) return sendReply(res, await safely(() => faultAdmin(faults, req, url)), HAL_JSON);
    const fired = faults.pick(method, url);
    await answerWithFaults<FaultAction>({
      req, res, fired, jsonType: HAL_JSON,
      status: (a) => {
        const headers: Record<string, string> = a.retryAfter === undefined ? {} : { 'retry-after': String(a.retryAfter) };
        return json(a.status, { error: { code: a.code ?? String(a.status), message: a.message ?? statusText(a.status) } }, headers);
      },
      handle: () => safely(async () => route(method, url, req, await readBody(req, MAX_BODY), jobFault(fired), shortPageOf(fired))),
    });
  }

  async function route(method: string, url: URL, req: IncomingMessage, body: Buffer, fault: JobFault, shortPage?: number): Promise<Reply> {
    const p = url.pathname.replace(/\/+$/, '');
    const q = url.searchParams;
    const seg = p.split('/').slice(1);
    appliance.tick();

    if (p === '/api/cluster' && method === 'GET') {
      return json(200, { name: 'offload-mock', version: { full: 'NetApp Release 9.14.1 (offload mock)', generation: 9, major: 14, minor: 1 }, _links: { self: { href: '/api/cluster' } } });
    }
    if (p === '/api/svm/svms' && method === 'GET') {
      const svms = appliance.svms.map((name) => ({ uuid: name, name, state: 'running', _links: { self: { href: `/api/svm/svms/${name}` } } }));
      return collection(p, q, svms, undefined, shortPage);
    }

    // /api/storage/volumes[/{uuid}[/snapshots[/{uuid}]]]
    if (seg[0] === 'api' && seg[1] === 'storage' && seg[2] === 'volumes') {
      const [, , , volUuid, sub, snapUuid] = seg;
      if (volUuid === undefined) {
        if (method === 'GET') {
          const views = appliance.allVolumes().map((v) => appliance.volumeView(v));
          return collection(p, q, views, ['uuid', 'name'], shortPage);
        }
        if (method === 'POST') {
          const req = validate(VolumeCreateBody, jsonBody(body));
          return mutation(appliance.createVolume(req, fault), q, 201);
        }
      } else if (sub === undefined) {
        if (method === 'GET') return json(200, selectFields(appliance.volumeView(appliance.volume(volUuid)), q.get('fields')));
        if (method === 'PATCH') {
          const restore = q.get('restore_to.snapshot.name') ?? undefined;
          const patch = body.length > 0 ? validate(VolumePatchBody, jsonBody(body)) : {};
          return mutation(appliance.patchVolume(volUuid, patch, restore, fault), q, 200);
        }
        if (method === 'DELETE') return mutation(appliance.deleteVolume(volUuid, fault), q, 200);
      } else if (sub === 'block-diff' && snapUuid === undefined && method === 'GET') {
        return blockDiff(p, q, appliance.volume(volUuid), shortPage);
      } else if (sub === 'snapshots') {
        const v = appliance.volume(volUuid);
        if (snapUuid === undefined) {
          if (method === 'GET') {
            const views = v.snapshots.map((s) => appliance.snapshotView(v, s));
            return collection(p, q, views, ['uuid', 'name'], shortPage);
          }
          if (method === 'POST') {
            const req = validate(SnapshotCreateBody, jsonBody(body));
            return mutation(appliance.createSnapshot(volUuid, req.name, req.comment, fault), q, 201);
          }
        } else {
          if (method === 'GET') return json(200, selectFields(appliance.snapshotView(v, appliance.snapshot(v, snapUuid)), q.get('fields')));
          if (method === 'DELETE') return mutation(appliance.deleteSnapshot(volUuid, snapUuid, fault), q, 200);
        }
      }
    }

    // /api/cluster/jobs[/{uuid}]
    if (seg[0] === 'api' && seg[1] === 'cluster' && seg[2] === 'jobs') {
      const jobUuid = seg[3];
      if (jobUuid === undefined && method === 'GET') {
        return collection(p, q, appliance.allJobs().map((j) => appliance.jobView(j)), undefined, shortPage);
      }
      if (jobUuid !== undefined && seg.length === 4) {
        if (method === 'GET') {
          if (fault.expired) appliance.expireJob(jobUuid);
          return json(200, selectFields(appliance.jobView(appliance.pollJob(jobUuid)), q.get('fields')));
        }
        if (method === 'PATCH') {
          const action = q.get('action');
          if (action !== 'cancel') throw invalid(`unsupported job action "${action ?? ''}" (supported: cancel)`, 'action');
          appliance.cancelJob(jobUuid);
          return json(200, {});
        }
      }
    }

    // Data plane: /data/volumes/{uuid-or-name}[/extents], a snapshot's data with
    // ?snapshot.name= or ?snapshot.uuid= (read-only, as a volume's .snapshot directory over NFS).
    if (seg[0] === 'data' && seg[1] === 'volumes' && seg[2] !== undefined) {
      const v = appliance.volumeByUuidOrName(decodeURIComponent(seg[2]), q.get('svm') ?? undefined);
      const snap = snapshotParam(v, q, 'snapshot');
      const o = snap ?? v;
      const what = snap ? `snapshot "${snap.name}" of volume "${v.name}"` : 'the volume';
      if (seg[3] === 'extents' && seg.length === 4 && method === 'GET') {
        const offset = intParam(q, 'offset', 0);
        const length = intParam(q, 'length', Math.max(0, o.size - offset));
        if (offset > o.size) throw new ApiError(416, OntapCode.INVALID_INPUT, `offset ${offset} is beyond the size of ${what} (${o.size})`, 'offset');
        return json(200, { size: o.size, extents: appliance.extents(o, offset, Math.min(length, o.size - offset)) });
      }
      if (seg.length === 3 && method === 'GET') {
        const range = parseRange(req.headers.range, o.size);
        if (!range) return json(200, appliance.read(o, 0, o.size));
        return {
          status: 206,
          headers: { 'content-range': `bytes ${range.start}-${range.end}/${o.size}` },
          body: appliance.read(o, range.start, range.end - range.start + 1),
        };
      }
      if (snap && seg.length === 3 && method === 'PUT') {
        throw new ApiError(409, OntapCode.READ_ONLY, `${what} is read-only`, q.get('snapshot.name') !== null ? 'snapshot.name' : 'snapshot.uuid');
      }
      if (seg.length === 3 && method === 'PUT') {
        const start = parseContentRange(req.headers['content-range'], body.length);
        if (start + body.length > v.size) {
          throw new ApiError(416, OntapCode.INVALID_INPUT, `write of ${body.length} bytes at ${start} goes past the volume size ${v.size}`, 'content-range');
        }
        appliance.write(v, start, body);
        return { status: 204 };
      }
    }

    if (p.startsWith('/api/') || p.startsWith('/data/')) {
      throw new ApiError(404, OntapCode.NOT_FOUND, `no such API: ${method} ${p}`, 'path');
    }
    throw new ApiError(404, OntapCode.NOT_FOUND, `no such path: ${p}`);
  }

  function collection<T extends { uuid: string }>(path: string, q: URLSearchParams, all: T[], defaults: string[] | undefined, shortPage?: number): Reply {
    const limit = intParam(q, 'max_records', Number.MAX_SAFE_INTEGER);
    if (limit < 1) throw invalid('max_records must be at least 1', 'max_records');
    const page = pageRecords(filterRecords(all, q), q.get('start.uuid'), limit, shortPage);
    const records = page.records.map((r) => selectFields(r, q.get('fields'), defaults));
    const self = `${path}${q.size ? `?${q.toString()}` : ''}`;
    const out: CollectionOf<unknown> = { records, num_records: records.length, _links: { self: { href: self } } };
    if (page.nextStart !== undefined) {
      const next = new URLSearchParams(q);
      next.set('start.uuid', page.nextStart);
      out._links!.next = { href: `${path}?${next.toString()}` };
    }
    return json(200, out);
  }

  /**
   * `GET /api/storage/volumes/{uuid}/block-diff?base_snapshot.name|uuid=…[&diff_snapshot.name|uuid=…]
   * [&offset=&length=][&max_records=N][&start.offset=X]`: one page of changed ranges; the next
   * link carries `start.offset` (the end of the page's last range), so paging survives writes.
   */
  function blockDiff(path: string, q: URLSearchParams, v: VolumeRecord, shortPage?: number): Reply {
    const base = snapshotParam(v, q, 'base_snapshot');
    if (!base) throw invalid('"base_snapshot.name" or "base_snapshot.uuid" is required', 'base_snapshot.name');
    const diff = snapshotParam(v, q, 'diff_snapshot');
    const offset = intParam(q, 'offset', 0);
    const length = q.get('length') === null ? undefined : intParam(q, 'length', 0);
    const limit = intParam(q, 'max_records', Number.MAX_SAFE_INTEGER);
    if (limit < 1) throw invalid('max_records must be at least 1', 'max_records');
    const start = intParam(q, 'start.offset', 0);
    const d = appliance.blockDiff(v, base, diff, offset, length);
    const rest = d.ranges.filter((r) => r.offset >= start);
    const records = rest.slice(0, Math.min(limit, shortPage ?? Infinity));
    const self = `${path}${q.size ? `?${q.toString()}` : ''}`;
    const out: BlockDiffCollection = { records, num_records: records.length, block_size: d.blockSize, size: d.size, _links: { self: { href: self } } };
    if (rest.length > records.length) {
      const last = records[records.length - 1];
      const next = new URLSearchParams(q);
      next.set('start.offset', String(last ? last.offset + last.length : start));
      out._links!.next = { href: `${path}?${next.toString()}` };
    }
    return json(200, out);
  }

  /** A snapshot of `v` named by `PREFIX.name` or `PREFIX.uuid`; undefined when neither is given. */
  function snapshotParam(v: VolumeRecord, q: URLSearchParams, prefix: string): SnapshotRecord | undefined {
    const name = q.get(`${prefix}.name`);
    const uuid = q.get(`${prefix}.uuid`);
    if (name === null && uuid === null) return undefined;
    const s = v.snapshots.find((x) => (name === null || x.name === name) && (uuid === null || x.uuid === uuid));
    if (!s) throw notFound(`snapshot "${name ?? uuid}" of volume "${v.name}"`, `${prefix}.${name !== null ? 'name' : 'uuid'}`);
    return s;
  }

  /** 202 with the job link, or `done` (201/200) when the job ends within `return_timeout`. */
  async function mutation(job: JobRecord, q: URLSearchParams, done: number): Promise<Reply> {
    const link = { job: { uuid: job.uuid, _links: { self: { href: `/api/cluster/jobs/${job.uuid}` } } } };
    const timeoutS = Math.min(120, intParam(q, 'return_timeout', 0));
    const deadline = Date.now() + timeoutS * 1000;
    while (timeoutS > 0 && Date.now() < deadline) {
      appliance.tick();
      const j = appliance.job(job.uuid);
      if (j?.state === 'success') return json(done, link);
      if (j?.state === 'failure') return json(400, { error: { ...j.error!, target: 'job' } });
      await sleep(10);
    }
    return json(202, link);
  }

  const ticker = setInterval(() => appliance.tick(), 20);
  ticker.unref();

  const http = await serveHttp(serve, {
    port: opts.port ?? 0,
    host: opts.host ?? MOCK_DEFAULTS.host,
    crash: internalError,
    jsonType: HAL_JSON,
  });
  return {
    url: http.url,
    port: http.port,
    username,
    password,
    faults,
    appliance,
    async close() {
      clearInterval(ticker);
      await http.close();
      appliance.save();
    },
  };
}

/** What the fired actions ask of the job a mutation creates. */
function jobFault(fired: readonly FaultAction[]): JobFault {
  const fault: JobFault = {};
  for (const a of fired) {
    if (a.type === 'job-failure') {
      fault.failure = { code: a.code, message: a.message };
      fault.failAfterPolls = a.afterPolls;
    } else if (a.type === 'job-stuck') fault.stuck = true;
    else if (a.type === 'job-expired') fault.expired = true;
  }
  return fault;
}

/** Errors in ONTAP's envelope: the mock's own, HTTP-level ones (too large, not JSON, bad fault rules), anything else as 500. */
async function safely(fn: () => Promise<Reply>): Promise<Reply> {
  try {
    return await fn();
  } catch (e) {
    if (e instanceof ApiError) return json(e.status, e.body());
    if (e instanceof HttpError) return json(e.status, new ApiError(e.status, OntapCode.INVALID_INPUT, e.message).body());
    return internalError(e);
  }
}

function internalError(e: unknown): Reply {
  return json(500, { error: { code: '2', message: `internal error: ${String(e)}` } });
}

/** A JSON request body, required. */
function jsonBody(body: Buffer): unknown {
  const value = parseJson(body);
  if (value === undefined) throw invalid('a JSON request body is required');
  return value;
}

function validate<T>(schema: { safeParse(v: unknown): { success: true; data: T } | { success: false; error: { issues: { path: PropertyKey[]; message: string }[] } } }, value: unknown): T {
  const r = schema.safeParse(value);
  if (r.success) return r.data;
  const issue = r.error.issues[0]!;
  const target = issue.path.map(String).join('.');
  throw invalid(`invalid value for "${target}": ${issue.message}`, target);
}

function intParam(q: URLSearchParams, name: string, fallback: number): number {
  const raw = q.get(name);
  if (raw === null) return fallback;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 0) throw invalid(`"${name}" must be a non-negative integer, got "${raw}"`, name);
  return n;
}

function parseRange(header: string | undefined, size: number): { start: number; end: number } | undefined {
  if (!header) return undefined;
  const m = /^bytes=(\d+)-(\d*)$/.exec(header.trim());
  if (!m) throw new ApiError(416, OntapCode.INVALID_INPUT, `unsupported Range "${header}" (one bytes=START-END range)`, 'range');
  const start = Number(m[1]);
  const end = m[2] === '' ? size - 1 : Math.min(Number(m[2]), size - 1);
  if (start >= size || end < start) throw new ApiError(416, OntapCode.INVALID_INPUT, `range ${header} is outside the volume (size ${size})`, 'range');
  return { start, end };
}

function parseContentRange(header: string | undefined, length: number): number {
  if (!header) return 0;
  const m = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(header.trim());
  if (!m) throw invalid(`unsupported Content-Range "${header}" (bytes START-END/SIZE)`, 'content-range');
  const start = Number(m[1]);
  if (Number(m[2]) - start + 1 !== length) throw invalid(`Content-Range ${header} does not match the body length ${length}`, 'content-range');
  return start;
}

function statusText(status: number): string {
  return status === 429 ? 'too many requests' : status === 503 ? 'service unavailable' : `server error ${status}`;
}
