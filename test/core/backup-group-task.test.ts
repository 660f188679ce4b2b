/**
 * The group backup job (core/copy/backup-task.ts with core/jobs/part-contexts.ts) on in-memory
 * devices: its disks are copied at once; resumed, it does not copy again a disk it had copied and
 * goes on in the other from its offset; a failure in one disk stops the others and undoes every
 * disk (and a run resumed while undoing finishes the undo); the job's progress counts every disk.
 */
import { describe, expect, it } from 'vitest';
import { JobRun, LeaseLost, type BlockDevice } from '../../core/index.js';
import { backupTask, type BackupDeps, type BackupParams } from '../../core/copy/backup-task.js';
import { memoryDevice, type MemoryDevice } from '../support/memory-device.js';

const MiB = 1024 * 1024;
const SIZE = 4 * MiB;

function setup() {
  const devices = new Map<string, MemoryDevice>();
  for (const ref of ['m/a@bk-1', 'm/b@bk-1']) {
    const d = memoryDevice(SIZE);
    devices.set(ref, d);
  }
  const opened: string[] = [];
  const reads: { ref: string; offset: number }[] = [];
  const calls: string[] = [];
  const deps: BackupDeps = {
    open: async (ref) => {
      opened.push(ref);
      const d = devices.get(ref);
      if (!d) throw new Error(`no device ${ref}`);
      const view: BlockDevice = {
        sizeBytes: d.sizeBytes,
        read: (offset, length) => {
          reads.push({ ref, offset });
          return d.read(offset, length);
        },
        write: (o, data) => d.write(o, data),
        extents: (o, l) => d.extents(o, l),
        flush: () => d.flush(),
        close: async () => undefined,
      };
      return view;
    },
    changes: async () => [],
    size: async (ref) => devices.get(ref)?.sizeBytes,
    create: async (ref, size) => {
      calls.push(`create ${ref}`);
      devices.set(ref, memoryDevice(size));
    },
    resize: async () => undefined,
    snapshot: async (ref) => void calls.push(`snapshot ${ref}`),
    deleteSnapshot: async (ref) => void calls.push(`deleteSnapshot ${ref}`),
    revert: async (ref) => void calls.push(`revert ${ref}`),
    remove: async (ref) => {
      calls.push(`remove ${ref}`);
      devices.delete(ref);
    },
  };
  return { devices, opened, reads, calls, deps };
}

const pair = (v: string): BackupParams => ({ source: `m/${v}`, target: `m/${v}-set`, point: 1, marker: 'bk-1', sizeBytes: SIZE, owner: 'admin' });

async function fillSources(devices: Map<string, MemoryDevice>): Promise<void> {
  await devices.get('m/a@bk-1')!.write(0, Buffer.alloc(SIZE, 1));
  await devices.get('m/b@bk-1')!.write(0, Buffer.alloc(SIZE, 2));
}

