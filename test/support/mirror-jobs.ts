/** What the live copy's job tests share: a job manager on a store in memory, and a pair's plain deps. */
import { afterEach } from 'vitest';
import { LockManager, silentLogger, type BlockDevice } from '../../core/index.js';
import { JobManager } from '../../core/jobs/job-manager.js';
import type { LiveDevice } from '../../core/live/live-device.js';
import type { MirrorPairDeps } from '../../core/live/mirror-task.js';
import { SqliteStateStore } from '../../core/state/sqlite/sqlite-store.js';

const open: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const c of open.splice(0).reverse()) await c();
});

/** A job manager on a store in memory (or in `file`), closed after the test. */
export function jobManager(file = ':memory:'): { store: SqliteStateStore; m: JobManager } {
  const store = new SqliteStateStore(file);
  const m = new JobManager(store, new LockManager(), async () => undefined, silentLogger);
  open.push(async () => {
    await m.close();
    await store.close();
  });
  return { store, m };
}

/** A pair's deps that do nothing but serve `source` and `target` (what a test overrides aside). */
export function plainPair(source: LiveDevice, target: BlockDevice, over: Partial<MirrorPairDeps> = {}): MirrorPairDeps {
  return {
    source,
    attach: () => undefined,
    detach: () => undefined,
    openTarget: async () => target,
    identify: async () => ({}),
    prepareSwitch: async () => ({ done: async () => undefined, undo: async () => undefined }),
    removeTarget: async () => undefined,
    changesSince: async () => [],
    markPoint: async () => undefined,
    dropSnapshot: async () => undefined,
    ...over,
  };
}
