/**
 * Fencing of a job's data writes (JobContext.checkLease): a runner whose lease ran out while it
 * waited for a read — a process the system stopped (SIGSTOP, a frozen VM) between a chunk's read
 * and its write — writes nothing more, and leaves what it made to the runner that holds the job
 * now (no undo). Driven here with a JobRun whose lease is a flag, so that it ends exactly between
 * a read and its write; test/pool/job-leases.test.ts does it with real processes.
 */
import { describe, expect, it } from 'vitest';
import { JobRun, LeaseLost, type BlockDevice } from '../../core/index.js';
import { copyData } from '../../core/copy/copier.js';
import { cloneTask, type CloneDeps } from '../../core/copy/host-copy.js';
import { JOB_CHUNK, runChunkPipeline } from '../../plugins/qcow2/jobs/chunk-pipeline.js';
import { memoryDevice } from '../support/memory-device.js';

const MiB = 1 << 20;
const tick = () => new Promise((r) => setTimeout(r, 5));

/** A run whose lease holds while `lease.held`. */
function leasedRun(): { run: JobRun; lease: { held: boolean } } {
  const lease = { held: true };
  return { run: new JobRun({ jobId: 'fenced', mayContinue: () => lease.held }), lease };
}

/** `dev` with every write recorded, with whether the lease was held when it was asked for. */
function recording(dev: BlockDevice, lease: { held: boolean }): { dev: BlockDevice; writes: { offset: number; held: boolean }[] } {
  const writes: { offset: number; held: boolean }[] = [];
  const note = (offset: number) => writes.push({ offset, held: lease.held });
  return {
    writes,
    dev: {
      ...dev,
      write: (o, d, io) => (note(o), dev.write(o, d, io)),
      ...(dev.writeZeroes ? { writeZeroes: (o: number, l: number) => (note(o), dev.writeZeroes!(o, l)) } : {}),
    },
  };
}

/** A source of `chunks` × 4 MiB of data whose read of chunk `at` ends the lease before it returns. */
async function source(chunks: number, lease: { held: boolean }, at: number): Promise<BlockDevice> {
  const src = memoryDevice(chunks * 4 * MiB);
  for (let i = 0; i < chunks; i++) await src.write(i * 4 * MiB, new Uint8Array(4 * MiB).fill(i + 1));
  return {
    ...src,
    read: async (o, l, io) => {
      const data = await src.read(o, l, io);
      if (o === at * 4 * MiB) {
        await tick();
        lease.held = false; // the process "slept" through its lease while this read was out
      }
      return data;
    },
  };
}

describe('a runner whose lease ends between a read and its write', () => {
  it('the qcow2 jobs\' chunk pipeline writes no chunk after it, and stops with LeaseLost', async () => {
    const { run, lease } = leasedRun();
    const applied: { start: number; held: boolean }[] = [];
    const size = 8 * JOB_CHUNK;
    const done = runChunkPipeline<number>({
      offset: 0, size, ctx: run,
      prepare: async (start) => {
        await tick();
        if (start === 2 * JOB_CHUNK) lease.held = false;
        return start;
      },
      apply: async (start) => {
        applied.push({ start, held: lease.held });
        await tick();
        return 0;
      },
    });
    await expect(done).rejects.toBeInstanceOf(LeaseLost);
    expect(applied.length).toBeLessThan(8);
    expect(applied.filter((a) => !a.held)).toEqual([]);
  });

  it('the chunk pipeline\'s pause holds the next write, not only the checkpoint chunks later', async () => {
    const run = new JobRun({ jobId: 'paused' });
    const applied: number[] = [];
    const done = runChunkPipeline<number>({
      offset: 0, size: 8 * JOB_CHUNK, ctx: run,
      prepare: async (start) => start,
      apply: async (start) => {
        applied.push(start);
        if (start === 0) run.pause();
        await tick();
        return 0;
      },
    });
    for (let i = 0; i < 20; i++) await tick();
    expect(applied).toEqual([0]);
    run.resume();
    await done;
    expect(applied).toHaveLength(8);
  });

  it('the host copier writes nothing after it', async () => {
    const { run, lease } = leasedRun();
    const src = await source(6, lease, 1);
    const dst = recording(memoryDevice(6 * 4 * MiB), lease);
    await expect(copyData(src, dst.dev, run, { targetFresh: false })).rejects.toBeInstanceOf(LeaseLost);
    expect(dst.writes.filter((w) => !w.held)).toEqual([]);
    expect(dst.writes.length).toBeLessThan(6);
  });

  it('a clone through the host keeps the target it made (the runner holding the job copies into it) and writes nothing more', async () => {
    const { run, lease } = leasedRun();
    const src = await source(4, lease, 1);
    const dst = memoryDevice(4 * 4 * MiB);
    const rec = recording(dst, lease);
    const removed: string[] = [];
    let made = false;
    const deps: CloneDeps = {
      open: async (ref) => (ref === 'a/src' ? src : rec.dev),
      find: async () => (made ? {} : undefined),
      create: async () => {
        made = true;
        return {};
      },
      own: async () => undefined,
      remove: async (ref) => void removed.push(ref),
    };
    const task = cloneTask({ source: 'a/src', target: 'z/dst', targetFresh: false, sizeBytes: 16 * MiB, owner: 'admin' }, deps);
    await expect(task.run(run)).rejects.toBeInstanceOf(LeaseLost);
    expect(removed).toEqual([]);
    expect(rec.writes.filter((w) => !w.held)).toEqual([]);
  });
});
