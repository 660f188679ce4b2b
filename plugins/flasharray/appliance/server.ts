/**
 * The mock FlashArray: a real `node:http` server speaking the REST 2.x API (login/logout,
 * volumes, volume-snapshots) with the array's envelopes and error strings, plus a data plane
 * over HTTP standing in for iSCSI/FC:
 *
 *   GET  /data/volumes/{name}            bytes (honours `Range: bytes=a-b`, answers 206); snapshots readable by `vol.snap`
 *   PUT  /data/volumes/{name}            `Content-Range: bytes a-b/*` with exactly b-a+1 bytes; 204
 *   GET  /data/volumes/{name}/extents    `?offset=&length=` → `{size, extents:[{offset,length,kind:'data'|'zero'}]}`
 *   POST /data/volumes/{name}/zeroes     `{offset, length}`: make a range read as zeros; 204
 *
 * authenticated with `x-auth-token` like the API; and, as the stand-in for Purity's REST 1.x
 * `GET volume/{name}/diff?base=&block_size=&offset=&length=` (REST 2.x has no diff):
 *
 *   GET  /api/2.N/volumes/diff?names=VOL|VOL.SNAP&base_name=VOL.SNAP[&segment_offset=&segment_length=&block_size=&limit=&continuation_token=]
 *        → `{items:[{offset,length}], continuation_token, more_items_remaining, total_item_count, block_size, provisioned}`
 *
 * Test hooks (no auth, loopback tool only):
 * `GET|POST|DELETE /_admin/faults` (the appliance kit's fault rules, with this array's own
 * actions from faults.ts).
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { STATUS_CODES, type IncomingMessage, type ServerResponse } from 'node:http';
import {
  answerWithFaults, faultAdmin, HttpError, parseJson, readBody, sendReply, serveHttp, shortPageOf, type FaultInjectorOf, type Reply,
} from '../../appliance-kit/index.js';
import { Messages, SECTOR } from '../api/messages.js';
import { VolumePatch, VolumePost, VolumeSnapshotPatch, VolumeSnapshotPost, ZeroRange } from '../api/schemas.js';
import { ApiFault, ArrayModel, CHUNK_SIZE, MAX_IO } from './array-model.js';
import { faultGrammar, type FaultAction, type FaultConfigInput } from './faults.js';
import { page, pageByOffset, parseListQuery, splitNames } from './listing.js';

/** API versions the mock answers to (`/api/2.0` … `/api/2.36`). */
export const API_VERSIONS = Array.from({ length: 37 }, (_, i) => `2.${i}`);

export interface FlashArrayMockOptions {
  /** 0 (default) picks a free port. */
  port?: number;
  host?: string;
  /** Persist volumes and data here (survives restarts); absent = in memory. */
  stateDir?: string;
  /** The long-lived API token `POST /login` accepts; generated when absent. */
  apiToken?: string;
  /** Idle time after which a session token is refused with 401 (30 min by default). */
  sessionTtlMs?: number;
  /** How long destroyed volumes linger before the array eradicates them (24 h by default). */
  eradicationDelayMs?: number;
  /** Fault rules to start with (the appliance kit's grammar). */
  faults?: FaultConfigInput;
}

export interface FlashArrayMock {
  url: string;
  apiToken: string;
  faults: FaultInjectorOf<typeof faultGrammar>;
  close(): Promise<void>;
}

const JSON_LIMIT = 1024 * 1024;
/** Largest `block_size` a diff accepts (1 GiB). */
const MAX_DIFF_BLOCK = 1024 ** 3;

