/**
 * Calls one broker asks of the process that serves an export, through the state store
 * (StateOps.requestOpCall): a snapshot of a volume that another process exports read-write is
 * taken (or deleted) there, within the export's lock — as that process takes its own (the pool
 * swaps its open image, or merges a deleted snapshot's layer into it; an array snapshots what the
 * export has written) — and the answer comes back here.
 */
import { randomBytes } from 'node:crypto';
import { parseRef, parseSnapshotRef } from '../model/refs.js';
import { Busy, errorFromCode, InvalidArgument, Timeout, toOffloadError } from '../model/errors.js';
import type { Principal } from '../locks/principal.js';
import type { BrokerState } from './state.js';
import type { OpCall, OpCallHandlers } from './op-call.js';
export type { OpCall, OpCallHandlers, OpCallKind } from './op-call.js';


type Answer = { ok: true; value: unknown } | { ok: false; error: { code: string; message: string; hint?: string; ref?: string; data?: Record<string, unknown> } };

/** The export's operation ended before it answered (its locks are gone: the caller may go on itself). */
export const GONE = Symbol('gone');

/** How often the asker looks for the answer. */
const POLL_MS = 50;

/**
 * Ask the holder of export operation `opId` (another process) to make `call`; its result, its
 * error thrown here as the same typed error (code, message, hint, ref, data), or GONE when the
 * export ended before taking it. Timeout after the config's lockWaitSeconds.
 */
export async function callExportHolder(s: BrokerState, opId: string, call: OpCall, what: string): Promise<unknown> {
  const id = `call-${randomBytes(8).toString('hex')}`;
  const deadline = Date.now() + s.lockWaitMs;
  if (!(await s.store.requestOpCall(id, opId, JSON.stringify({ ...call, deadline })))) return GONE;
  for (;;) {
    const text = await s.store.takeOpCallAnswer(id);
    if (text === null) return GONE;
    if (text !== undefined) {
      const answer = JSON.parse(text) as Answer;
      if (answer.ok) return answer.value;
      const { code, message, ...details } = answer.error;
      throw errorFromCode(code, message, details);
    }
    if (Date.now() > deadline) {
      // Withdrawn unless that process has taken it: then it may yet be made.
      const withdrawn = await s.store.withdrawOpCall(id).catch(() => false);
      throw new Timeout(`${what}: the process serving its export (${opId}) did not answer within ${s.lockWaitMs / 1000} s${withdrawn ? '' : '; it had taken the request, which may still be carried out'}`, {
        ref: call.ref, hint: 'that process may be paused or overloaded; try again, or stop its export first',
      });
    }
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
}

/**
 * `e` is a refusal of `what` on the snapshot `call.ref`: when it is Busy because another process
 * exports that snapshot's volume read-write (a disk in use there), that process is asked to make
 * `call` as `principal`, and its answer (or GONE: its export ended first) returned; otherwise `e`.
 */
export async function askServingProcess(s: BrokerState, e: unknown, call: Omit<OpCall, 'principal' | 'deadline'>, principal: Principal, what: string): Promise<unknown> {
  const ref = parseSnapshotRef(call.ref);
  const volume = `${ref.backend}/${ref.volume}`;
  const holder = e instanceof Busy && typeof e.data?.holder === 'string' && e.data.holder.startsWith('export:') ? e.data.holder : undefined;
  const elsewhere = holder && (await s.jobs.foreignExports()).find((x) => x.id === holder && x.ref === volume && !x.readOnly);
  if (!elsewhere) throw e;
  return callExportHolder(s, elsewhere.id, { ...call, principal: { id: principal.id, role: principal.role } }, what);
}

/** Answer a call made to an export of this process serving `volume` (holdExport's onCall) with `handlers`. */
export async function answerCall(volume: string, text: string, handlers: OpCallHandlers): Promise<string> {
  let answer: Answer;
  try {
    const call = JSON.parse(text) as Partial<OpCall>;
    const handler = typeof call.kind === 'string' && Object.hasOwn(handlers, call.kind) ? handlers[call.kind] : undefined;
    if (!handler || typeof call.ref !== 'string' || !call.principal || typeof call.principal.id !== 'string') {
      throw new InvalidArgument(`a call this build does not know: ${text.slice(0, 200)}`);
    }
    if (typeof call.deadline === 'number' && Date.now() > call.deadline) {
      throw new Timeout(`${call.ref}: the request came after its asker stopped waiting (${new Date(call.deadline).toISOString()})`, { ref: call.ref });
    }
    const ref = parseRef(call.ref);
    if (`${ref.backend}/${ref.volume}` !== volume) throw new InvalidArgument(`${call.ref} is not ${volume}, which this export serves, nor a snapshot of it`);
    if (call.refs !== undefined && (!Array.isArray(call.refs) || !call.refs.every((r) => typeof r === 'string') || !call.refs.includes(call.ref))) {
      throw new InvalidArgument(`a group of snapshots is a list of references that holds ${call.ref}`);
    }
    if (call.pairs !== undefined && (!Array.isArray(call.pairs) || !call.pairs.every((p) => typeof p?.source === 'string' && typeof p.target === 'string')
      || !call.pairs.some((p) => p.source === call.ref))) {
      throw new InvalidArgument(`a live copy's pairs are a list of { source, target } with ${call.ref} a source`);
    }
    const principal: Principal = { id: call.principal.id, role: call.principal.role === 'admin' ? 'admin' : 'tenant' };
    answer = { ok: true, value: (await handler(principal, call as OpCall)) ?? null };
  } catch (e) {
    const err = toOffloadError(e);
    answer = {
      ok: false,
      error: { code: err.code, message: err.message, ...(err.hint !== undefined ? { hint: err.hint } : {}), ...(err.ref !== undefined ? { ref: err.ref } : {}), ...(err.data !== undefined ? { data: err.data } : {}) },
    };
  }
  return JSON.stringify(answer);
}
