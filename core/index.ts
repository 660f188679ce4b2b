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