export async function startFlashArrayMock(opts: FlashArrayMockOptions = {}): Promise<FlashArrayMock> {
  const model = await ArrayModel.open({ stateDir: opts.stateDir, eradicationDelayMs: opts.eradicationDelayMs });
  const apiToken = opts.apiToken ?? randomUUID();
  const faults = faultGrammar.injector();
  if (opts.faults) faults.configure(opts.faults);
  const sessionTtlMs = opts.sessionTtlMs ?? 30 * 60 * 1000;
  const sessions = new Map<string, number>(); // token → last use (ms)

  function requireSession(req: IncomingMessage): void {
    const token = header(req, 'x-auth-token');
    const last = token === undefined ? undefined : sessions.get(token);
    const now = Date.now();
    if (token === undefined || last === undefined || now - last > sessionTtlMs) {
      if (token !== undefined) sessions.delete(token);
      throw new ApiFault(401, Messages.sessionExpired);
    }
    sessions.set(token, now);
  }

  async function api(req: IncomingMessage, url: URL, resource: string, shortPage?: number): Promise<Reply> {
    const method = req.method ?? 'GET';
    const q = url.searchParams;
    if (resource === 'login' && method === 'POST') {
      if (header(req, 'api-token') !== apiToken) throw new ApiFault(401, Messages.authFailed);
      const session = randomBytes(24).toString('base64url');
      sessions.set(session, Date.now());
      return { status: 200, headers: { 'x-auth-token': session }, body: { items: [{ username: 'pureuser' }] } };
    }
    requireSession(req);
    if (resource === 'logout' && method === 'POST') {
      sessions.delete(header(req, 'x-auth-token')!);
      return { status: 200, body: {} };
    }
    if (resource === 'volumes') {
      if (method === 'GET') {
        const lq = parseListQuery(q);
        let items = await model.listVolumes();
        if (lq.names) items = pickNamed(items, lq.names, Messages.volumeNotExist);
        return listReply(page(items, lq, shortPage));
      }
      const name = oneName(q, 'names');
      if (method === 'POST') {
        const body = VolumePost.safeParse(await readJson(req));
        if (!body.success) throw new ApiFault(400, Messages.badRequest, name);
        const { source, provisioned } = body.data;
        if (source) {
          if (!source.name) throw new ApiFault(400, Messages.badRequest, 'source');
          return items(await model.copyVolume(name, source.name, q.get('overwrite') === 'true'));
        }
        if (provisioned === undefined) throw new ApiFault(400, Messages.invalidSize, name);
        return items(await model.createVolume(name, provisioned));
      }
      if (method === 'PATCH') {
        const body = VolumePatch.safeParse(await readJson(req));
        if (!body.success || body.data.name !== undefined) throw new ApiFault(400, Messages.badRequest, name);
        const { destroyed, provisioned } = body.data;
        if (destroyed === undefined && provisioned === undefined) throw new ApiFault(400, Messages.badRequest, name);
        let v = destroyed === undefined ? undefined : await model.setVolumeDestroyed(name, destroyed);
        if (provisioned !== undefined) v = await model.resizeVolume(name, provisioned, q.get('truncate') === 'true');
        return items(v);
      }
      if (method === 'DELETE') {
        await model.eradicateVolume(name);
        return { status: 200, body: {} };
      }
    }
    if (resource === 'volumes/diff' && method === 'GET') {
      const lq = parseListQuery(q);
      const name = oneName(q, 'names');
      const base = oneName(q, 'base_name');
      const offset = intParam(q, 'segment_offset', 0);
      const length = q.get('segment_length') === null ? undefined : intParam(q, 'segment_length', 0);
      const blockSize = intParam(q, 'block_size', CHUNK_SIZE);
      if (blockSize < SECTOR || blockSize % SECTOR !== 0 || blockSize > MAX_DIFF_BLOCK) {
        throw new ApiFault(400, `Invalid block_size: a multiple of ${SECTOR} bytes up to ${MAX_DIFF_BLOCK} is needed.`, 'block_size');
      }
      const d = await model.diff(name, base, { offset, length }, blockSize);
      const result = pageByOffset(d.ranges, lq, shortPage);
      return listReply({ ...result, body: { ...result.body, block_size: d.blockSize, provisioned: d.provisioned } });
    }
    if (resource === 'volume-snapshots') {
      if (method === 'GET') {
        const lq = parseListQuery(q);
        let items = await model.listSnapshots();
        if (lq.names) items = pickNamed(items, lq.names, Messages.snapshotNotExist);
        const sources = q.get('source_names');
        if (sources !== null) {
          const wanted = splitNames(sources);
          const volumes = new Set((await model.listVolumes()).map((v) => v.name));
          const missing = wanted.find((n) => !volumes.has(n));
          if (missing) throw new ApiFault(400, Messages.volumeNotExist, missing);
          items = items.filter((s) => wanted.includes(s.source.name!));
        }
        return listReply(page(items, lq, shortPage));
      }
      if (method === 'POST') {
        const source = oneName(q, 'source_names');
        const body = VolumeSnapshotPost.safeParse(await readJson(req));
        if (!body.success) throw new ApiFault(400, Messages.badRequest, source);
        const suffix = body.data.suffix ?? (await nextSuffix(model, source));
        return items(await model.createSnapshot(source, suffix));
      }
      const name = oneName(q, 'names');
      if (method === 'PATCH') {
        const body = VolumeSnapshotPatch.safeParse(await readJson(req));
        if (!body.success || body.data.destroyed === undefined || body.data.suffix !== undefined) {
          throw new ApiFault(400, Messages.badRequest, name);
        }
        return items(await model.setSnapshotDestroyed(name, body.data.destroyed));
      }
      if (method === 'DELETE') {
        await model.eradicateSnapshot(name);
        return { status: 200, body: {} };
      }
    }
    throw new ApiFault(404, Messages.notFoundPath, url.pathname);
  }

  async function data(req: IncomingMessage, url: URL, name: string, sub: string | undefined): Promise<Reply> {
    requireSession(req);
    const method = req.method ?? 'GET';
    if (sub === 'extents' && method === 'GET') {
      const size = await model.sizeOf(name, false);
      const offset = intParam(url.searchParams, 'offset', 0);
      const length = intParam(url.searchParams, 'length', size - offset);
      return { status: 200, body: await model.extents(name, offset, length) };
    }
    if (sub === 'zeroes' && method === 'POST') {
      const body = ZeroRange.safeParse(await readJson(req));
      if (!body.success) throw new ApiFault(400, Messages.badRequest, name);
      await model.writeZeroes(name, body.data.offset, body.data.length);
      return { status: 204 };
    }
    if (sub !== undefined) throw new ApiFault(404, Messages.notFoundPath, url.pathname);
    if (method === 'GET') {
      const size = await model.sizeOf(name, false);
      const range = header(req, 'range');
      if (range === undefined) {
        return { status: 200, body: await model.read(name, 0, size) };
      }
      const m = /^bytes=(\d+)-(\d*)$/.exec(range);
      const start = m ? Number(m[1]) : NaN;
      const end = m && m[2] !== '' ? Number(m[2]) : size - 1;
      if (!m || start > end || end >= size) {
        return { status: 416, headers: { 'content-range': `bytes */${size}` }, body: errors(`Invalid range ${range}.`, name) };
      }
      const bytes = await model.read(name, start, end - start + 1);
      return { status: 206, body: bytes, headers: { 'content-range': `bytes ${start}-${end}/${size}` } };
    }
    if (method === 'PUT') {
      const m = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(header(req, 'content-range') ?? '');
      if (!m) throw new ApiFault(400, 'A Content-Range: bytes a-b/* header is required.', name);
      const start = Number(m[1]);
      const end = Number(m[2]);
      if (end < start || end - start + 1 > MAX_IO) throw new ApiFault(400, 'Invalid Content-Range.', name);
      const body = await readBody(req, end - start + 1);
      if (body.length !== end - start + 1) throw new ApiFault(400, 'Body length does not match Content-Range.', name);
      await model.write(name, start, body);
      return { status: 204 };
    }
    throw new ApiFault(404, Messages.notFoundPath, url.pathname);
  }

  async function route(req: IncomingMessage, url: URL, shortPage?: number): Promise<Reply> {
    const path = url.pathname;
    if (path === '/api/api_version' && req.method === 'GET') return { status: 200, body: { version: API_VERSIONS } };
    const apiMatch = /^\/api\/(\d+\.\d+)\/([a-z-]+|volumes\/diff)$/.exec(path);
    if (apiMatch) {
      if (!API_VERSIONS.includes(apiMatch[1]!)) throw new ApiFault(404, Messages.notFoundPath, path);
      return api(req, url, apiMatch[2]!, shortPage);
    }
    const dataMatch = /^\/data\/volumes\/([^/]+)(?:\/(extents|zeroes))?$/.exec(path);
    if (dataMatch) {
      let name: string;
      try {
        name = decodeURIComponent(dataMatch[1]!);
      } catch {
        throw new ApiFault(400, Messages.invalidName, dataMatch[1]);
      }
      return data(req, url, name, dataMatch[2]);
    }
    throw new ApiFault(404, Messages.notFoundPath, path);
  }

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://array.invalid');
    if (url.pathname.startsWith('/_admin/')) return sendReply(res, await safely(() => faultAdmin(faults, req, url)));
    const fired = faults.pick(req.method ?? 'GET', url);
    await answerWithFaults<FaultAction>({
      req, res, fired,
      status: injectedStatus,
      before(action) {
        if (action.type === 'revoke-token') sessions.clear();
        if (action.type === 'bad-continuation-token') return { status: 400, body: errors(Messages.invalidToken, 'continuation_token') };
        return undefined;
      },
      handle: () => safely(() => route(req, url, shortPageOf(fired))),
    });
  }

  const http = await serveHttp(handle, {
    port: opts.port ?? 0,
    host: opts.host ?? '127.0.0.1',
    crash: (e) => ({ status: 500, body: errors(`Internal error: ${(e as Error).message}`) }),
  });
  return {
    url: http.url,
    apiToken,
    faults,
    async close() {
      await http.close();
      await model.idle();
    },
  };
}

