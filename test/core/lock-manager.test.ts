import { describe, expect, it } from 'vitest';
import { ADMIN, LockManager, lockModesConflict, tenant, type LockMode } from '../../core/index.js';
import { validateConfig } from '../../core/config/config.js';

const alice = tenant('alice');
const bob = tenant('bob');

describe('lock conflict matrix', () => {
  const cases: [LockMode, LockMode, boolean][] = [
    ['shared', 'shared', false],
    ['shared', 'exclusive', true],
    ['exclusive', 'shared', true],
    ['exclusive', 'exclusive', true],
    ['maintenance', 'shared', true],
    ['maintenance', 'exclusive', true],
    ['shared', 'maintenance', true],
  ];
  it.each(cases)('held %s vs wanted %s → conflict %s', (held, wanted, conflict) => {
    expect(lockModesConflict(held, wanted)).toBe(conflict);
  });

  it('two shared locks coexist; an exclusive one is Busy naming the holding job', async () => {
    const m = new LockManager();
    await m.acquire([{ key: 'b/v', mode: 'shared' }], { id: 'copy-1', principal: ADMIN, description: 'copy b/v' });
    await m.acquire([{ key: 'b/v', mode: 'shared' }], { id: 'copy-2', principal: ADMIN, description: 'copy b/v' });
    await expect(m.acquire([{ key: 'b/v', mode: 'exclusive' }], { id: 'stream-3', principal: ADMIN, description: 'stream b/v' }))
      .rejects.toMatchObject({ code: 'Busy', message: expect.stringMatching(/job copy-1/) });
  });

  it('an exclusive lock refuses readers and writers; released, it frees the volume', async () => {
    const m = new LockManager();
    const lease = await m.acquire([{ key: 'b/v', mode: 'exclusive' }], { id: 'stream-1', principal: alice, description: 'stream b/v' });
    for (const mode of ['shared', 'exclusive'] as const) {
      await expect(m.acquire([{ key: 'b/v', mode }], { id: 'x', principal: bob, description: 'x' })).rejects.toMatchObject({
        code: 'Busy', data: { holder: 'stream-1' },
      });
    }
    lease.release();
    const again = await m.acquire([{ key: 'b/v', mode: 'exclusive' }], { id: 'x', principal: bob, description: 'x' });
    again.release();
    expect((await m.list())).toHaveLength(0);
  });

  it('takes all requested locks or none', async () => {
    const m = new LockManager();
    await m.acquire([{ key: 'b/two', mode: 'exclusive' }], { id: 'j1', principal: ADMIN, description: 'j1' });
    await expect(m.acquire([{ key: 'b/one', mode: 'shared' }, { key: 'b/two', mode: 'exclusive' }], { id: 'j2', principal: ADMIN, description: 'j2' }))
      .rejects.toMatchObject({ code: 'Busy' });
    expect((await m.list()).map((l) => l.key)).toEqual(['b/two']);
  });
});

describe('maintenance locks and principals', () => {
  it('only an administrator can place or break a maintenance lock', async () => {
    const m = new LockManager();
    await expect(m.placeMaintenance('b/v', alice, 'mine')).rejects.toThrow(expect.objectContaining({ code: 'PermissionDenied' }));
    await m.placeMaintenance('b/v', ADMIN, 'firmware upgrade');
    await expect(m.breakMaintenance('b/v', alice)).rejects.toThrow(expect.objectContaining({ code: 'PermissionDenied' }));
    await m.breakMaintenance('b/v', ADMIN);
    expect((await m.list())).toHaveLength(0);
  });

  it('a maintenance lock refuses tenants (Busy with the reason) and lets administrators through', async () => {
    const m = new LockManager();
    await m.placeMaintenance('b/v', ADMIN, 'firmware upgrade');
    await expect(m.acquire([{ key: 'b/v', mode: 'shared' }], { id: 't', principal: alice, description: 'read' }))
      .rejects.toMatchObject({ code: 'Busy', message: expect.stringMatching(/maintenance.*firmware upgrade/) });
    const lease = await m.acquire([{ key: 'b/v', mode: 'exclusive' }], { id: 'a', principal: ADMIN, description: 'fix' });
    lease.release();
  });

  it('a tenant cannot block an administrator: the tenant job is preempted and the admin proceeds', async () => {
    const m = new LockManager();
    let preempted = false;
    const tenantLease = await m.acquire([{ key: 'b/v', mode: 'exclusive' }], {
      id: 'stream-t', principal: alice, description: 'stream b/v',
      preempt: () => {
        preempted = true;
        setTimeout(() => tenantLease.release(), 10);
      },
    });
    const adminLease = await m.acquire([{ key: 'b/v', mode: 'exclusive' }], { id: 'delete-a', principal: ADMIN, description: 'delete b/v' });
    expect(preempted).toBe(true);
    expect((await m.list()).map((l) => l.holder.id)).toEqual(['delete-a']);
    adminLease.release();
  });

  it('an administrator is still refused by another administrator\'s job, and a tenant by another tenant\'s', async () => {
    const m = new LockManager();
    await m.acquire([{ key: 'b/a', mode: 'exclusive' }], { id: 'admin-job', principal: ADMIN, description: 'x' });
    await expect(m.acquire([{ key: 'b/a', mode: 'exclusive' }], { id: 'y', principal: ADMIN, description: 'y' })).rejects.toMatchObject({ code: 'Busy' });
    await m.acquire([{ key: 'b/t', mode: 'exclusive' }], { id: 'alice-job', principal: alice, description: 'x', preempt: () => { throw new Error('must not be preempted by a tenant'); } });
    await expect(m.acquire([{ key: 'b/t', mode: 'shared' }], { id: 'z', principal: bob, description: 'z' })).rejects.toMatchObject({ code: 'Busy' });
  });
});

