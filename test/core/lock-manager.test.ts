import { describe, expect, it } from 'vitest';
import { ADMIN, LockManager, lockModesConflict, tenant, type LockMode } from '../../core/index.js';

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
