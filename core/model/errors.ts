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

export class InvalidArgument extends make('InvalidArgument') {}
export class NotFound extends make('NotFound') {}
export class AlreadyExists extends make('AlreadyExists') {}
export class FailedPrecondition extends make('FailedPrecondition') {}
export class Busy extends make('Busy') {}
export class OutOfRange extends make('OutOfRange') {}
export class Unsupported extends make('Unsupported') {}
export class PermissionDenied extends make('PermissionDenied') {}
export class BackendUnavailable extends make('BackendUnavailable') {}
export class Timeout extends make('Timeout') {}
export class Corrupt extends make('Corrupt') {}
export class Cancelled extends make('Cancelled') {}
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