function injectedStatus(a: Extract<FaultAction, { type: 'status' }>): Reply {
  if (a.status === 429) {
    const headers: Record<string, string> = a.rateLimitHeaders
      ? {
          'x-ratelimit-limit-second': '10', 'x-ratelimit-remaining-second': '0',
          'x-ratelimit-limit-minute': '600', 'x-ratelimit-remaining-minute': a.minuteSpent ? '0' : '590',
        }
      : {};
    return { status: 429, headers, body: { message: Messages.rateLimited } };
  }
  // 500 comes from the array itself; any other injected status from the gateway in front of it.
  if (a.status === 500) return { status: 500, body: errors('Internal server error.') };
  return { status: a.status, body: { message: STATUS_CODES[a.status] ?? 'Error' } };
}

async function safely(fn: () => Promise<Reply>): Promise<Reply> {
  try {
    return await fn();
  } catch (e) {
    if (e instanceof ApiFault) return { status: e.status, body: errors(e.message, e.context) };
    if (e instanceof HttpError) return { status: e.status, body: errors(e.message) };
    throw e;
  }
}

function errors(message: string, context?: string): unknown {
  return { errors: [context === undefined ? { message } : { context, message }] };
}

function items(item: unknown): Reply {
  return { status: 200, body: { items: item === undefined ? [] : [item] } };
}

