/**
 * Calls through the state store to the process serving an export (core/broker/op-calls.ts): the
 * asker gets the holder's result, or its error as the same typed error; GONE when the export ends
 * first; Timeout after lockWaitSeconds with its call withdrawn (never carried out later). The
 * holder's side answers only snapshots of the volume it serves.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { answerCall, callExportHolder, GONE, type OpCall, type OpCallHandlers } from '../../core/broker/op-calls.js';
import type { BrokerState } from '../../core/broker/state.js';
import { Busy } from '../../core/model/errors.js';
import type { Snapshot } from '../../core/model/types.js';
import { SqliteStateStore } from '../../core/state/sqlite/sqlite-store.js';

const dir = mkdtempSync(join(tmpdir(), 'offload-op-calls-'));
const asker = new SqliteStateStore(join(dir, 'state.sqlite'));
const holder = new SqliteStateStore(join(dir, 'state.sqlite'));
afterAll(async () => {
  await Promise.all([asker.close(), holder.close()]);
  rmSync(dir, { recursive: true, force: true });
});

/** What callExportHolder uses of a broker's state: its store and its lock wait. */
const state = (lockWaitMs: number) => ({ store: asker, lockWaitMs }) as unknown as BrokerState;
const call: OpCall = { kind: 'snapshot', ref: 'pool/vm1@s1', principal: { id: 'alice', role: 'tenant' } };
const snap: Snapshot = { backend: 'pool', volume: 'vm1', name: 's1', sizeBytes: 1 << 20, createdAt: '2026-12-06T00:00:00.000Z' };
let n = 0;

/** The calls made to the export op `id`, taken (as op-rows' poller takes them). */
const takeCalls = async (id: string) => (await holder.takeOpRequests([id])).calls;

/** The same handler for every kind of call. */
const both = (f: () => Promise<unknown>): OpCallHandlers => ({ snapshot: f, 'snapshot.delete': f, 'snapshot.group': f, 'copy.live': f });

/** An export's op row, and a holder that answers its calls with `respond` (as op-rows' poller does). */
async function exportOp(respond?: (text: string) => Promise<string>): Promise<{ id: string; stop: () => void }> {
  const id = `export:vm1#${++n}`;
  await holder.insertOpLocks({ id, locks: [{ key: 'pool/vm1', mode: 'exclusive' }], principal: 'admin', role: 'admin', description: 'nbd export', runnerPid: 1, runnerToken: 't', runnerHost: 'h', leaseExpires: Date.now() + 60_000 });
  const timer = respond && setInterval(() => {
    void takeCalls(id).then((calls) => calls.forEach((c) => void respond(c.call).then((a) => holder.answerOpCall(c.id, a))));
  }, 20);
  return { id, stop: () => clearInterval(timer) };
}

