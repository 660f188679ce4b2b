/**
 * HTTP client of the FlashArray REST 2.x API (and of the mock's data plane).
 *
 * - Auth: `POST /login` with the long-lived `api-token` header gives a session in the
 *   `x-auth-token` response header; a 401 triggers one re-login and one retry.
 * - Retries (per request, up to `retry.maxAttempts` tries): 429 waits as its `X-RateLimit-*`
 *   (or `Retry-After`) headers say — a spent minute budget means the next minute — and, when
 *   they are absent, backs off like a 5xx; 5xx, connection resets, timeouts and non-JSON
 *   answers back off exponentially (capped) with jitter. Every request the backend makes is
 *   safe to repeat (see backend.ts), so a retry after a lost answer cannot do harm.
 * - Errors: the array's `{"errors":[{context, message}]}` is mapped by message substring to our
 *   typed errors; exhausted retries end in Timeout (when the last try timed out) or
 *   BackendUnavailable.
 */
import {
  AlreadyExists, BackendUnavailable, FailedPrecondition, InvalidArgument, NotFound, OffloadError, OutOfRange,
  PermissionDenied, Timeout, Unsupported, type Logger,
} from '../../core/index.js';
import type { z } from 'zod';
import { Match } from './api/messages.js';
import { DataExtents, ErrorEnvelope, GatewayError, ListEnvelope, VolumeDiffList, type DiffRange, type ListPage } from './api/schemas.js';
import type { RetryPolicy } from './config.js';

export interface FlashArrayClientOptions {
  /** Backend name, for messages. */
  label: string;
  endpoint: string;
  apiToken: string;
  apiVersion: string;
  timeoutMs: number;
  retry: RetryPolicy;
  logger?: Logger;
  /** For tests: the jitter source. */
  random?: () => number;
}

export interface CallOptions {
  query?: Record<string, string | number | boolean | undefined>;
  body?: unknown;
  raw?: Uint8Array;
  headers?: Record<string, string>;
  /** What is being done, for messages: "create volume v1". */
  what: string;
  /** The ref the request is about, for messages. */
  ref?: string;
}

interface Answer {
  status: number;
  headers: Headers;
  bytes: Buffer;
}

/** A failure worth retrying, remembered to build the final error. */
interface Transient { timeout: boolean; detail: string }

export interface ApiErrorData extends Record<string, unknown> {
  status: number;
  apiMessage: string;
  context?: string;
}

export interface PageOf<T> { items: T[]; next?: string; total?: number }

/** A FlashArray REST 2.x client: api-token login, retries with backoff, continuation tokens. */
export class FlashArrayClient {
  private session: string | undefined;
  private loggingIn: Promise<string> | undefined;
  private readonly base: string;
  private readonly random: () => number;
  /** Requests sent (every try), for diagnostics and tests. */
  requestCount = 0;

  constructor(private readonly opts: FlashArrayClientOptions) {
    this.base = opts.endpoint.replace(/\/+$/, '');
    this.random = opts.random ?? Math.random;
  }

  // ---------- API calls ----------

  /** A JSON call under `/api/<version>/`; returns the parsed body (undefined when empty). */
  async api(method: string, resource: string, opts: CallOptions): Promise<{ body: unknown; headers: Headers }> {
    const answer = await this.authed(method, `/api/${this.opts.apiVersion}/${resource}`, opts, true);
    return { body: parseJson(answer.bytes), headers: answer.headers };
  }

  /** One page of a collection, validated against the list envelope. */
  async page<T extends z.ZodType>(resource: string, item: T, query: CallOptions['query'], page: { limit?: number; token?: string } | undefined, what: string, ref?: string): Promise<PageOf<z.infer<T>>> {
    const { body, headers } = await this.api('GET', resource, {
      what, ref, query: { ...query, limit: page?.limit, continuation_token: page?.token, total_item_count: true },
    });
    const env = this.validate(ListEnvelope(item), body, what, ref);
    const next = env.continuation_token || headers.get('x-next-token') || undefined;
    if (env.more_items_remaining === true && next === undefined) {
      // Stopping here would silently return part of the list.
      throw new BackendUnavailable(`${what} on flasharray "${this.opts.label}": the array says more items remain but gave no continuation token`, {
        ref, hint: 'the listing would be incomplete; retry later',
      });
    }
    return { items: env.items, next, total: env.total_item_count ?? undefined };
  }

