/**
 * A runner of this machine is known gone when its process is (core/jobs/runner-lock.ts): the lock
 * it holds on a file in the state folder goes with the process — a kill -9, and (where this
 * machine lets a test make one) a process in another pid namespace, where a pid tells nothing.
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ADMIN, LockManager, silentLogger } from '../../core/index.js';
import { JobManager } from '../../core/jobs/job-manager.js';
import { RunnerLocks } from '../../core/jobs/runner-lock.js';
import { SqliteStateStore } from '../../core/state/sqlite/sqlite-store.js';
import { tsChild } from '../support/ts-child.js';

const dir = mkdtempSync(join(tmpdir(), 'offload-runners-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** A process holding `token`'s lock (in a new pid namespace with `unshare`); resolves once it holds it. */
function holder(token: string, unshare = false): Promise<{ kill: () => Promise<void> }> {
  const args = [...tsChild('test/core/runner-lock-child.ts'), dir, token];
  // Its own process group: a kill takes `unshare` and the process it forked together.
  const child = unshare ? spawn('unshare', ['--pid', '--fork', process.execPath, ...args], { stdio: ['ignore', 'pipe', 'inherit'], detached: true })
    : spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'inherit'], detached: true });
  return new Promise((resolve, reject) => {
    child.stdout!.once('data', () => resolve({
      kill: async () => {
        process.kill(-child.pid!, 'SIGKILL');
        // Until every process of the group is gone (the one in the new namespace exits on its own time).
        const left = () => {
          try {
            process.kill(-child.pid!, 0);
            return true;
          } catch {
            return false;
          }
        };
        while (left()) await new Promise((r) => setTimeout(r, 10));
      },
    }));
    child.once('exit', (c) => reject(new Error(`the holder exited (${c})`)));
  });
}

const canUnshare = spawnSync('unshare', ['--pid', '--fork', 'true']).status === 0;

describe('runner locks', () => {
  it('held while its process lives; gone once it is killed; a token with no file here is not judged', async () => {
    const locks = new RunnerLocks(dir);
    const h = await holder('a1');
    expect(locks.isHere('a1')).toBe(true);
    expect(locks.gone('a1')).toBe(false);
    await h.kill();
    expect(locks.gone('a1')).toBe(true);
    expect(locks.gone('b2')).toBe(false); // never ran here
    expect(locks.isHere('b2')).toBe(false);
    expect(locks.gone('released')).toBe(false);
    // Its file stays while a record names it; then a sweep removes it (not a live one's).
    const live = await holder('c3');
    locks.sweep((t) => t === 'a1');
    expect(locks.isHere('a1')).toBe(true);
    locks.sweep(() => false);
    expect(locks.isHere('a1')).toBe(false);
    expect(locks.isHere('c3')).toBe(true);
    await live.kill();
  });

  it('a lock that cannot be held (its folder cannot be made) leaves no file behind and fails the hold; a job manager then runs on, warning, judged by pid and lease', async () => {
    const blocked = join(dir, 'not-a-folder');
    writeFileSync(blocked, 'a file where the runners folder would be');
    const locks = new RunnerLocks(blocked);
    expect(() => locks.hold('f8')).toThrow();
    expect(locks.isHere('f8')).toBe(false);
    expect(locks.gone('f8')).toBe(false); // no file: never judged gone here
    const warnings: string[] = [];
    const logger = { ...silentLogger, warn: (m: string) => void warnings.push(m) };
    const store = new SqliteStateStore(':memory:');
    const m = new JobManager(store, new LockManager(), async () => undefined, logger, { runnerLockDir: blocked });
    try {
      const job = await m.start({ task: { type: 'noop', params: {}, run: async (ctx) => { await ctx.checkpoint(1, { at: 1 }); } }, ref: 'b/v', executor: 'host', principal: ADMIN, locks: [] });
      expect((await job.wait()).status).toBe('concluded');
      expect((await job.wait()).error).toBeUndefined();
      expect(warnings.some((w) => /the runner lock cannot be held/.test(w))).toBe(true);
    } finally {
      await m.close();
      await store.close();
    }
  });

  it.skipIf(!canUnshare)('in another pid namespace (a container restarted) as well', async () => {
    const locks = new RunnerLocks(dir);
    const h = await holder('d4', true);
    expect(locks.gone('d4')).toBe(false);
    await h.kill();
    expect(locks.gone('d4')).toBe(true);
  });

  it('a runner of this process: held, and its file removed when it lets go', () => {
    const locks = new RunnerLocks(dir);
    locks.hold('e5');
    locks.hold('e5'); // once
    expect(new RunnerLocks(dir).gone('e5')).toBe(false);
    locks.release('e5');
    expect(existsSync(join(dir, 'e5.lock'))).toBe(false);
  });

  it('the hosts its runners were recorded under stay noted after a clean release (a released job is still this machine\'s), until no record names them', () => {
    const locks = new RunnerLocks(dir);
    locks.hold('e6', 'box (boot b1, pid ns 1)');
    locks.release('e6');
    const later = new RunnerLocks(dir);
    expect(later.ranAs('box (boot b1, pid ns 1)')).toBe(true);
    expect(later.ranAs('elsewhere (boot b1, pid ns 1)')).toBe(false);
    later.sweep(() => false, (host) => host === 'box (boot b1, pid ns 1)');
    expect(later.ranAs('box (boot b1, pid ns 1)')).toBe(true);
    later.sweep(() => false, () => false);
    expect(later.ranAs('box (boot b1, pid ns 1)')).toBe(false);
    // Swept by another broker while its runner held no record, noted again when it lets go (its released jobs name it).
    const held = new RunnerLocks(dir);
    held.hold('e7', 'box (boot b2, pid ns 1)');
    new RunnerLocks(dir).sweep(() => true, () => false);
    expect(held.ranAs('box (boot b2, pid ns 1)')).toBe(false);
    held.release('e7', 'box (boot b2, pid ns 1)');
    expect(new RunnerLocks(dir).ranAs('box (boot b2, pid ns 1)')).toBe(true);
  });
});
