/** The flasharray plugin's public surface (for tests, examples and bin/offload). */
export { flasharrayModule } from './module.js';
export { flasharrayFactory } from './factory.js';
export { FlashArrayBackend } from './backend.js';
export { FlashArrayClient } from './client.js';
export { FlashArrayConfig, type FlashArrayConfigInput } from './config.js';
export { startFlashArrayMock, type FlashArrayMock, type FlashArrayMockOptions } from './appliance/index.js';