  /**
   * Every item of a collection: follows continuation tokens (short pages are fine). A token the
   * array no longer accepts restarts the listing once; a token that repeats is a broken array.
   */
  async all<T extends z.ZodType>(resource: string, item: T, query: CallOptions['query'], what: string, ref?: string): Promise<z.infer<T>[]> {
    const pages = await this.everyPage(resource, ListEnvelope(item), query, what, ref);
    return pages.flatMap((p) => p.items as z.infer<T>[]);
  }

  /**
   * Every page of a listing whose envelope is `envelope` (a list envelope, maybe with fields of
   * its own), by continuation token, with the rules of `all`.
   */
  async everyPage<E extends z.ZodType<ListPage<unknown>>>(resource: string, envelope: E, query: CallOptions['query'], what: string, ref?: string): Promise<z.infer<E>[]> {
    for (let restart = 0; ; restart++) {
      const out: z.infer<E>[] = [];
      const seen = new Set<string>();
      let token: string | undefined;
      try {
        do {
          const { body, headers } = await this.api('GET', resource, {
            what, ref, query: { ...query, continuation_token: token, total_item_count: true },
          });
          const env = this.validate(envelope, body, what, ref);
          out.push(env);
          const next = env.continuation_token || headers.get('x-next-token') || undefined;
          if (env.more_items_remaining === true && next === undefined) {
            throw new BackendUnavailable(`${what} on flasharray "${this.opts.label}": the array says more items remain but gave no continuation token`, {
              ref, hint: 'the listing would be incomplete; retry later',
            });
          }
          if (next !== undefined && seen.has(next)) {
            throw new BackendUnavailable(`${what} on flasharray "${this.opts.label}": the array returned the same continuation token twice`, { ref, hint: 'the listing cannot make progress; retry later' });
          }
          if (next !== undefined) seen.add(next);
          token = next;
        } while (token !== undefined);
        return out;
      } catch (e) {
        if (restart === 0 && token !== undefined && isBadToken(e)) {
          this.opts.logger?.warn('flasharray: continuation token refused, restarting the listing', { backend: this.opts.label, what });
          continue;
        }
        throw e;
      }
    }
  }

  /**
   * The ranges where `name` (a volume or `vol.suffix` snapshot) may differ from the snapshot
   * `baseName`, every page of `GET volumes/diff` (the mock's stand-in for Purity's REST 1.x
   * volume diff). `blockSize` and `provisioned` are the last page's: the unit and the size.
   */
  async volumeDiff(name: string, baseName: string, segment: { offset?: number; length?: number; blockSize?: number }, ref?: string): Promise<{ ranges: DiffRange[]; blockSize: number; provisioned: number }> {
    const what = `diff ${name} against ${baseName}`;
    const pages = await this.everyPage('volumes/diff', VolumeDiffList, {
      names: name, base_name: baseName, segment_offset: segment.offset, segment_length: segment.length, block_size: segment.blockSize,
    }, what, ref);
    const last = pages[pages.length - 1]!;
    return { ranges: pages.flatMap((p) => p.items), blockSize: last.block_size, provisioned: last.provisioned };
  }

  // ---------- data plane (the mock's HTTP stand-in for iSCSI/FC) ----------

  async readData(volume: string, offset: number, length: number): Promise<Buffer> {
    if (length === 0) return Buffer.alloc(0);
    const a = await this.authed('GET', dataPath(volume), {
      what: `read ${length} bytes at ${offset} of volume ${volume}`, ref: volume,
      headers: { range: `bytes=${offset}-${offset + length - 1}` },
    }, false);
    if (a.bytes.length !== length) {
      throw new BackendUnavailable(`read of volume ${volume} on flasharray "${this.opts.label}" returned ${a.bytes.length} bytes instead of ${length}`, { ref: volume });
    }
    return a.bytes;
  }

