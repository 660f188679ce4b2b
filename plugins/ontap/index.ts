/** The ontap plugin's public surface: the module, and the mock appliance for tests and examples. */
export { ontapModule } from './module.js';
export { ontapFactory } from './factory.js';
export { OntapBackend } from './backend.js';
export { OntapConfig } from './config.js';
export { startOntapMock, MOCK_DEFAULTS, type OntapMock, type OntapMockOptions } from './appliance/server.js';
export type { FaultRuleInput, FaultAction } from './appliance/faults.js';
