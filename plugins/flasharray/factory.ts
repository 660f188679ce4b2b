import type { BackendEnvironment, BackendFactory, StorageBackend } from '../../core/index.js';
import { FlashArrayBackend } from './backend.js';
import { FlashArrayClient } from './client.js';
import { FlashArrayConfig, SECRET_FIELDS } from './config.js';

/** Builds `flasharray` backends from config entries. Connecting is lazy: the first call logs in. */
export const flasharrayFactory: BackendFactory<FlashArrayConfig> = {
  kind: 'flasharray',
  description: 'SAN block array with a FlashArray-style REST 2.x API: snapshots, copies and reverts run on the array',
  configSchema: FlashArrayConfig,
  secretFields: SECRET_FIELDS,
  async create(config: FlashArrayConfig, env: BackendEnvironment): Promise<StorageBackend> {
    const client = new FlashArrayClient({
      label: config.name, endpoint: config.endpoint, apiToken: config.apiToken, apiVersion: config.apiVersion,
      timeoutMs: config.timeoutMs, retry: config.retry, logger: env.logger,
    });
    return new FlashArrayBackend(config.name, client);
  },
};