  async writeData(volume: string, offset: number, data: Uint8Array): Promise<void> {
    if (data.length === 0) return;
    await this.authed('PUT', dataPath(volume), {
      what: `write ${data.length} bytes at ${offset} of volume ${volume}`, ref: volume, raw: data,
      headers: { 'content-range': `bytes ${offset}-${offset + data.length - 1}/*`, 'content-type': 'application/octet-stream' },
    }, false);
  }

  async zeroData(volume: string, offset: number, length: number): Promise<void> {
    if (length === 0) return;
    await this.authed('POST', `${dataPath(volume)}/zeroes`, {
      what: `zero ${length} bytes at ${offset} of volume ${volume}`, ref: volume, body: { offset, length },
    }, true);
  }

  async extents(volume: string, offset: number, length: number): Promise<DataExtents> {
    const what = `map extents of volume ${volume}`;
    const a = await this.authed('GET', `${dataPath(volume)}/extents`, { what, ref: volume, query: { offset, length } }, true);
    return this.validate(DataExtents, parseJson(a.bytes), what, volume);
  }

  // ---------- session ----------

  async logout(): Promise<void> {
    const session = this.session;
    this.session = undefined;
    if (!session) return;
    try {
      await this.exchange('POST', `/api/${this.opts.apiVersion}/logout`, { what: 'log out', headers: { 'x-auth-token': session } }, true, 1);
    } catch { /* the session simply expires */ }
  }

  private login(): Promise<string> {
    this.loggingIn ??= (async () => {
      try {
        const a = await this.exchange('POST', `/api/${this.opts.apiVersion}/login`, { what: 'log in', headers: { 'api-token': this.opts.apiToken } }, true);
        if (a.status === 401 || a.status === 403) {
          throw new PermissionDenied(`flasharray "${this.opts.label}" refused the API token (HTTP ${a.status})`, {
            hint: 'check the apiToken of this backend in the config', data: { status: a.status },
          });
        }
        if (a.status >= 400) throw this.mapError(a, { what: 'log in' });
        const token = a.headers.get('x-auth-token');
        if (!token) throw new BackendUnavailable(`flasharray "${this.opts.label}" answered the login without an x-auth-token header`, { hint: 'is the endpoint a FlashArray REST 2.x API?' });
        this.session = token;
        return token;
      } finally {
        this.loggingIn = undefined;
      }
    })();
    return this.loggingIn;
  }

  /** A request with a session: logs in when needed and once more after a 401. */
  private async authed(method: string, path: string, opts: CallOptions, json: boolean): Promise<Answer> {
    for (let relogin = 0; ; relogin++) {
      const session = this.session ?? (await this.login());
      const a = await this.exchange(method, path, { ...opts, headers: { ...opts.headers, 'x-auth-token': session } }, json);
      if (a.status === 401) {
        if (this.session === session) this.session = undefined;
        if (relogin === 0) continue;
        throw new PermissionDenied(`${opts.what} on flasharray "${this.opts.label}": the session was refused even after logging in again`, {
          ref: opts.ref, hint: 'check that the API token is still valid and its user may do this', data: { status: 401 },
        });
      }
      if (a.status >= 400) throw this.mapError(a, opts);
      // Some gateways answer 2xx with an error body; take it for what it says, not for success.
      if (json && ErrorEnvelope.safeParse(parseJson(a.bytes)).success) throw this.mapError(a, opts);
      return a;
    }
  }

