/**
 * The public API of Offload Broker. Plugins and applications import core only through this file.
 *
 * Importing it is cheap: the broker, the config schemas, SQLite and inversify are loaded when
 * `createBroker` or `runCli` is first called, so a plugin's engine code (and `offload img`)
 * starts without them.
 */
import type { Broker } from './broker-api.js';
import type { CreateBrokerOptions } from './broker.js';
import type { BrokerConfig, RawConfig } from './config/config.js';
import type { RunCliOptions } from './cli/run-cli.js';

export * from './model/errors.js';
export * from './model/refs.js';
export * from './model/capabilities.js';
export type * from './model/types.js';
export * from './backend/block-device.js';
export type * from './backend/storage-backend.js';
export * from './backend/plugin.js';
export * from './backend/file-format.js';
export type * from './jobs/job-task.js';
export type * from './jobs/job.js';
export * from './locks/principal.js';
export * from './locks/lock-manager.js';
export type * from './planner/plan.js';
export * from './cli/contribution.js';
export type * from './broker-api.js';
export * from './jobs/job-states.js';
export { RateLimiter } from './jobs/rate-limiter.js';
export { JobRun, Shutdown, LeaseLost, leftForNextRun, holdsLease, closeAfter, type JobRunOptions } from './jobs/job-run.js';
export { currentBoot } from './jobs/runner.js';
export { RwLock } from './rw-lock.js';
export { KeyedMutex } from './keyed-mutex.js';
export type { CreateBrokerOptions } from './broker.js';
export type { JobEventHook } from './jobs/job-manager.js';
export type { BrokerConfig, RawConfig } from './config/config.js';
export { ConfigError, isConfigError } from './config/config-error.js';
export { secrets, REDACTED } from './config/secrets.js';
export { createLogger, silentLogger } from './logger.js';
export { copyData, resumeOffset, COPY_CHUNK, type CopyDataOptions, type CopyResult } from './copy/copier.js';
export { nonZeroRuns } from './copy/zero-scan.js';
export { hostCopyTask, type HostCopyParams } from './copy/host-copy.js';
export type { RunCliOptions } from './cli/run-cli.js';
export { parseSize, formatSize } from './cli/sizes.js';
export type { StartJobRequest, TaskResolver, Unresumable } from './jobs/job-manager.js';
export { NbdServer, type ListenAddress, type NbdExportOptions, type NbdServerOptions } from './export/nbd-server.js';
export type { ExportInfo } from './export/registry.js';
export type { JobRecord } from './jobs/job-store.js';

/**
 * Build a broker: load the plugins, validate the config (a path, a raw object or an already
 * validated config), create one backend per entry, open the job store and recover its jobs.
 */
export async function createBroker(config: string | RawConfig | BrokerConfig, opts: CreateBrokerOptions): Promise<Broker> {
  return (await import('./broker.js')).createBroker(config, opts);
}

/**
 * The same `Broker` interface over the control API of an `offload serve` (`unix:PATH`,
 * `http://HOST:PORT` or `https://HOST:PORT`, with a bearer token over TCP; `ca`: the CA
 * certificates in PEM to trust for https instead of the system's): jobs run in the service, and a
 * program that exits leaves them running there. `volumes.open` and `backend()` cannot cross the
 * wire (Unsupported).
 */
export async function connectBroker(address: string, opts: { token?: string; ca?: string | Buffer } = {}): Promise<Broker> {
  return (await import('./service/client.js')).connectBroker(address, opts);
}

/** Run the `offload` command line; resolves to the exit code (0 ok, 1 failed, 2 bad usage). */
export async function runCli(argv: string[], opts: RunCliOptions): Promise<number> {
  return (await import('./cli/run-cli.js')).runCli(argv, opts);
}
