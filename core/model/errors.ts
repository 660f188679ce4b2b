/**
 * The one typed error hierarchy of the broker. Every error has a stable `code` that callers
 * branch on (never the message), says what was asked and on which ref, and — where there is
 * one — what to do about it (`hint`).
 */
export type ErrorCode =
  | 'InvalidArgument'
  | 'NotFound'
  | 'AlreadyExists'
  | 'FailedPrecondition'
  | 'Busy'
  | 'OutOfRange'
  | 'Unsupported'
  | 'PermissionDenied'
  | 'BackendUnavailable'
  | 'Timeout'
  | 'Corrupt'
  | 'Cancelled'
  | 'Internal';

export const ERROR_CODES: readonly ErrorCode[] = [
  'InvalidArgument', 'NotFound', 'AlreadyExists', 'FailedPrecondition', 'Busy', 'OutOfRange',
  'Unsupported', 'PermissionDenied', 'BackendUnavailable', 'Timeout', 'Corrupt', 'Cancelled', 'Internal',
];

export interface ErrorDetails {
  /** The ref (or file, or path) the failed request was about. */
  ref?: string;
  /** What to do about it, in one sentence. */
  hint?: string;
  /** The underlying cause, when there is one (kept out of the message). */
  cause?: unknown;
  /** Extra machine-readable facts (e.g. the job holding a lock). */
  data?: Record<string, unknown>;
}

/** The base of every typed error: a stable code, the ref it concerns, and a hint for what to do. */
export class OffloadError extends Error {
  readonly code: ErrorCode;
  readonly ref?: string;
  readonly hint?: string;
  readonly data?: Record<string, unknown>;

  constructor(code: ErrorCode, message: string, details: ErrorDetails = {}) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.code = code;
    this.name = code === 'Internal' ? 'InternalError' : `${code}Error`;
    if (details.ref !== undefined) this.ref = details.ref;
    if (details.hint !== undefined) this.hint = details.hint;
    if (details.data !== undefined) this.data = details.data;
  }

  /** One line for a human: message, then the hint. */
  describe(): string {
    return this.hint ? `${this.message} (${this.hint})` : this.message;
  }

  toJSON(): Record<string, unknown> {
    const out: Record<string, unknown> = { code: this.code, message: this.message };
    if (this.ref !== undefined) out.ref = this.ref;
    if (this.hint !== undefined) out.hint = this.hint;
    if (this.data !== undefined) out.data = this.data;
    return out;
  }
}

function make(code: ErrorCode) {
  return class extends OffloadError {
    constructor(message: string, details?: ErrorDetails) {
      super(code, message, details);
    }
  };
}

/** A bad name, size, option or request: nothing was done. */
export class InvalidArgument extends make('InvalidArgument') {}
/** What was asked for does not exist (or is not the caller's to see). */
export class NotFound extends make('NotFound') {}
/** The name is taken by something else. */
export class AlreadyExists extends make('AlreadyExists') {}
/** The request is valid but the state does not allow it now (dependents, a closed device…). */
export class FailedPrecondition extends make('FailedPrecondition') {}
/** Locked by a job, an operation or a maintenance lock, which the error names. */
export class Busy extends make('Busy') {}
/** A size or range the target cannot take (shrinking, past the end). */
export class OutOfRange extends make('OutOfRange') {}
/** Nothing can do this here: the reason says what is missing. */
export class Unsupported extends make('Unsupported') {}
/** The principal may not do this. */
export class PermissionDenied extends make('PermissionDenied') {}
/** The backend did not answer usably, after retries. */
export class BackendUnavailable extends make('BackendUnavailable') {}
/** It took too long. */
export class Timeout extends make('Timeout') {}
/** Damaged data or metadata (an image, a checksum that does not match). */
export class Corrupt extends make('Corrupt') {}
/** A job was cancelled. */
export class Cancelled extends make('Cancelled') {}
/** A bug or an unexpected failure, with what was being done. */
export class InternalError extends make('Internal') {}

const BY_CODE: Record<ErrorCode, new (message: string, details?: ErrorDetails) => OffloadError> = {
  InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, Busy, OutOfRange, Unsupported,
  PermissionDenied, BackendUnavailable, Timeout, Corrupt, Cancelled, Internal: InternalError,
};

/** Rebuild a typed error from its code (e.g. one read back from the job store). */
export function errorFromCode(code: string, message: string, details?: ErrorDetails): OffloadError {
  const ctor = BY_CODE[code as ErrorCode] ?? InternalError;
  return new ctor(message, details);
}

export function isOffloadError(e: unknown, code?: ErrorCode): e is OffloadError {
  return e instanceof OffloadError && (code === undefined || e.code === code);
}

/** Wrap anything thrown into an OffloadError, keeping typed errors as they are. */
export function toOffloadError(e: unknown, context?: string): OffloadError {
  if (e instanceof OffloadError) return e;
  const msg = e instanceof Error ? e.message : String(e);
  return new InternalError(context ? `${context}: ${msg}` : msg, { cause: e });
}
