/**
 * What the PostgreSQL store says when the database fails it: typed errors that name the server
 * and database of the URL, never its password.
 */
import { secrets } from '../../config/secrets.js';
import { BackendUnavailable, FailedPrecondition, InternalError, isOffloadError, type OffloadError } from '../../model/errors.js';

/** A connection URL as messages may show it: everything but the password. */
export interface Target {
  /** `database "NAME" on HOST[:PORT] as USER`. */
  readonly where: string;
  /** The URL with its password replaced by ***. */
  readonly ref: string;
  /** Remove the password (as written in the URL and percent-decoded) from any text. */
  scrub(text: string): string;
}

function decode(s: string): string {
  try {
    return decodeURIComponent(s);
  } catch {
    return s;
  }
}

/**
 * Read a postgres:// URL well enough to name it. Not `new URL`: it rejects the socket form
 * `postgres://user@/db?host=/run/postgresql` that libpq and the pg client accept.
 */
export function describeUrl(url: string): Target {
  const m = /^([a-z][a-z0-9+.-]*):\/\/(?:([^@/?#]*)@)?([^/?#]*)(\/[^?#]*)?(\?[^#]*)?/i.exec(url);
  const userinfo = m?.[2] ?? '';
  const colon = userinfo.indexOf(':');
  const user = decode(colon < 0 ? userinfo : userinfo.slice(0, colon));
  const password = colon < 0 ? '' : userinfo.slice(colon + 1);
  const query = new URLSearchParams(m?.[5] ?? '');
  const host = decode(m?.[3] ?? '') || query.get('host') || 'localhost';
  const database = decode((m?.[4] ?? '').replace(/^\//, '')) || query.get('dbname') || user || 'postgres';
  const hidden = [password, decode(password)].filter((p) => p.length > 0).sort((a, b) => b.length - a.length);
  const scrub = (text: string): string => {
    let out = text;
    for (const p of hidden) out = out.split(p).join('***');
    return secrets.redact(out);
  };
  const ref = m
    ? url.replace(m[0], `${m[1]}://${userinfo ? `${colon < 0 ? userinfo : `${userinfo.slice(0, colon)}:***`}@` : ''}${m[3] ?? ''}${m[4] ?? ''}${m[5] ?? ''}`)
    : '(an unparsable PostgreSQL URL)';
  return { where: `database "${database}" on ${host}${user ? ` as ${user}` : ''}`, ref: scrub(ref), scrub };
}

/** Node's errors for a server that cannot be reached. */
const UNREACHABLE = new Set(['ECONNREFUSED', 'ENOENT', 'ECONNRESET', 'ETIMEDOUT', 'EHOSTUNREACH', 'ENETUNREACH', 'EPIPE', 'ENOTFOUND', 'EAI_AGAIN', 'EACCES']);

/** SQLSTATEs of a server that refuses this client: bad credentials, no such database, no right to it. */
const REFUSED: Record<string, string> = {
  '28000': 'the server refused the login',
  '28P01': 'the password was refused',
  '3D000': 'no such database',
  '42501': 'permission denied',
};

/**
 * An error from the pg client as a typed error: unreachable or gone → BackendUnavailable; refused
 * (login, missing database, privileges) → FailedPrecondition; anything else → Internal with its
 * SQLSTATE in data.sqlstate. Typed errors pass through unchanged.
 */
export function toStoreError(e: unknown, target: Target): OffloadError {
  if (isOffloadError(e)) return e;
  const err = e as { code?: unknown; message?: unknown };
  const code = typeof err.code === 'string' ? err.code : undefined;
  const detail = target.scrub(typeof err.message === 'string' ? err.message : String(e));
  const data = code ? { sqlstate: code } : undefined;
  const details = (hint: string) => ({ ref: target.ref, hint, cause: e, ...(data ? { data } : {}) });
  if (code && REFUSED[code]) {
    return new FailedPrecondition(`the PostgreSQL state store cannot use ${target.where}: ${REFUSED[code]} (${detail})`,
      details('check the state database URL: its user, password and database name, and that the database exists'));
  }
  const gone = (code !== undefined && (UNREACHABLE.has(code) || code.startsWith('08') || code.startsWith('57P') || code === '53300'))
    || /Connection terminated|timeout exceeded when trying to connect|Client has encountered a connection error/i.test(detail);
  if (gone) {
    return new BackendUnavailable(`the PostgreSQL state store cannot reach ${target.where}: ${detail}`,
      details('is the PostgreSQL server running, and is the state database URL right?'));
  }
  return new InternalError(`the PostgreSQL state store failed on ${target.where}: ${detail}`, details('this is a bug, or a database changed by hand'));
}
