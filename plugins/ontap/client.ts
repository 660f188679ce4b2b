/**
 * The ONTAP REST client: HTTP Basic auth on every request (ONTAP has no sessions), retries of
 * transient failures (429/503 per `Retry-After`, other 5xx, resets, timeouts, non-JSON bodies)
 * with capped, jittered exponential backoff, job polling with backoff and jitter up to a budget,
 * `_links.next` paging, and typed errors for ONTAP error codes.
 */
import type { ZodType } from 'zod';
import {
  BackendUnavailable, Cancelled, InternalError, isOffloadError, Timeout, type Logger,
} from '../../core/index.js';
import { Collection, ErrorBody, Job, JobLinkResponse, type CollectionOf } from './api/schemas.js';
import type { RetryPolicy } from './config.js';
import { mapApiError } from './errors.js';

export interface OntapClientOptions {
  endpoint: string;
  username: string;
  password: string;
  pollIntervalMs: number;
  pollMaxIntervalMs: number;
  pollBudgetMs: number;
  retry: RetryPolicy;
  logger?: Logger;
  /** Source of jitter (tests may pin it). */
  random?: () => number;
}

export interface RequestOptions {
  /** What is being asked, for error messages: `create volume "v1"`. */
  what: string;
  ref?: string;
  query?: Record<string, string | number | boolean | undefined>;
  body?: unknown;
  signal?: AbortSignal;
}

export interface RawResponse {
  status: number;
  headers: Headers;
  body: Buffer;
}

/** How a mutation ended: done, or its job vanished (expired) so the caller must look the object up. */
export type MutationOutcome = { state: 'success'; job?: Job } | { state: 'vanished'; jobUuid: string };

export interface WaitOptions {
  what: string;
  ref?: string;
  signal?: AbortSignal;
  /** Give up after this long (Timeout); undefined = the configured poll budget, Infinity = never. */
  budgetMs?: number;
  /** Called with every job state polled (e.g. to report progress). */
  onPoll?: (job: Job) => void | Promise<void>;
}

/** An ONTAP REST client: Basic auth, retries, `_links.next` paging and 202 + job polling. */
export class OntapClient {
  private readonly base: string;
  private readonly auth: string;
  private readonly random: () => number;

  constructor(private readonly opts: OntapClientOptions) {
    this.base = opts.endpoint.replace(/\/+$/, '');
    this.auth = `Basic ${Buffer.from(`${opts.username}:${opts.password}`).toString('base64')}`;
    this.random = opts.random ?? Math.random;
  }

  /** A JSON request; the answer is validated against `schema` when given. */
  async request<T = unknown>(method: string, path: string, opts: RequestOptions & { schema?: ZodType<T> }): Promise<{ status: number; data: T }> {
    const headers: Record<string, string> = { accept: 'application/json' };
    let body: string | undefined;
    if (opts.body !== undefined) {
      headers['content-type'] = 'application/json';
      body = JSON.stringify(opts.body);
    }
    const res = await this.send(method, this.url(path, opts.query), headers, body, opts, true);
    let data: unknown = undefined;
    if (res.body.length > 0) data = JSON.parse(res.body.toString('utf8'));
    if (opts.schema) {
      const parsed = opts.schema.safeParse(data ?? {});
      if (!parsed.success) {
        const issue = parsed.error.issues[0];
        throw new InternalError(
          `${opts.what}: the appliance's answer does not match the ONTAP API (${issue?.path.join('.') || 'body'}: ${issue?.message ?? 'invalid'})`,
          { ref: opts.ref, data: { httpStatus: res.status } },
        );
      }
      return { status: res.status, data: parsed.data };
    }
    return { status: res.status, data: data as T };
  }

  /** A binary request (the data plane); same auth, retries and error mapping. */
  async raw(method: string, path: string, opts: RequestOptions & { headers?: Record<string, string>; data?: Uint8Array }): Promise<RawResponse> {
    const headers = { ...opts.headers };
    return this.send(method, this.url(path, opts.query), headers, opts.data, opts, false);
  }

  /**
   * A mutation (POST/PATCH/DELETE): 201/200 means done; 202 means poll the job it names.
   * A job that fails throws its typed error; a job that vanished is reported to the caller.
   */
  async mutate(method: string, path: string, opts: RequestOptions & { budgetMs?: number; onPoll?: WaitOptions['onPoll'] }): Promise<MutationOutcome> {
    const { status, data } = await this.request(method, path, opts);
    if (status !== 202) return { state: 'success' };
    const link = JobLinkResponse.safeParse(data);
    if (!link.success) throw new InternalError(`${opts.what}: the appliance answered 202 without a job link`, { ref: opts.ref });
    return this.waitJob(link.data.job.uuid, opts);
  }

