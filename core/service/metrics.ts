/**
 * The service's Prometheus metrics (prom-client, a registry of its own): jobs by status and
 * executor and the bytes they processed on the host vs offloaded (read from the job store at each
 * scrape, so they count every runner's jobs, not only this service's, and drop what a dismissed
 * job had processed), the bytes this service's jobs processed as a counter, lease takeovers and
 * fencing rejections (from the broker's job events), request latency by route, and credentials
 * read again on SIGHUP.
 */
import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { JobEventHook } from '../jobs/job-manager.js';
import type { JobInfo } from '../jobs/job.js';

export class ServiceMetrics {
  readonly registry = new Registry();
  private jobs: () => Promise<JobInfo[]> = async () => [];
  private readonly takeovers: Counter;
  private readonly processed: Counter<'where'>;
  private readonly fenced: Counter;
  private readonly latency: Histogram<'method' | 'route' | 'status'>;
  private readonly reloads: Counter<'credentials' | 'result'>;

  constructor() {
    const registers = [this.registry];
    const metrics = this;
    new Gauge({
      name: 'offload_jobs', help: 'Jobs in the store by status (orphaned: nobody runs it) and executor (host, backend:NAME)',
      labelNames: ['status', 'executor'], registers,
      async collect() {
        this.reset();
        for (const j of await metrics.jobs()) this.inc({ status: j.orphaned ? 'orphaned' : j.status, executor: j.executor });
      },
    });
    new Gauge({
      name: 'offload_job_processed_bytes', help: 'Bytes processed by the jobs in the store: through the host, or offloaded to a backend',
      labelNames: ['where'], registers,
      async collect() {
        const sum = { host: 0, offloaded: 0 };
        for (const j of await metrics.jobs()) sum[j.executor === 'host' ? 'host' : 'offloaded'] += j.progress.current;
        this.set({ where: 'host' }, sum.host);
        this.set({ where: 'offloaded' }, sum.offloaded);
      },
    });
    this.processed = new Counter({
      name: 'offload_job_processed_bytes_total', help: 'Bytes the jobs this service ran processed, through the host or offloaded to a backend (counted as they go: dismissing a job takes nothing off)',
      labelNames: ['where'], registers,
    });
    this.processed.inc({ where: 'host' }, 0);
    this.processed.inc({ where: 'offloaded' }, 0);
    this.takeovers = new Counter({ name: 'offload_job_takeovers_total', help: 'Orphaned jobs this service took over (a new lease, the next fencing token)', registers });
    this.fenced = new Counter({ name: 'offload_job_fencing_rejections_total', help: 'Jobs this service stopped running because another runner holds them (its write was fenced off)', registers });
    this.latency = new Histogram({
      name: 'offload_http_request_duration_seconds', help: 'Control API requests by route and status',
      labelNames: ['method', 'route', 'status'], registers, buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 30, 60],
    });
    this.reloads = new Counter({
      name: 'offload_credential_reloads_total', help: 'Credentials read again on SIGHUP (tokens, https, nbd-tls, and the config file with its backends: config) and whether they could be (failed: the ones in use stay; alert on it before a certificate expires)',
      labelNames: ['credentials', 'result'], registers,
    });
  }

  /** A credential read again (SIGHUP), or not. */
  reloaded(credentials: 'tokens' | 'https' | 'nbd-tls' | 'config', ok: boolean): void {
    this.reloads.inc({ credentials, result: ok ? 'ok' : 'failed' });
  }

  /** Where the job gauges read from (the administrator's view of the service's broker). */
  readJobsFrom(list: () => Promise<JobInfo[]>): void {
    this.jobs = list;
  }

  /** For createBroker({ onJobEvent }). */
  readonly onJobEvent: JobEventHook = (e) => {
    if (e.type === 'processed') this.processed.inc({ where: e.executor === 'host' ? 'host' : 'offloaded' }, e.bytes);
    else if (e.type === 'takeover') this.takeovers.inc();
    else this.fenced.inc();
  };

  observe(method: string, route: string, status: number, seconds: number): void {
    this.latency.observe({ method, route, status: String(status) }, seconds);
  }

  text(): Promise<string> {
    return this.registry.metrics();
  }

  get contentType(): string {
    return this.registry.contentType;
  }
}