describe('acquirePublished: waiting in line for another broker\'s operation', () => {
  const op = (id: string, mode: 'shared' | 'exclusive' = 'exclusive') => ({ key: 'm/v', mode, holder: { id, principal: ADMIN, description: `snapshot m/v (${id})` } });
  const none = { foreign: [], maintenance: [] };

  it('keeps its locks published while another broker\'s operation holds the volume, reads again until it is gone, then holds', async () => {
    const m = new LockManager();
    const log: string[] = [];
    const answers = [{ foreign: [op('op-b1')], maintenance: [] }, { foreign: [op('op-b2')], maintenance: [] }, none];
    const lease = await m.acquirePublished([{ key: 'm/v', mode: 'exclusive' }], { id: 'op-a', principal: ADMIN, description: 'resize m/v' }, async () => {
      log.push('publish');
      return {
        outside: answers.shift()!,
        withdraw: async () => void log.push('withdraw'),
        recheck: async () => { log.push('recheck'); return answers.shift()!; },
      };
    });
    expect(log).toEqual(['publish', 'recheck', 'recheck']); // published once, never withdrawn meanwhile
    await lease.release();
    expect(log).toEqual(['publish', 'recheck', 'recheck', 'withdraw']);
  });

  it('does not wait in line for a job (Busy at once, its locks withdrawn), nor without a recheck (withdrawn, published again)', async () => {
    const m = new LockManager();
    const log: string[] = [];
    const job = { key: 'm/v', mode: 'exclusive' as LockMode, holder: { id: 'copy-1', principal: ADMIN, description: 'copy m/v' } };
    await expect(m.acquirePublished([{ key: 'm/v', mode: 'shared' }], { id: 'op-a', principal: ADMIN, description: 'snapshot m/v' }, async () => {
      log.push('publish');
      return { outside: { foreign: [op('op-b1'), job], maintenance: [] }, withdraw: async () => void log.push('withdraw'), recheck: async () => none };
    })).rejects.toMatchObject({ code: 'Busy' });
    expect(log).toEqual(['publish', 'withdraw']);
    log.length = 0;
    const answers = [{ foreign: [op('op-b1')], maintenance: [] }, none];
    const lease = await m.acquirePublished([{ key: 'm/v', mode: 'exclusive' }], { id: 'op-a', principal: ADMIN, description: 'resize m/v' }, async () => {
      log.push('publish');
      return { outside: answers.shift()!, withdraw: async () => void log.push('withdraw') };
    });
    expect(log).toEqual(['publish', 'withdraw', 'publish']);
    await lease.release();
  });

  it('gives up in line when the wait runs out: its locks are withdrawn, this broker\'s lock released', async () => {
    const m = new LockManager();
    const log: string[] = [];
    await expect(m.acquirePublished([{ key: 'm/v', mode: 'exclusive' }], { id: 'op-a', principal: ADMIN, description: 'resize m/v' }, async () => ({
      outside: { foreign: [op('op-b1')], maintenance: [] },
      withdraw: async () => void log.push('withdraw'),
      recheck: async () => { log.push('recheck'); return { foreign: [op('op-b1')], maintenance: [] }; },
    }), 30)).rejects.toMatchObject({ code: 'Busy', message: expect.stringMatching(/did not end in time/) });
    expect(log.at(-1)).toBe('withdraw');
    expect(log.filter((l) => l === 'withdraw')).toHaveLength(1);
    await m.acquire([{ key: 'm/v', mode: 'exclusive' }], { id: 'job-x', principal: ADMIN, description: 'x' }); // nothing left held here
  });
});

