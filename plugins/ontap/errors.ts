/** How ONTAP answers map to the broker's typed errors. */
import {
  AlreadyExists, BackendUnavailable, Busy, Cancelled, FailedPrecondition, InternalError, InvalidArgument,
  NotFound, OutOfRange, PermissionDenied, type OffloadError,
} from '../../core/index.js';
import { OntapCode } from './api/codes.js';

export interface ApiFailure {
  /** What was asked, e.g. `create volume "v1"`. */
  what: string;
  ref?: string;
  httpStatus?: number;
  code?: string;
  message: string;
  target?: string;
  jobUuid?: string;
}

/** The typed error for an ONTAP error code (or, without one, an HTTP status). */
export function mapApiError(f: ApiFailure): OffloadError {
  const said = `${f.what}: the appliance answered "${f.message}"${f.code ? ` (ONTAP error ${f.code})` : ''}`;
  const data: Record<string, unknown> = {};
  if (f.code !== undefined) data.ontapCode = f.code;
  if (f.httpStatus !== undefined) data.httpStatus = f.httpStatus;
  if (f.target !== undefined) data.target = f.target;
  if (f.jobUuid !== undefined) data.jobUuid = f.jobUuid;
  const d = { ref: f.ref, data };
  switch (f.code) {
    case OntapCode.DUPLICATE:
      return new AlreadyExists(said, { ...d, hint: 'pick another name, or delete the existing object first' });
    case OntapCode.NOT_FOUND:
      return new NotFound(said, { ...d, hint: 'check the name; list what exists with `offload volume list`' });
    case OntapCode.VOLUME_BUSY:
      return new Busy(said, { ...d, hint: 'wait for the running appliance job (e.g. a clone split) to end, then retry' });
    case OntapCode.SIZE_ERROR:
      return new OutOfRange(said, { ...d, hint: 'volumes can grow but not shrink; pass a size at least the current one' });
    case OntapCode.HAS_CLONES:
      return new FailedPrecondition(said, { ...d, hint: 'delete its clones, or make them independent with `offload stream`, first' });
    case OntapCode.SNAPSHOT_LOCKED:
      return new FailedPrecondition(said, { ...d, hint: 'a FlexClone depends on this snapshot: delete the clone or split it with `offload stream` first' });
    case OntapCode.NOT_A_CLONE:
      return new FailedPrecondition(said, { ...d, hint: 'only a linked clone can be made independent' });
    case OntapCode.READ_ONLY:
      return new FailedPrecondition(said, { ...d, hint: 'a snapshot\'s data can only be read; clone it to a volume to write' });
    case OntapCode.JOB_CANCELLED:
      return new Cancelled(said, d);
    case OntapCode.INVALID_INPUT:
      return new InvalidArgument(said, d);
    case OntapCode.NOT_AUTHORIZED:
      return new PermissionDenied(said, { ...d, hint: 'check `username` and `password` of this backend in the config' });
  }
  switch (f.httpStatus) {
    case 400:
      return new InvalidArgument(said, d);
    case 401:
    case 403:
      return new PermissionDenied(said, { ...d, hint: 'check `username` and `password` of this backend in the config' });
    case 404:
      return new NotFound(said, d);
    case 409:
      return new FailedPrecondition(said, d);
    case 416:
      return new OutOfRange(said, d);
  }
  if (f.httpStatus !== undefined && f.httpStatus >= 500) {
    return new BackendUnavailable(said, { ...d, hint: 'the appliance is failing; check its health and retry later' });
  }
  if (f.jobUuid !== undefined) {
    return new FailedPrecondition(said, { ...d, hint: `see the appliance job ${f.jobUuid} for details` });
  }
  return new InternalError(said, d);
}