  /** Poll a job until it ends, with growing, jittered intervals, up to the budget. */
  async waitJob(uuid: string, opts: WaitOptions): Promise<MutationOutcome> {
    const budget = opts.budgetMs ?? this.opts.pollBudgetMs;
    const started = Date.now();
    let interval = this.opts.pollIntervalMs;
    for (;;) {
      let job: Job;
      try {
        job = (await this.request('GET', `/api/cluster/jobs/${uuid}`, { what: opts.what, ref: opts.ref, signal: opts.signal, schema: Job })).data;
      } catch (e) {
        // A job that has ended is deleted after a while (300 s by default); the caller looks the object up.
        if (isOffloadError(e, 'NotFound')) return { state: 'vanished', jobUuid: uuid };
        throw e;
      }
      await opts.onPoll?.(job);
      if (job.state === 'success') return { state: 'success', job };
      if (job.state === 'failure') {
        throw mapApiError({
          what: opts.what,
          ref: opts.ref,
          code: job.error?.code ?? (job.code !== undefined ? String(job.code) : undefined),
          message: job.error?.message ?? job.message ?? 'the job failed',
          jobUuid: uuid,
        });
      }
      const elapsed = Date.now() - started;
      if (elapsed >= budget) {
        throw new Timeout(`${opts.what}: appliance job ${uuid} is still ${job.state ?? 'running'} after ${elapsed} ms`, {
          ref: opts.ref,
          hint: `it may still finish on the appliance; check GET /api/cluster/jobs/${uuid}, or raise pollBudgetMs`,
          data: { jobUuid: uuid, state: job.state },
        });
      }
      const wait = Math.min(budget - elapsed, interval * (0.9 + 0.2 * this.random()));
      await sleep(wait, opts.signal, opts.what);
      interval = Math.min(this.opts.pollMaxIntervalMs, interval * 1.5);
    }
  }

  /** One page of a collection: `path` is a first-page path or a `_links.next` href. */
  async page<T>(path: string, item: ZodType<T>, opts: RequestOptions): Promise<{ records: T[]; next?: string }> {
    const { data } = await this.request('GET', path, { ...opts, schema: Collection(item) as unknown as ZodType<CollectionOf<T>> });
    return { records: data.records, next: data._links?.next?.href };
  }

  /** Every record of a collection, following `_links.next` (short pages included) to the end. */
  async all<T>(path: string, item: ZodType<T>, opts: RequestOptions): Promise<T[]> {
    const pages = await this.pages(path, Collection(item) as unknown as ZodType<CollectionOf<T>>, opts);
    return pages.flatMap((p) => p.records);
  }

  /**
   * Every page of a collection whose body `schema` validates (a collection, maybe with fields of
   * its own), following `_links.next` to the end; a repeating next link is an error.
   */
  async pages<P extends CollectionOf<unknown>>(path: string, schema: ZodType<P>, opts: RequestOptions): Promise<P[]> {
    const out: P[] = [];
    let href: string | undefined = path;
    let query = opts.query;
    const seen = new Set<string>();
    while (href !== undefined) {
      const answer: { data: P } = await this.request<P>('GET', href, { ...opts, query, schema });
      const data: P = answer.data;
      out.push(data);
      const next: string | undefined = data._links?.next?.href;
      query = undefined; // the next link carries the query
      if (next !== undefined && seen.has(next)) {
        throw new InternalError(`${opts.what}: the appliance's next link repeats a page it already returned (${next})`, { ref: opts.ref });
      }
      if (next !== undefined) seen.add(next);
      href = next;
    }
    return out;
  }

  url(path: string, query?: RequestOptions['query']): string {
    const u = new URL(this.base + path);
    for (const [k, v] of Object.entries(query ?? {})) if (v !== undefined) u.searchParams.set(k, String(v));
    return u.toString();
  }