describe('how long a request waits in line (the config\'s lockWaitSeconds)', () => {
  it('a manager made with a wait refuses Busy once it has passed (an operation waiting in line behind another broker\'s)', async () => {
    const op = (id: string) => ({ key: 'm/v', mode: 'exclusive' as LockMode, holder: { id, principal: ADMIN, description: `snapshot m/v (${id})` } });
    const m = new LockManager(undefined, 40);
    let rechecks = 0;
    const stuck = async () => ({
      outside: { foreign: [op('op-b1')], maintenance: [] },
      withdraw: async () => undefined,
      recheck: async () => { rechecks++; return { foreign: [op('op-b1')], maintenance: [] }; },
    });
    await expect(m.acquirePublished([{ key: 'm/v', mode: 'exclusive' }], { id: 'op-a', principal: ADMIN, description: 'resize m/v' }, stuck))
      .rejects.toMatchObject({ code: 'Busy', message: expect.stringMatching(/did not end in time/) });
    expect(rechecks).toBeGreaterThan(0); // it waited in line before it gave up
    // No wait at all: refused at the first look.
    rechecks = 0;
    await expect(new LockManager(undefined, 0).acquirePublished([{ key: 'm/v', mode: 'exclusive' }], { id: 'op-c', principal: ADMIN, description: 'resize m/v' }, stuck))
      .rejects.toMatchObject({ code: 'Busy' });
  });

  it('lockWaitSeconds in the config: 0–3600 seconds, or a clear error', () => {
    expect(validateConfig({ lockWaitSeconds: 5, backends: [] }, []).lockWaitSeconds).toBe(5);
    expect(validateConfig({ lockWaitSeconds: 0, backends: [] }, []).lockWaitSeconds).toBe(0);
    expect(() => validateConfig({ lockWaitSeconds: -1, backends: [] }, [])).toThrow(/^lockWaitSeconds/);
    expect(() => validateConfig({ lockWaitSeconds: '30' as never, backends: [] }, [])).toThrow(/^lockWaitSeconds/);
  });
});

describe('acquirePublished: in line, held here too', () => {
  it('a job of this broker asked for after an operation waiting in line waits behind it', async () => {
    const m = new LockManager();
    let clear = false;
    const foreign = { key: 'm/v', mode: 'exclusive' as LockMode, holder: { id: 'op-b1', principal: ADMIN, description: 'snapshot m/v (other host)' } };
    const waiting = m.acquirePublished([{ key: 'm/v', mode: 'shared' }], { id: 'op-alice', principal: alice, description: 'snapshot m/v' }, async () => ({
      outside: { foreign: [foreign], maintenance: [] },
      withdraw: async () => undefined,
      recheck: async () => ({ foreign: clear ? [] : [foreign], maintenance: [] }),
    }));
    await new Promise((r) => setTimeout(r, 20));
    let jobHeld = false;
    const job = m.acquire([{ key: 'm/v', mode: 'exclusive' }], { id: 'backup-1', principal: alice, description: 'backup of m/v' }).then((l) => { jobHeld = true; return l; });
    await new Promise((r) => setTimeout(r, 20));
    expect(jobHeld).toBe(false);
    clear = true;
    const op = await waiting; // its turn came first
    expect(jobHeld).toBe(false);
    await op.release();
    (await job).release();
  });

  it('an administrator\'s job here is not held up by a tenant\'s operation waiting in line; the operation then meets it', async () => {
    const m = new LockManager();
    const log: string[] = [];
    let clear = false;
    const foreign = { key: 'm/v', mode: 'exclusive' as LockMode, holder: { id: 'op-b1', principal: ADMIN, description: 'snapshot m/v (other host)' } };
    const waiting = m.acquirePublished([{ key: 'm/v', mode: 'exclusive' }], { id: 'op-alice', principal: alice, description: 'resize m/v' }, async () => ({
      outside: { foreign: [foreign], maintenance: [] },
      withdraw: async () => void log.push('withdraw'),
      recheck: async () => ({ foreign: clear ? [] : [foreign], maintenance: [] }),
    }));
    await new Promise((r) => setTimeout(r, 20));
    const job = await m.acquire([{ key: 'm/v', mode: 'exclusive' }], { id: 'copy-1', principal: ADMIN, description: 'copy into m/v' });
    clear = true; // the other host's operation ends: alice's comes out of line and meets the job here
    await expect(waiting).rejects.toMatchObject({ code: 'Busy', message: expect.stringContaining('copy-1') });
    expect(log).toEqual(['withdraw']);
    job.release();
  });
});
