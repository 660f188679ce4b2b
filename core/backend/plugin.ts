import type { ZodType } from 'zod';
import type { StorageBackend } from './storage-backend.js';

export interface Logger {
  debug(msg: string, data?: Record<string, unknown>): void;
  info(msg: string, data?: Record<string, unknown>): void;
  warn(msg: string, data?: Record<string, unknown>): void;
  error(msg: string, data?: Record<string, unknown>): void;
}

/** What a backend gets from the broker besides its own config. */
export interface BackendEnvironment {
  /** The broker's state directory (absolute). A backend may keep files under `<stateDir>/<name>/`. */
  stateDir: string;
  /** Folder relative config paths are resolved against (the config file's folder). */
  baseDir: string;
  logger: Logger;
}

/** The fields every backend entry has; the plugin's schema describes the rest. */
export interface BackendEntry {
  name: string;
  kind: string;
}

/**
 * How a plugin makes backends of its `kind`. A plugin's ContainerModule binds one of these to
 * the `BackendFactory` token (multi-injection): the broker collects them all and builds one
 * backend per config entry whose `kind` matches.
 */
export interface BackendFactory<C extends object = Record<string, unknown>> {
  readonly kind: string;
  /** One line for `offload backends` and error messages. */
  readonly description: string;
  /** Validates a config entry (including `name` and `kind`); errors name the bad field. */
  readonly configSchema: ZodType<C & BackendEntry>;
  /** Config fields whose values are secrets: redacted in every error, log line and output. */
  readonly secretFields?: readonly string[];
  create(config: C & BackendEntry, env: BackendEnvironment): Promise<StorageBackend>;
}
export const BackendFactory = Symbol.for('offload/BackendFactory');
