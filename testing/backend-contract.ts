/**
 * The backend contract: one suite, gated by capabilities, that defines what a backend is. Every
 * backend's test file calls `describeBackendContract` with a few lines (see
 * test/contract/memory.contract.test.ts). Cases follow csi-sanity (idempotent create, typed
 * errors, pagination, dependents, data, clones) in two layers: through the broker, as users meet
 * the backend, and on the StorageBackend itself, where the broker's own checks cannot hide what
 * the backend does.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { describeBackendData } from './backend-data-cases.js';
import { describeBackendDirty } from './backend-dirty-cases.js';
import { describeBackendVolumes } from './backend-cases.js';
import { describeBrokerLayer } from './broker-cases.js';
import { ContractFixture, type ContractTarget } from './fixture.js';

export function describeBackendContract(target: ContractTarget): void {
  describe(`backend contract: ${target.name}`, () => {
    const fx = new ContractFixture(target);
    beforeAll(() => fx.start());
    afterAll(() => fx.stop());

    describeBrokerLayer(fx);
    describeBackendVolumes(fx);
    describeBackendData(fx);
    describeBackendDirty(fx);

    // A capability is proven only by a case that used it and passed. Declared last, so it runs
    // last: vitest runs a file's tests in order (unless told to shuffle them).
    it('every reported capability was exercised by a case that passed', () => {
      const unproven = fx.caps.names().filter((c) => !fx.exercised.has(c));
      expect(unproven, 'reported but not exercised by any passing case').toEqual([]);
    });
  });
}
