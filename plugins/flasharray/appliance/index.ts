export { startFlashArrayMock, API_VERSIONS, type FlashArrayMock, type FlashArrayMockOptions } from './server.js';
export { faultGrammar, type FaultAction, type FaultRuleInput, type FaultConfigInput } from './faults.js';
export { CHUNK_SIZE } from './array-model.js';