  private async send(
    method: string,
    url: string,
    headers: Record<string, string>,
    body: string | Uint8Array | undefined,
    opts: RequestOptions,
    expectJson: boolean,
  ): Promise<RawResponse> {
    const { maxAttempts, requestTimeoutMs } = this.opts.retry;
    let problem = '';
    for (let attempt = 1; attempt <= maxAttempts; attempt++) {
      if (attempt > 1) {
        this.opts.logger?.debug('ontap: retrying', { what: opts.what, attempt, problem });
      }
      if (opts.signal?.aborted) throw new Cancelled(`${opts.what}: cancelled`, { ref: opts.ref });
      const timeout = AbortSignal.timeout(requestTimeoutMs);
      const signal = opts.signal ? AbortSignal.any([opts.signal, timeout]) : timeout;
      let retryAfter: number | undefined;
      try {
        const res = await fetch(url, { method, headers: { ...headers, authorization: this.auth }, body, signal });
        const buf = Buffer.from(await res.arrayBuffer());
        const verdict = this.judge(res, buf, expectJson, opts);
        if (verdict.ok) return { status: res.status, headers: res.headers, body: buf };
        problem = verdict.problem;
        retryAfter = verdict.retryAfterMs;
      } catch (e) {
        if (isOffloadError(e)) throw e;
        if (opts.signal?.aborted) throw new Cancelled(`${opts.what}: cancelled`, { ref: opts.ref });
        problem = timeout.aborted ? `no answer within ${requestTimeoutMs} ms` : `connection failed (${networkCause(e)})`;
      }
      if (attempt < maxAttempts) {
        await sleep(retryAfter !== undefined ? Math.min(retryAfter, this.opts.retry.maxDelayMs) : this.backoff(attempt), opts.signal, opts.what);
      }
    }
    throw new BackendUnavailable(`${opts.what}: the appliance at ${this.base} failed ${maxAttempts} time(s); last: ${problem}`, {
      ref: opts.ref,
      hint: 'check that the appliance is up and reachable, or raise retry.maxAttempts',
      data: { attempts: maxAttempts, last: problem },
    });
  }

  /**
   * An answer is usable, transient (retry: 429, 5xx, a non-JSON body where JSON was due), or an
   * ONTAP error (thrown as its typed error, never retried).
   */
  private judge(res: Response, buf: Buffer, expectJson: boolean, opts: RequestOptions): { ok: true } | { ok: false; problem: string; retryAfterMs?: number } {
    if (res.status === 429 || res.status >= 500) {
      return { ok: false, problem: `HTTP ${res.status}${describeError(buf)}`, retryAfterMs: retryAfterMs(res.headers.get('retry-after')) };
    }
    if (!expectJson && res.status < 400) return { ok: true };
    const json = buf.length === 0 ? {} : safeJson(buf);
    if (json === undefined) {
      return { ok: false, problem: `HTTP ${res.status} with a non-JSON body (${res.headers.get('content-type') ?? 'no content type'})` };
    }
    const error = ErrorBody.safeParse(json);
    // A 2xx that is only an error object is an error too (a job object carries `error` legitimately).
    if (res.status >= 400 || (error.success && isBareError(json))) {
      const err = error.success ? error.data.error : undefined;
      throw mapApiError({ what: opts.what, ref: opts.ref, httpStatus: res.status, code: err?.code, message: err?.message ?? `HTTP ${res.status}`, target: err?.target });
    }
    return { ok: true };
  }

  private backoff(attempt: number): number {
    const { baseDelayMs, maxDelayMs } = this.opts.retry;
    const exp = Math.min(maxDelayMs, baseDelayMs * 2 ** (attempt - 1));
    return exp * (0.5 + 0.5 * this.random());
  }
}

/** A 2xx body that is only an error (a job object also has an `error`, legitimately). */
function isBareError(body: unknown): boolean {
  return typeof body === 'object' && body !== null && !('uuid' in body) && !('records' in body) && !('job' in body);
}

function safeJson(buf: Buffer): unknown {
  try {
    return JSON.parse(buf.toString('utf8'));
  } catch {
    return undefined;
  }
}

function describeError(buf: Buffer): string {
  const e = ErrorBody.safeParse(safeJson(buf));
  return e.success ? `: ${e.data.error.message}` : '';
}

/** `Retry-After` as seconds or an HTTP date; undefined when absent or unreadable. */
function retryAfterMs(h: string | null): number | undefined {
  if (h === null || h.trim() === '') return undefined;
  const s = Number(h);
  if (Number.isFinite(s) && s >= 0) return s * 1000;
  const t = Date.parse(h);
  return Number.isNaN(t) ? undefined : Math.max(0, t - Date.now());
}

function networkCause(e: unknown): string {
  const cause = (e as { cause?: { code?: string; message?: string } })?.cause;
  return cause?.code ?? cause?.message ?? (e instanceof Error ? e.message : String(e));
}

function sleep(ms: number, signal: AbortSignal | undefined, what: string): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(new Cancelled(`${what}: cancelled`));
    const t = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(t);
      reject(new Cancelled(`${what}: cancelled`));
    };
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}
