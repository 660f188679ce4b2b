import type { CloneStart } from '../broker-api.js';
import { errorFromCode } from '../model/errors.js';
import type { Volume } from '../model/types.js';

/**
 * `clone()` from `startClone()`: a native clone is done; a clone through the host is followed to
 * its end (its typed error, naming the job, if it failed) and the new volume looked up. The
 * embedded broker and the service's client both answer clone() this way.
 */
export async function cloneResult(started: CloneStart, lookUp: () => Promise<Volume>): Promise<Volume> {
  if (started.volume) return started.volume;
  const info = await started.job.wait();
  if (info.error) throw errorFromCode(info.error.code, info.error.message, { ref: info.ref, data: { job: info.id } });
  return lookUp();
}
