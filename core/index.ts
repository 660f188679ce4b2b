/**
 * The public API of Offload Broker. Plugins and applications import core only through this file.
 */
import 'reflect-metadata';

export * from './model/errors.js';
export * from './model/refs.js';
export * from './model/capabilities.js';
export type * from './model/types.js';
export * from './backend/block-device.js';
export type * from './backend/storage-backend.js';
export * from './backend/plugin.js';
export type * from './jobs/job-task.js';
export type * from './jobs/job.js';
export * from './locks/principal.js';
export * from './locks/lock-manager.js';
export type * from './planner/plan.js';
export * from './cli/contribution.js';
export type * from './broker-api.js';
export * from './jobs/job-states.js';
export { RateLimiter } from './jobs/rate-limiter.js';
export { createBroker, type CreateBrokerOptions } from './broker.js';
export { loadConfig, validateConfig, readConfigFile, substituteEnv, type BrokerConfig, type RawConfig } from './config/config.js';
export { ConfigError, isConfigError } from './config/config-error.js';
export { secrets, REDACTED } from './config/secrets.js';
export { createLogger, silentLogger } from './logger.js';
export { hostCopyTask, COPY_CHUNK, type HostCopyParams } from './planner/host-copy.js';
export { runCli, type RunCliOptions } from './cli/run-cli.js';
export { parseSize, formatSize } from './cli/sizes.js';
export { JobManager, type StartJobRequest, type TaskResolver } from './jobs/job-manager.js';
export { JobStore, type JobRecord } from './jobs/job-store.js';
