import type { BackendFactory } from '../../core/index.js';
import { OntapBackend } from './backend.js';
import { OntapConfig, SECRET_FIELDS } from './config.js';

/** Makes `ontap` backends from config entries. */
export const ontapFactory: BackendFactory<OntapConfig> = {
  kind: 'ontap',
  description: 'NetApp ONTAP-style NAS appliance over REST (FlexClone, clone split offloaded as appliance jobs)',
  configSchema: OntapConfig,
  secretFields: SECRET_FIELDS,
  async create(config, env) {
    return new OntapBackend(config, env.logger);
  },
};
