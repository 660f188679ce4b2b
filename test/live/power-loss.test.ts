/**
 * A live copy across a power loss (core/live/README.md, "A live copy across a crash"): at any
 * instant, every region the saved write-intent record does not name must hold the same data on
 * the source and the target *as a power loss would leave them* — what their flushes made durable,
 * not what their caches show. Devices with a volatile cache (test/support/volatile-device.ts), a
 * guest writing without ever flushing, the record and both devices taken together many times a
 * second.
 */
import { describe, expect, it } from 'vitest';
import { ADMIN, LockManager, silentLogger } from '../../core/index.js';
import { JobManager } from '../../core/jobs/job-manager.js';
import { LiveDevice } from '../../core/live/live-device.js';
import { dropWriteIntent, mirrorTask, type MirrorState } from '../../core/live/mirror-task.js';
import { intentRanges, type IntentRecord } from '../../core/live/write-intent.js';
import type { JobRecord } from '../../core/state/records.js';
import { SqliteStateStore } from '../../core/state/sqlite/sqlite-store.js';
import { plainPair } from '../support/mirror-jobs.js';
import { volatileDevice } from '../support/volatile-device.js';

const MiB = 1024 * 1024;
const SIZE = 8 * MiB;

describe('a live copy across a power loss', () => {
  it.each([
    { mode: 'background', before: 'flushed' },
    { mode: 'write-blocking', before: 'flushed' },
    { mode: 'background', before: 'not flushed' },
  ] as const)('$mode, the source\'s data from before the copy $before: no region leaves the record before both sides hold it durably (the source flushed first)', async ({ mode, before }) => {
    const store = new SqliteStateStore(':memory:');
    // The record as saved: set once a job write has committed (before anything waiting for it goes on).
    let saved: IntentRecord | undefined;
    const watched = new Proxy(store, {
      get(target, prop, receiver) {
        if (prop === 'updateJob') {
          return async (job: JobRecord) => {
            const ok = await target.updateJob(job);
            if (ok) saved = (job.checkpoint as MirrorState | undefined)?.intent?.[0];
            return ok;
          };
        }
        const v = Reflect.get(target, prop, receiver) as unknown;
        return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(target) : v;
      },
    });
    const m = new JobManager(watched, new LockManager(), async () => undefined, silentLogger, { checkpointEveryMs: 0 });
    const src = volatileDevice(SIZE);
    for (let r = 0; r < 8; r++) await src.write(r * MiB, new Uint8Array(MiB).fill(r + 1));
    // Not flushed: as writes a guest made before the copy began, or a dead runner let land, sit in the cache.
    if (before === 'flushed') await src.flush();
    const dst = volatileDevice(SIZE);
    const live = new LiveDevice(src);
    const task = mirrorTask({ mode, pairs: [{ source: 'pool/src', target: 'pool/dst' }] }, {
      pairs: [plainPair(live, dst)], failClosed: () => undefined, dropIntent: (id) => dropWriteIntent(store, id), trimEveryMs: { ready: 10, bulk: 10 },
    });
    const job = await m.start({ task, ref: 'pool/src', executor: 'host', principal: ADMIN, locks: [{ key: 'pool/dst', mode: 'exclusive' }] });
    const violations: string[] = [];
    const written = new Set<number>();
    let leftAfterWrite = 0;
    let samples = 0;
    /** A power loss now: the record as saved, both devices as durable. */
    const check = () => {
      if (!saved) return;
      samples++;
      const s = src.powerLoss();
      const d = dst.powerLoss();
      const named = intentRanges(saved);
      for (let r = 0; r < 8; r++) {
        if (named.some((x) => x.offset <= r * MiB && r * MiB < x.offset + x.length)) continue;
        if (written.has(r)) leftAfterWrite++;
        if (Buffer.compare(s.subarray(r * MiB, (r + 1) * MiB), d.subarray(r * MiB, (r + 1) * MiB)) !== 0) violations.push(`region ${r}, sample ${samples}`);
      }
    };
    const sampler = setInterval(check, 2);
    try {
      // The guest: 4 KiB writes into random regions, never a flush, in bursts with pauses long
      // enough for the regions it left to leave the record.
      let seq = 0;
      for (let burst = 0; burst < 6; burst++) {
        for (let i = 0; i < 12; i++) {
          // With the source's earlier data not flushed, the guest keeps to region 0: the others are left with only that data to lose.
          const r = before === 'flushed' ? (burst * 3 + i) % 8 : 0;
          written.add(r);
          await live.write(r * MiB + ((seq * 4096) % MiB), new Uint8Array(4096).fill(100 + (seq++ % 100)));
          await new Promise((res) => setTimeout(res, 2));
        }
        await new Promise((res) => setTimeout(res, 150));
      }
    } finally {
      clearInterval(sampler);
      await job.cancel();
      await job.wait();
      await m.close();
      await store.close();
    }
    expect(violations.slice(0, 5)).toEqual([]);
    expect(samples).toBeGreaterThan(100);
    expect(leftAfterWrite).toBeGreaterThan(0); // regions the guest wrote did leave the record
  });
});
