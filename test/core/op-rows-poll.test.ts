/**
 * OpRows' listening operations (exports): what other processes ask of them — a stop, a call — is
 * taken for all of a process's exports in one step of the store every 250 ms, not one poll per
 * export; nothing is polled once none listens.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it, vi } from 'vitest';
import { OpRows } from '../../core/jobs/op-rows.js';
import { ADMIN } from '../../core/locks/principal.js';
import { SqliteStateStore } from '../../core/state/sqlite/sqlite-store.js';
import { until } from '../service/service-helpers.js';

const dir = mkdtempSync(join(tmpdir(), 'offload-op-rows-'));
const store = new SqliteStateStore(join(dir, 'jobs.sqlite'));
afterAll(async () => {
  await store.close();
  rmSync(dir, { recursive: true, force: true });
});

describe('listening operations', () => {
  it('two exports of one process: one step of the store for both; a stop and a call each reach theirs; no polling after', async () => {
    const rows = new OpRows(store, 'token-1', 'host-1', 60_000, () => []);
    const stopped: string[] = [];
    const calls: string[] = [];
    const claim = (id: string) => rows.claim(id, [{ key: `pool/${id}`, mode: 'exclusive' }], ADMIN, `export ${id}`, () => stopped.push(id), false,
      async (call) => {
        calls.push(`${id}:${call}`);
        return '{"ok":true,"value":null}';
      });
    const one = await claim('export:one#1');
    const two = await claim('export:two#1');
    const polls = vi.spyOn(store, 'takeOpRequests');
    await store.requestOpStop('export:one#1');
    expect(await store.requestOpCall('call-1', 'export:two#1', '{"kind":"snapshot"}')).toBe(true);
    await until('the stop and the call taken', async () => stopped.length === 1 && (await store.takeOpCallAnswer('call-1')) !== undefined);
    expect(stopped).toEqual(['export:one#1']);
    expect(calls).toEqual(['export:two#1:{"kind":"snapshot"}']);
    expect(polls.mock.calls.length).toBeGreaterThan(0);
    for (const [ids] of polls.mock.calls) expect([...ids].sort()).toEqual(['export:one#1', 'export:two#1']);
    await one.withdraw();
    polls.mockClear();
    await until('polled for the other alone', async () => polls.mock.calls.length > 0);
    expect(polls.mock.calls.every(([ids]) => ids.length === 1 && ids[0] === 'export:two#1')).toBe(true);
    await two.withdraw();
    await new Promise((r) => setTimeout(r, 300)); // a poll in flight ends
    polls.mockClear();
    await new Promise((r) => setTimeout(r, 600));
    expect(polls).not.toHaveBeenCalled();
    await rows.close();
  });
});