describe('calls to the process serving an export', () => {
  it('the holder makes the snapshot as the asking principal, and the asker gets it', async () => {
    const asked: string[] = [];
    const op = await exportOp((text) => answerCall('pool/vm1', text, {
      snapshot: async (p, c) => {
        asked.push(`snapshot ${p.role}:${p.id}:${c.ref}`);
        return snap;
      },
      'snapshot.delete': async (p, c) => {
        asked.push(`delete ${p.role}:${p.id}:${c.ref}`);
      },
      'snapshot.group': async (p, c) => {
        asked.push(`group ${p.role}:${p.id}:${c.refs!.join(',')}`);
        return [snap];
      },
      'copy.live': async (p, c) => {
        asked.push(`live ${p.role}:${p.id}:${c.pairs!.map((x) => `${x.source}=${x.target}`).join(',')}:${c.options?.mode}`);
        return { job: 'mirror-1' };
      },
    }));
    try {
      expect(await callExportHolder(state(5000), op.id, call, 'snapshot pool/vm1@s1')).toEqual(snap);
      expect(await callExportHolder(state(5000), op.id, { ...call, kind: 'snapshot.delete' }, 'delete pool/vm1@s1')).toBeNull();
      expect(await callExportHolder(state(5000), op.id, { ...call, kind: 'snapshot.group', refs: ['pool/vm1@s1', 'pool/vm2@s1'] }, 'group')).toEqual([snap]);
      // A group that does not hold the export's snapshot, or is not a list of references, is refused there.
      for (const refs of [['pool/vm2@s1'], 'pool/vm1@s1', [7]]) {
        await expect(callExportHolder(state(5000), op.id, { ...call, kind: 'snapshot.group', refs } as unknown as OpCall, 'group')).rejects.toMatchObject({ code: 'InvalidArgument' });
      }
      const live = { ...call, kind: 'copy.live' as const, ref: 'pool/vm1', pairs: [{ source: 'pool/vm1', target: 'san/vm1' }], options: { mode: 'write-blocking' } };
      expect(await callExportHolder(state(5000), op.id, live, 'live')).toEqual({ job: 'mirror-1' });
      // Pairs that do not copy the export's volume, or are not pairs, are refused there.
      for (const pairs of [[{ source: 'pool/vm2', target: 'san/vm2' }], [{ source: 'pool/vm1' }], 'pool/vm1=san/vm1']) {
        await expect(callExportHolder(state(5000), op.id, { ...live, pairs } as unknown as OpCall, 'live')).rejects.toMatchObject({ code: 'InvalidArgument' });
      }
      expect(asked).toEqual(['snapshot tenant:alice:pool/vm1@s1', 'delete tenant:alice:pool/vm1@s1', 'group tenant:alice:pool/vm1@s1,pool/vm2@s1',
        'live tenant:alice:pool/vm1=san/vm1:write-blocking']);
    } finally {
      op.stop();
    }
  });

  it('its error comes back typed, with its hint; a call for another volume, or of a kind not known, is refused there', async () => {
    const op = await exportOp((text) => answerCall('pool/vm1', text, both(async () => {
      throw new Busy('pool/vm1 is busy', { hint: 'wait', ref: 'pool/vm1', data: { holder: 'job-7' } });
    })));
    try {
      await expect(callExportHolder(state(5000), op.id, call, 'snapshot')).rejects.toMatchObject({
        code: 'Busy', message: 'pool/vm1 is busy', hint: 'wait', ref: 'pool/vm1', data: { holder: 'job-7' },
      });
      await expect(callExportHolder(state(5000), op.id, { ...call, ref: 'pool/vm2@s1' }, 'snapshot')).rejects.toMatchObject({ code: 'InvalidArgument', message: expect.stringMatching(/is not pool\/vm1, which this export serves, nor a snapshot of it/) });
      for (const kind of ['delete', 'toString', 'constructor']) {
        await expect(callExportHolder(state(5000), op.id, { ...call, kind } as unknown as OpCall, 'snapshot')).rejects.toMatchObject({ code: 'InvalidArgument' });
      }
    } finally {
      op.stop();
    }
  });

  it('a call taken after its asker stopped waiting is not made', async () => {
    let made = 0;
    const answer = JSON.parse(await answerCall('pool/vm1', JSON.stringify({ ...call, deadline: Date.now() - 1 }), both(async () => {
      made++;
      return snap;
    }))) as { ok: boolean; error?: { code: string } };
    expect(answer).toMatchObject({ ok: false, error: { code: 'Timeout' } });
    expect(made).toBe(0);
  });

  it('the export ends before it takes the call, or had ended already: GONE (the asker may take the snapshot itself)', async () => {
    const op = await exportOp();
    setTimeout(() => void holder.deleteOpLocks(op.id), 200);
    expect(await callExportHolder(state(5000), op.id, call, 'snapshot')).toBe(GONE);
    // Asked after it ended: no call is recorded (a waiting asker would end in Timeout, not GONE).
    expect(await callExportHolder(state(5000), op.id, call, 'snapshot')).toBe(GONE);
  });

  it('the export ends while it makes the call: the answer still comes', async () => {
    const op = await exportOp();
    const asked = callExportHolder(state(5000), op.id, call, 'snapshot');
    await new Promise((r) => setTimeout(r, 100));
    const [taken] = await takeCalls(op.id);
    await holder.deleteOpLocks(op.id);
    await holder.answerOpCall(taken!.id, await answerCall('pool/vm1', taken!.call, both(async () => snap)));
    expect(await asked).toEqual(snap);
  });

  it('no answer within lockWaitSeconds: Timeout, and the call withdrawn, so that a holder that wakes up does not carry it out', async () => {
    const op = await exportOp();
    await expect(callExportHolder(state(300), op.id, call, 'snapshot pool/vm1@s1')).rejects.toMatchObject({
      code: 'Timeout', message: expect.stringMatching(/snapshot pool\/vm1@s1: the process serving its export .* did not answer within 0.3 s$/),
    });
    expect(await takeCalls(op.id)).toEqual([]);
    // Taken but not answered in time: the message says it may still be carried out.
    const late = callExportHolder(state(300), op.id, call, 'snapshot');
    await new Promise((r) => setTimeout(r, 100));
    expect(await takeCalls(op.id)).toHaveLength(1);
    await expect(late).rejects.toMatchObject({ code: 'Timeout', message: expect.stringMatching(/it had taken the request, which may still be carried out/) });
    await holder.deleteOpLocks(op.id);
  });
});
