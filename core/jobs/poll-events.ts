import type { JobEvent, JobInfo } from './job.js';

/**
 * Follow a job that another process runs by reading it every `everyMs`: report each change of
 * status (`status`) or progress (`progress`) to `listener`, stop after it concluded or when a read
 * fails (the job is gone). Returns the unsubscribe. Used where no events cross the process
 * boundary: a job in the shared store (RemoteJob), a job a service runs (the service's client).
 */
export function pollJobEvents(read: () => Promise<JobInfo>, listener: (event: JobEvent) => void, everyMs = 250): () => void {
  let last = '';
  let busy = false;
  const timer = setInterval(() => {
    if (busy) return;
    busy = true;
    read().then((info) => {
      const key = `${info.status}:${info.progress.current}:${info.progress.total}`;
      if (key === last) return;
      const statusChanged = !last.startsWith(`${info.status}:`);
      last = key;
      listener({ type: statusChanged ? 'status' : 'progress', job: info });
      if (info.status === 'concluded') clearInterval(timer);
    }, () => clearInterval(timer)).finally(() => { busy = false; });
  }, everyMs);
  timer.unref();
  return () => clearInterval(timer);
}