  /**
   * One request with the retry policy. Returns any answer that is not retried (2xx, 4xx);
   * throws Timeout/BackendUnavailable when the tries run out.
   */
  private async exchange(method: string, path: string, opts: CallOptions, json: boolean, maxAttempts = this.opts.retry.maxAttempts): Promise<Answer> {
    const url = new URL(this.base + path);
    for (const [k, v] of Object.entries(opts.query ?? {})) if (v !== undefined) url.searchParams.set(k, String(v));
    const headers: Record<string, string> = { accept: json ? 'application/json' : '*/*', ...opts.headers };
    let body: Uint8Array | string | undefined = opts.raw;
    if (opts.body !== undefined) {
      body = JSON.stringify(opts.body);
      headers['content-type'] = 'application/json';
    }
    let last: Transient = { timeout: false, detail: 'no attempt' };
    for (let attempt = 1; attempt <= maxAttempts; attempt++) {
      let wait: number;
      try {
        this.requestCount++;
        const res = await fetch(url, { method, headers, body, signal: AbortSignal.timeout(this.opts.timeoutMs) });
        const bytes = Buffer.from(await res.arrayBuffer());
        const answer: Answer = { status: res.status, headers: res.headers, bytes };
        if (res.status === 429) {
          last = { timeout: false, detail: 'rate limited (HTTP 429)' };
          wait = this.rateLimitWait(res.headers, attempt);
        } else if (res.status >= 500) {
          last = { timeout: false, detail: `HTTP ${res.status}${describeBody(bytes)}` };
          wait = this.backoff(attempt);
        } else if (json && res.status < 300 && bytes.length > 0 && parseJson(bytes) === NOT_JSON) {
          last = { timeout: false, detail: `a non-JSON answer (HTTP ${res.status}, ${res.headers.get('content-type') ?? 'no content type'})` };
          wait = this.backoff(attempt);
        } else {
          return answer;
        }
      } catch (e) {
        const timeout = (e as Error).name === 'TimeoutError' || (e as Error).name === 'AbortError';
        last = timeout
          ? { timeout: true, detail: `no answer within ${this.opts.timeoutMs} ms` }
          : { timeout: false, detail: networkDetail(e) };
        wait = this.backoff(attempt);
      }
      if (attempt < maxAttempts) {
        this.opts.logger?.debug('flasharray: retrying', { backend: this.opts.label, what: opts.what, attempt, waitMs: wait, reason: last.detail });
        await sleep(wait);
      }
    }
    const message = `${opts.what} on flasharray "${this.opts.label}" failed after ${maxAttempts} ${maxAttempts === 1 ? 'try' : 'tries'}: ${last.detail}`;
    const details = { ref: opts.ref, hint: 'the array may be overloaded or unreachable; retry later (the request is safe to repeat)', data: { attempts: maxAttempts } };
    throw last.timeout ? new Timeout(message, details) : new BackendUnavailable(message, details);
  }

  /** Capped exponential backoff with "equal jitter": half fixed, half random. */
  private backoff(attempt: number): number {
    const { baseDelayMs, maxDelayMs } = this.opts.retry;
    const d = Math.min(maxDelayMs, baseDelayMs * 2 ** (attempt - 1));
    return Math.round(d / 2 + (d / 2) * this.random());
  }

  /** How long a 429 asks us to wait; headers that are absent or garbled fall back to backoff. */
  private rateLimitWait(h: Headers, attempt: number): number {
    const cap = this.opts.retry.maxRateLimitWaitMs;
    const retryAfter = numberHeader(h, 'retry-after');
    if (retryAfter !== undefined) return Math.min(cap, retryAfter * 1000);
    const minute = numberHeader(h, 'x-ratelimit-remaining-minute');
    const second = numberHeader(h, 'x-ratelimit-remaining-second');
    if (minute === 0) return Math.min(cap, msToNextMinute());
    if (second !== undefined) return Math.min(cap, 1000);
    return this.backoff(attempt);
  }

  private validate<T extends z.ZodType>(schema: T, body: unknown, what: string, ref?: string): z.infer<T> {
    const r = schema.safeParse(body);
    if (r.success) return r.data;
    const issue = r.error.issues[0];
    throw new BackendUnavailable(`${what} on flasharray "${this.opts.label}": unexpected answer (${issue ? `${issue.path.join('.') || 'body'}: ${issue.message}` : 'invalid'})`, {
      ref, hint: `is the endpoint a FlashArray serving REST ${this.opts.apiVersion}?`,
    });
  }

