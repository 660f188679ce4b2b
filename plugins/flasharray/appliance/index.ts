export { startFlashArrayMock, API_VERSIONS, type FlashArrayMock, type FlashArrayMockOptions } from './server.js';
export { FaultInjector, FaultRule, FaultAction, FaultConfig, type FaultRuleInput, type FaultConfigInput } from './faults.js';
export { CHUNK_SIZE } from './chunk-store.js';
