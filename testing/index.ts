/**
 * `offload-broker/testing`: the backend contract suite, for a plugin's own tests. Call it from a
 * vitest test file:
 *
 *   import { describeBackendContract } from 'offload-broker/testing';
 *   describeBackendContract({ name: 'mine', setup: async () => ({ plugins: [myModule], backend: { name: 'b', kind: 'mine' } }) });
 *
 * It needs vitest (a peer dependency of this entry only).
 */
export { describeBackendContract } from './backend-contract.js';
export type { ContractSetup, ContractTarget } from './fixture.js';
