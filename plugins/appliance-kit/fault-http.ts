/**
 * The HTTP side of fault rules, the same for every mock: answering one request under the actions
 * that fired (in the order README.md documents), and the `/_admin/faults` endpoint.
 */
import { STATUS_CODES, type IncomingMessage, type ServerResponse } from 'node:http';
import { z } from 'zod';
import type { CommonAction, FaultInjector, LateAction, LatencyAction, NonJsonAction, ResetAction, ShortPageAction } from './faults.js';
import { drain, HttpError, parseJson, readBody, sendReply, sleep, type Reply } from './http.js';

/** What a mock supplies to answer one request under the actions that fired on it. */
export interface FaultedRequest<A extends { type: string }> {
  req: IncomingMessage;
  res: ServerResponse;
  /** The actions that fired, in rule order. */
  fired: readonly A[];
  /** The mock's answer to an injected `status`: its error envelope and headers. */
  status(action: Extract<A, { type: 'status' }>): Reply;
  /** The mock's own actions that act before handling (in rule order); a Reply answers instead of handling. */
  before?(action: A): Reply | undefined;
  /** Handle the request for real; `short-page` and the mock's other actions are read from `fired`. */
  handle(): Promise<Reply>;
  jsonType?: string;
}

/**
 * Answer one request: wait the latencies, let the mock's own actions act, drop the connection
 * (`reset`), or answer instead of handling (`status`, `non-json`); otherwise handle it, wait the
 * `late` time, and answer — or drop the connection (`reset` after processing).
 */
export async function answerWithFaults<A extends { type: string }>(r: FaultedRequest<A>): Promise<void> {
  const { req, res } = r;
  // Every grammar holds the common actions in exactly these shapes, so they read as CommonAction.
  const common = r.fired as readonly { type: string }[] as readonly CommonAction[];
  const latency = common.filter((a): a is LatencyAction => a.type === 'latency').reduce((ms, a) => ms + a.ms, 0);
  if (latency > 0) await sleep(latency);
  for (const a of r.fired) {
    const reply = r.before?.(a);
    if (reply) return answerInstead(req, res, reply, r.jsonType);
  }
  const resets = common.filter((a): a is ResetAction => a.type === 'reset');
  if (resets.some((a) => !a.afterProcessing)) {
    req.socket.destroy();
    return;
  }
  const status = r.fired.find((a) => a.type === 'status') as Extract<A, { type: 'status' }> | undefined;
  if (status) return answerInstead(req, res, r.status(status), r.jsonType);
  const nonJson = common.find((a): a is NonJsonAction => a.type === 'non-json');
  if (nonJson) {
    const title = `${nonJson.status} ${STATUS_CODES[nonJson.status] ?? 'Error'}`;
    const page = Buffer.from(`<html><head><title>${title}</title></head><body><h1>${title}</h1></body></html>`);
    return answerInstead(req, res, { status: nonJson.status, headers: { 'content-type': 'text/html' }, body: page });
  }
  const reply = await r.handle();
  const late = common.filter((a): a is LateAction => a.type === 'late').reduce((ms, a) => ms + a.ms, 0);
  if (late > 0) await sleep(late);
  if (resets.length > 0) {
    req.socket.destroy();
    return;
  }
  sendReply(res, reply, r.jsonType);
}

/** The page size a fired `short-page` asks for, if one fired. */
export function shortPageOf(fired: readonly { type: string }[]): number | undefined {
  return (fired as readonly CommonAction[]).find((a): a is ShortPageAction => a.type === 'short-page')?.items;
}

async function answerInstead(req: IncomingMessage, res: ServerResponse, reply: Reply, jsonType?: string): Promise<void> {
  await drain(req);
  sendReply(res, reply, jsonType);
}

const ADMIN_BODY_LIMIT = 1024 * 1024;

/**
 * `/_admin/faults`: GET lists the seed and the rules with their counters; POST replaces them with
 * a fault config (with `?append=true`, adds its rules under the current seed); DELETE clears them.
 * Every answer is the resulting `{seed, rules}`; a bad set is an HttpError 400 naming the field,
 * any other `/_admin/` path a 404. Mocks route every `/_admin/` request here, past the faults.
 */
export async function faultAdmin<A extends { type: string }, R, S>(
  injector: FaultInjector<A, R, S>,
  req: IncomingMessage,
  url: URL,
): Promise<Reply> {
  if (url.pathname.replace(/\/+$/, '') !== '/_admin/faults') throw new HttpError(404, `no such admin endpoint: ${url.pathname}`);
  const method = (req.method ?? 'GET').toUpperCase();
  if (method === 'DELETE') injector.clear();
  else if (method === 'POST') {
    const set = parseJson(await readBody(req, ADMIN_BODY_LIMIT)) ?? {};
    try {
      if (url.searchParams.get('append') === 'true') injector.append(set as S);
      else injector.configure(set as S);
    } catch (e) {
      if (e instanceof z.ZodError) throw new HttpError(400, e.message);
      throw e;
    }
  } else if (method !== 'GET') throw new HttpError(405, `${method} /_admin/faults: use GET, POST or DELETE`);
  return { status: 200, body: { seed: injector.seed, rules: injector.list() } };
}