describe('a group backup job', () => {
  it('resumed in its second disk: the first is not read again, the second goes on from its offset; both points taken; progress counts both', async () => {
    const { devices, opened, reads, calls, deps } = setup();
    await fillSources(devices);
    // As a run stopped in the second disk saved it: the first copied, the second created and 2 MiB along.
    devices.set('m/a-set', memoryDevice(SIZE));
    await devices.get('m/a-set')!.write(0, Buffer.alloc(SIZE, 1));
    devices.set('m/b-set', memoryDevice(SIZE));
    await devices.get('m/b-set')!.write(0, Buffer.alloc(2 * MiB, 2));
    const resumeFrom = {
      parts: [{ phase: 'point', created: true }, { phase: 'copy', created: true, reverted: true, offset: 2 * MiB }],
      done: [SIZE, 2 * MiB], totals: [SIZE, SIZE],
    };
    const run = new JobRun({ jobId: 'g', resumeFrom });
    await backupTask({ pairs: [pair('a'), pair('b')] }, deps).run(run);
    expect(opened.filter((r) => r.startsWith('m/a'))).toEqual([]);
    expect(reads.filter((r) => r.ref === 'm/b@bk-1').every((r) => r.offset >= 2 * MiB)).toBe(true);
    expect(reads.length).toBeGreaterThan(0);
    expect(Buffer.from(await devices.get('m/b-set')!.read(0, SIZE)).equals(Buffer.alloc(SIZE, 2))).toBe(true);
    expect(calls.filter((c) => c.startsWith('snapshot'))).toEqual(['snapshot m/a-set@b1', 'snapshot m/b-set@b1']);
    expect(run.progress).toMatchObject({ current: 2 * SIZE, total: 2 * SIZE });
  });

  it('resumed with a saved count ahead of its offset (chunks done out of order), the progress never passes the total', async () => {
    const { devices, deps } = setup();
    await fillSources(devices);
    devices.set('m/a-set', memoryDevice(SIZE));
    devices.set('m/b-set', memoryDevice(SIZE));
    // Counts past the parts' totals, as a run that counted chunks done beyond its saved offset left them.
    const seen: { current: number; total: number }[] = [];
    const run = new JobRun({
      jobId: 'g', resumeFrom: { parts: [{ phase: 'point', created: true }, { phase: 'copy', created: true, offset: 0 }], done: [SIZE + MiB, SIZE - 1], totals: [SIZE, SIZE] },
      onProgress: (current, total) => seen.push({ current, total }),
    });
    await backupTask({ pairs: [pair('a'), pair('b')] }, deps).run(run);
    expect(seen.every((p) => p.current <= p.total || p.total === 0)).toBe(true);
    expect(run.progress).toMatchObject({ current: 2 * SIZE, total: 2 * SIZE });
  });

  it('the disks are copied at once: the second disk is read while the first is still being copied', async () => {
    const { devices, calls, deps } = setup();
    await fillSources(devices);
    let bStarted!: () => void;
    const bStarts = new Promise<void>((r) => { bStarted = r; });
    let overlapped = false;
    const gated: BackupDeps = {
      ...deps,
      open: async (ref, mode) => {
        const d = await deps.open(ref, mode);
        if (ref === 'm/b@bk-1') return { ...d, read: (o, l) => { bStarted(); return d.read(o, l); } };
        if (ref !== 'm/a@bk-1') return d;
        // Disk a's copy waits for disk b's to begin (2 s at most: one after the other, it never would).
        return { ...d, read: async (o, l) => {
          overlapped = await Promise.race([bStarts.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 2000))]);
          return d.read(o, l);
        } };
      },
    };
    await backupTask({ pairs: [pair('a'), pair('b')] }, gated).run(new JobRun({ jobId: 'g' }));
    expect(overlapped).toBe(true);
    for (const [v, byte] of [['a', 1], ['b', 2]] as const) expect(Buffer.from(await devices.get(`m/${v}-set`)!.read(0, SIZE)).equals(Buffer.alloc(SIZE, byte))).toBe(true);
    expect(calls.filter((c) => c.startsWith('snapshot'))).toEqual(['snapshot m/a-set@b1', 'snapshot m/b-set@b1']);
  });

  it('a failure in one disk: the others\' copies have ended before anything is undone (no write lands on a removed disk)', async () => {
    const { devices, calls, deps } = setup();
    await fillSources(devices);
    let writesAfterUndo = 0;
    let undone = false;
    const failing: BackupDeps = {
      ...deps,
      remove: async (ref) => {
        undone = true;
        await deps.remove(ref);
      },
      open: async (ref, mode) => {
        const d = await deps.open(ref, mode);
        // Disk a's write lands 50 ms after it is asked, well after disk b failed (20 ms).
        if (ref === 'm/a-set') return { ...d, write: async (o, data) => { await new Promise((r) => setTimeout(r, 50)); if (undone) writesAfterUndo++; return d.write(o, data); } };
        if (ref !== 'm/b-set') return d;
        return { ...d, write: async () => { await new Promise((r) => setTimeout(r, 20)); throw new Error('the array went away'); } };
      },
    };
    await expect(backupTask({ pairs: [pair('a'), pair('b')] }, failing).run(new JobRun({ jobId: 'g', checkpointEveryMs: 0 }))).rejects.toThrow(/went away/);
    await new Promise((r) => setTimeout(r, 100)); // a write still in flight would land by now
    expect(writesAfterUndo).toBe(0);
    expect(calls).toEqual(expect.arrayContaining(['remove m/a-set', 'remove m/b-set']));
  });

  it('a failure in the second disk undoes both: every set made is removed, every new marker dropped; resumed while undoing, it finishes the undo', async () => {
    const { devices, calls, deps } = setup();
    await fillSources(devices);
    const failing: BackupDeps = {
      ...deps,
      open: async (ref, mode) => {
        const d = await deps.open(ref, mode);
        if (ref !== 'm/b-set') return d;
        return { ...d, write: async () => { throw new Error('the array went away'); } };
      },
    };
    const saved: unknown[] = [];
    const run = new JobRun({ jobId: 'g', checkpointEveryMs: 0, onSave: (s) => void saved.push(s) });
    await expect(backupTask({ pairs: [pair('a'), pair('b')] }, failing).run(run)).rejects.toThrow(/went away/);
    expect(calls).toEqual(expect.arrayContaining(['remove m/a-set', 'remove m/b-set', 'deleteSnapshot m/a@bk-1', 'deleteSnapshot m/b@bk-1']));
    expect(calls.filter((c) => c.startsWith('snapshot'))).toEqual([]);
    // The undo was recorded before it began, for every disk.
    expect(saved.at(-1)).toMatchObject({ parts: [{ phase: 'undo', created: true }, { phase: 'undo', created: true }] });

    calls.length = 0;
    const again = new JobRun({ jobId: 'g', resumeFrom: { parts: [{ phase: 'point', created: true }, { phase: 'undo', created: true }] } });
    await expect(backupTask({ pairs: [pair('a'), pair('b')] }, deps).run(again)).rejects.toMatchObject({ code: 'FailedPrecondition', message: expect.stringMatching(/b1 of m\/a, b1 of m\/b failed and were undone/) });
    expect(calls).toEqual(['deleteSnapshot m/a-set@b1', 'remove m/a-set', 'deleteSnapshot m/a@bk-1', 'deleteSnapshot m/b-set@b1', 'remove m/b-set', 'deleteSnapshot m/b@bk-1']);
  });

  it('a run that lost its lease (its process stopped past it between a read and its write) undoes nothing and writes nothing more: the runner holding the job now goes on with the sets', async () => {
    const { devices, calls, deps } = setup();
    await fillSources(devices);
    const lease = { held: true };
    let writesUnheld = 0;
    const stalling: BackupDeps = {
      ...deps,
      open: async (ref, mode) => {
        const d = await deps.open(ref, mode);
        if (ref === 'm/b@bk-1') {
          return { ...d, read: async (o, l) => { const data = await d.read(o, l); lease.held = false; return data; } };
        }
        return { ...d, write: async (o, data) => { if (!lease.held) writesUnheld++; return d.write(o, data); } };
      },
    };
    const run = new JobRun({ jobId: 'g', mayContinue: () => lease.held });
    await expect(backupTask({ pairs: [pair('a'), pair('b')] }, stalling).run(run)).rejects.toBeInstanceOf(LeaseLost);
    expect(writesUnheld).toBe(0);
    expect(calls.filter((c) => /^(remove|revert|deleteSnapshot|snapshot) /.test(c))).toEqual([]);
    expect(devices.has('m/a-set') && devices.has('m/b-set')).toBe(true);
  });
});
