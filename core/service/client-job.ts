/**
 * A job the service runs, as the client sees it: info() is the job as last heard, wait() follows
 * it with long polls (the service answers when it concludes, or after a while, and we ask again),
 * on() polls, and the verbs call the API. The job is the service's: a client that exits, is
 * interrupted or killed leaves it running there.
 */
import type { Job, JobEvent, JobInfo } from '../jobs/job.js';
import { pollJobEvents } from '../jobs/poll-events.js';
import { errorFromCode } from '../model/errors.js';
import type { HttpTransport } from './client-http.js';
import { ROUTES } from './routes.js';

/** How long the service holds one long poll before answering "not yet". */
const LONG_POLL_MS = 10_000;
/** How often on() asks for news. */
const POLL_MS = 250;

export class ServiceJob implements Job {
  readonly id: string;

  constructor(private readonly http: HttpTransport, private last: JobInfo) {
    this.id = last.id;
  }

  info(): JobInfo {
    return this.last;
  }

  async pause(): Promise<void> { await this.verb('jobs.pause'); }
  async resume(): Promise<void> { await this.verb('jobs.resume'); }
  async cancel(): Promise<void> { await this.verb('jobs.cancel'); }
  async complete(): Promise<void> { await this.verb('jobs.complete'); }

  async setSpeed(bytesPerSecond: number): Promise<void> {
    await this.http.call(ROUTES['jobs.setSpeed'], { params: { id: this.id }, body: { bytesPerSecond } });
    await this.refresh();
  }

  async dismiss(): Promise<void> {
    await this.http.call(ROUTES['jobs.dismiss'], { params: { id: this.id } });
  }

  async wait(): Promise<JobInfo> {
    for (;;) {
      const r = await this.http.call(ROUTES['jobs.wait'], { params: { id: this.id }, query: { timeoutMs: LONG_POLL_MS } });
      this.last = r.job as JobInfo;
      if (r.concluded) return this.last;
    }
  }

  async result(): Promise<JobInfo> {
    const info = await this.wait();
    if (info.error) throw errorFromCode(info.error.code, info.error.message, { ref: info.ref });
    return info;
  }

  /** Reports status and progress changes, as often as it polls. */
  on(listener: (event: JobEvent) => void): () => void {
    return pollJobEvents(() => this.refresh(), listener, POLL_MS);
  }

  private async verb(id: 'jobs.pause' | 'jobs.resume' | 'jobs.cancel' | 'jobs.complete'): Promise<void> {
    await this.http.call(ROUTES[id], { params: { id: this.id } });
    await this.refresh();
  }

  private async refresh(): Promise<JobInfo> {
    this.last = await this.http.call(ROUTES['jobs.get'], { params: { id: this.id } }) as JobInfo;
    return this.last;
  }
}
