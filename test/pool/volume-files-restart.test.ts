/**
 * `volume export` and `volume import` are broker jobs that survive a crash: killed (SIGKILL) with
 * the broker process half-way, each is resumed by the next broker from its checkpoint — reading
 * only what lies above it, writing on into the same file (a qcow2 export's metadata is on disk
 * before each checkpoint that counts on it) — and ends with exactly the source's data.
 */
import { closeSync, ftruncateSync, openSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { bytesReadByProcess, HAVE_QEMU_IMG, MiB, qemuImg, restartFixture, runAndKill } from './pool-helpers.js';

const { state, pool, open, cleanup } = restartFixture('offload-volume-files-restart-');
afterAll(cleanup);
const root = join(pool, '..');
const fill = (i: number) => Buffer.alloc(MiB, (i * 37 + 11) & 0xff);

/** What `open()`'s broker reads from local/dst (or a file) is this: 1 MiB of data every 2 MiB. */
function expected(): Buffer {
  const b = Buffer.alloc(64 * MiB);
  for (let i = 0; i < 32; i++) fill(i).copy(b, i * 2 * MiB);
  return b;
}

/** Wait for the job a killed broker left, and check it resumed (not restarted) and read only what was left. */
async function resumeAndCheck(id: string, type: 'export' | 'import'): Promise<void> {
  const readBefore = bytesReadByProcess();
  const broker = await open();
  try {
    const before = (await broker.jobs.get(id)).info();
    expect(before).toMatchObject({ type, executor: 'host' });
    expect(before.progress.current).toBeGreaterThan(0);
    expect(before.progress.current).toBeLessThan(before.progress.total);
    broker.jobs.setSpeed(id, 0); // the rest at full speed: the limit only made the kill land half-way
    const info = await broker.jobs.wait(id);
    expect(info.error).toBeUndefined();
    // 32 MiB of data in all, ≥ 20 MiB done before the kill: a restart from zero would read 32 MiB
    // again. The saved checkpoint lags the progress by up to a second of saves (4 MiB/s) and a step
    // of the copier; 2 MiB more for metadata and the broker's own files.
    const read = bytesReadByProcess() - readBefore;
    expect(read).toBeLessThan(before.progress.total - before.progress.current + 10 * MiB);
    expect(read).toBeLessThan(24 * MiB);
  } finally {
    await broker.close();
  }
}

describe('volume export and import across a broker crash', () => {
  it('an export into a qcow2 file is resumed into the same file and completes with the volume\'s data', async () => {
    const setup = await open();
    await setup.volumes.create('local/src', { sizeBytes: 64 * MiB });
    const dev = await setup.volumes.open('local/src', 'rw');
    for (let i = 0; i < 32; i++) await dev.write(i * 2 * MiB, fill(i));
    await dev.close();
    await setup.close();

    const file = join(root, 'src.qcow2');
    const id = await runAndKill('export', state, pool, 20 * MiB, file);
    const inode = statSync(file).ino;
    await resumeAndCheck(id, 'export');
    expect(statSync(file).ino).toBe(inode); // written on, not made again
    if (HAVE_QEMU_IMG) {
      expect(qemuImg(['check', file], root)).toMatchObject({ status: 0 });
      const dump = join(root, 'src.dump');
      writeFileSync(dump, expected());
      expect(qemuImg(['compare', '-f', 'raw', '-F', 'qcow2', dump, file], root)).toMatchObject({ status: 0, stdout: 'Images are identical.\n' });
    }
  });

  it('an import of a raw file into a volume is resumed and leaves the volume equal to the file', async () => {
    const setup = await open();
    await setup.volumes.create('local/dst', { sizeBytes: 64 * MiB });
    // What the import must overwrite: junk in the file's holes becomes zeros.
    const dev = await setup.volumes.open('local/dst', 'rw');
    for (let i = 0; i < 32; i++) await dev.write((i * 2 + 1) * MiB, Buffer.alloc(4096, 0xee));
    await dev.close();
    await setup.close();
    // A sparse file: 32 MiB of data, holes between (the engine's raw finds them with SEEK_DATA).
    const file = join(root, 'in.raw');
    const fd = openSync(file, 'w');
    ftruncateSync(fd, 64 * MiB);
    for (let i = 0; i < 32; i++) writeSync(fd, fill(i), 0, MiB, i * 2 * MiB);
    closeSync(fd);

    const id = await runAndKill('import', state, pool, 20 * MiB, file);
    await resumeAndCheck(id, 'import');
    const broker = await open();
    try {
      const r = await broker.volumes.open('local/dst', 'r');
      expect(Buffer.from(await r.read(0, 64 * MiB)).equals(expected())).toBe(true);
      await r.close();
    } finally {
      await broker.close();
    }
  });
  it('an export given up at a clean stop is taken by the next broker of this state folder in a restarted container (another host recorded), not left to the host it names', async () => {
    // After the tests above, local/src holds expected().
    const file = join(root, 'released.qcow2');
    const was = process.env.OFFLOAD_RUNNER_HOST;
    try {
      process.env.OFFLOAD_RUNNER_HOST = 'box (boot b1, pid ns 1)';
      const first = await open();
      const job = await first.volumes.exportTo('local/src', file, { format: 'qcow2', speed: 8 * MiB });
      while (job.info().progress.current < 4 * MiB) await new Promise((r) => setTimeout(r, 20));
      await first.close(); // the job is released with its checkpoint
      // The container restarted: another host name and pid namespace (and no host id configured).
      process.env.OFFLOAD_RUNNER_HOST = 'box-7f3a (boot b1, pid ns 2)';
      const next = await open();
      try {
        const info = (await next.jobs.get(job.id)).info();
        expect(info.orphaned).toBeFalsy();
        expect(info.runner?.host).toBe('box-7f3a (boot b1, pid ns 2)');
        next.jobs.setSpeed(job.id, 0);
        expect((await next.jobs.wait(job.id)).error).toBeUndefined();
      } finally {
        await next.close();
      }
    } finally {
      if (was === undefined) delete process.env.OFFLOAD_RUNNER_HOST;
      else process.env.OFFLOAD_RUNNER_HOST = was;
    }
    if (HAVE_QEMU_IMG) {
      const dump = join(root, 'src.dump');
      writeFileSync(dump, expected());
      expect(qemuImg(['compare', '-f', 'raw', '-F', 'qcow2', dump, file], root)).toMatchObject({ status: 0, stdout: 'Images are identical.\n' });
    }
  });
});
