/**
 * Typed errors on the wire: the HTTP status of each OffloadError code, the body every error answer
 * has (`{ error: err.toJSON() }`), and the typed error a client rebuilds from it — so that the CLI
 * prints the same message and exits with the same code embedded or through the service.
 */
import type { z } from 'zod';
import { describeIssue, formatPath } from '../config/format-issues.js';
import { errorFromCode, InvalidArgument, type ErrorCode, type OffloadError } from '../model/errors.js';

/** The status of each code; a request without a valid token is answered 401 by the auth hook. */
export const HTTP_STATUS: Readonly<Record<ErrorCode, number>> = {
  InvalidArgument: 400,
  OutOfRange: 400,
  PermissionDenied: 403,
  NotFound: 404,
  AlreadyExists: 409,
  Busy: 409,
  Cancelled: 409,
  FailedPrecondition: 412,
  Internal: 500,
  Corrupt: 500,
  Unsupported: 501,
  BackendUnavailable: 503,
  Timeout: 504,
};

export function statusOf(err: OffloadError): number {
  return HTTP_STATUS[err.code] ?? 500;
}

export function errorBody(err: OffloadError): { error: Record<string, unknown> } {
  return { error: err.toJSON() };
}

/** The typed error an error answer describes (an answer that is not one of ours: Internal, with its status). */
export function errorFromBody(status: number, body: unknown): OffloadError {
  const e = (body as { error?: { code?: unknown; message?: unknown; ref?: unknown; hint?: unknown; data?: unknown } } | undefined)?.error;
  if (!e || typeof e.code !== 'string' || typeof e.message !== 'string') {
    return errorFromCode('Internal', `the service answered HTTP ${status} without an error we know`);
  }
  return errorFromCode(e.code, e.message, {
    ...(typeof e.ref === 'string' ? { ref: e.ref } : {}),
    ...(typeof e.hint === 'string' ? { hint: e.hint } : {}),
    ...(e.data && typeof e.data === 'object' ? { data: e.data as Record<string, unknown> } : {}),
  });
}

/** A request that does not match its route's schema: one line naming the field, as a config error does. */
export function invalidRequest(where: 'path' | 'query' | 'body', error: z.ZodError): InvalidArgument {
  const first = error.issues[0]!;
  const more = error.issues.length > 1 ? ` (and ${error.issues.length - 1} more problem${error.issues.length > 2 ? 's' : ''})` : '';
  const path = first.path.length > 0 ? formatPath('', first.path) : where === 'body' ? 'the body' : `the ${where}`;
  return new InvalidArgument(`invalid request ${where}: ${path}: ${describeIssue(first)}${more}`, { hint: 'see /openapi.json for the shape of each request' });
}