  private mapError(a: Answer, opts: CallOptions): OffloadError {
    const body = parseJson(a.bytes);
    const env = ErrorEnvelope.safeParse(body);
    const gateway = GatewayError.safeParse(body);
    const first = env.success ? env.data.errors[0]! : undefined;
    const apiMessage = first?.message ?? (gateway.success ? gateway.data.message : `HTTP ${a.status}`);
    const context = first?.context ?? undefined;
    const data: ApiErrorData = { status: a.status, apiMessage, ...(context ? { context } : {}) };
    const message = `${opts.what} on flasharray "${this.opts.label}": ${apiMessage}`;
    const d = { ref: opts.ref, data };
    if (apiMessage.includes(Match.alreadyExists)) return new AlreadyExists(message, { ...d, hint: 'choose another name or delete the existing one' });
    if (apiMessage.includes(Match.doesNotExist) || apiMessage.includes(Match.noSuch)) return new NotFound(message, d);
    if (apiMessage.includes(Match.destroyed)) return new FailedPrecondition(message, { ...d, hint: 'it is pending eradication on the array' });
    if (apiMessage.includes(Match.readOnly)) return new FailedPrecondition(message, { ...d, hint: 'a snapshot\'s data can only be read; copy it to a volume to write' });
    if (apiMessage.includes(Match.truncation)) return new OutOfRange(message, { ...d, hint: 'volumes can only grow' });
    if (apiMessage.includes(Match.continuation)) return new InvalidArgument(message, { ...d, hint: 'the page token is invalid or expired; list again from the start' });
    if (a.status === 403) return new PermissionDenied(message, { ...d, hint: 'the API token\'s user may not do this' });
    if (a.status === 404) return new Unsupported(message, { ...d, hint: `the array does not serve this path; check endpoint and apiVersion (${this.opts.apiVersion})` });
    if (a.status === 413 || a.status === 416) return new OutOfRange(message, d);
    return new InvalidArgument(message, d);
  }
}

const NOT_JSON = Symbol('not JSON');

function parseJson(bytes: Buffer): unknown {
  if (bytes.length === 0) return undefined;
  try {
    return JSON.parse(bytes.toString('utf8'));
  } catch {
    return NOT_JSON;
  }
}

/** True for the error a refused continuation token maps to. */
export function isBadToken(e: unknown): boolean {
  return e instanceof InvalidArgument && typeof e.data?.apiMessage === 'string' && e.data.apiMessage.includes(Match.continuation);
}

/** The array's message of a mapped error, if it came from the array. */
export function apiMessage(e: unknown): string | undefined {
  return e instanceof OffloadError && typeof e.data?.apiMessage === 'string' ? e.data.apiMessage : undefined;
}

function dataPath(volume: string): string {
  return `/data/volumes/${encodeURIComponent(volume)}`;
}

function describeBody(bytes: Buffer): string {
  const body = parseJson(bytes);
  const env = ErrorEnvelope.safeParse(body);
  if (env.success) return `: ${env.data.errors[0]!.message}`;
  const gw = GatewayError.safeParse(body);
  return gw.success ? `: ${gw.data.message}` : '';
}

function networkDetail(e: unknown): string {
  const cause = (e as { cause?: { code?: string; message?: string } }).cause;
  return `connection failed (${cause?.code ?? cause?.message ?? (e as Error).message})`;
}

function numberHeader(h: Headers, name: string): number | undefined {
  const v = h.get(name);
  if (v === null || v.trim() === '') return undefined;
  const n = Number(v);
  return Number.isFinite(n) && n >= 0 ? n : undefined;
}

function msToNextMinute(): number {
  return 60_000 - (Date.now() % 60_000);
}

function sleep(ms: number): Promise<void> {
  return ms > 0 ? new Promise((r) => setTimeout(r, ms)) : Promise.resolve();
}
