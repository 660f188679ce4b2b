import { OntapCode } from '../api/codes.js';

/** An error the mock answers with `{"error":{"code","message","target"}}` and an HTTP status. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly target?: string,
  ) {
    super(message);
  }

  body(): { error: { code: string; message: string; target?: string } } {
    return { error: { code: this.code, message: this.message, ...(this.target ? { target: this.target } : {}) } };
  }
}

export const notFound = (what: string, target?: string) =>
  new ApiError(404, OntapCode.NOT_FOUND, `entry doesn't exist: ${what}`, target);
export const invalid = (message: string, target?: string) => new ApiError(400, OntapCode.INVALID_INPUT, message, target);