function listReply(result: { body: unknown; nextToken?: string }): Reply {
  return { status: 200, body: result.body, headers: result.nextToken ? { 'x-next-token': result.nextToken } : {} };
}

function pickNamed<T extends { name: string }>(all: T[], names: string[], notExist: string): T[] {
  const byName = new Map(all.map((i) => [i.name, i]));
  const missing = names.find((n) => !byName.has(n));
  if (missing !== undefined) throw new ApiFault(400, notExist, missing);
  return all.filter((i) => names.includes(i.name));
}

function oneName(q: URLSearchParams, param: string): string {
  const v = q.get(param);
  if (v === null) throw new ApiFault(400, `Missing ${param}.`, param);
  const names = splitNames(v);
  if (names.length !== 1) throw new ApiFault(400, `This mock takes exactly one name in ${param}.`, param);
  return names[0]!;
}

async function nextSuffix(model: ArrayModel, volume: string): Promise<string> {
  const taken = new Set((await model.listSnapshots()).filter((s) => s.source.name === volume).map((s) => s.suffix));
  let n = 1;
  while (taken.has(String(n))) n++;
  return String(n);
}

function header(req: IncomingMessage, name: string): string | undefined {
  const v = req.headers[name];
  return Array.isArray(v) ? v[0] : v;
}

function intParam(q: URLSearchParams, name: string, dflt: number): number {
  const v = q.get(name);
  if (v === null) return dflt;
  const n = Number(v);
  if (!Number.isSafeInteger(n) || n < 0) throw new ApiFault(400, `Invalid ${name}.`, name);
  return n;
}

/** A JSON body (empty = `{}`); anything else than JSON is the array's "bad request". */
async function readJson(req: IncomingMessage): Promise<unknown> {
  const body = await readBody(req, JSON_LIMIT);
  try {
    return parseJson(body) ?? {};
  } catch {
    throw new ApiFault(400, Messages.badRequest);
  }
}
