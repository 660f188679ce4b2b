/**
 * Job leases and fencing, with real processes: a runner killed with SIGKILL leaves an orphaned job
 * that listing and showing (CLI or API) never adopt — only `offload jobs resume ID` (takeOver)
 * does, with the next fencing token, and finishes it from its checkpoint. A runner stopped with
 * SIGSTOP past its lease is taken over; when it wakes (SIGCONT) it stops at once without writing
 * anything more: neither the job's record (fencing) nor its data (it checks its lease before each
 * step), and exactly one runner concludes the job.
 */
import { createHash } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterAll, describe, expect, it } from 'vitest';
import { createBroker, runCli, silentLogger, type Broker } from '../../core/index.js';
import { builtinPlugins } from '../../plugins/index.js';
import { qcow2Module } from '../../plugins/qcow2/module.js';
import { failedChecks, fill, HAVE_QEMU_IMG, kidReadsRight, layerFiles, MiB, restartFixture, runAndKill, setUpKid, startJobChild } from './pool-helpers.js';

const { state, pool, cleanup } = restartFixture('offload-job-leases-');
afterAll(cleanup);
const config = join(state, '..', 'offload.yaml');
writeFileSync(config, `state: ${state}\nleaseSeconds: 1\nbackends:\n  - name: local\n    kind: qcow2\n    path: ${pool}\n`);

const open = (recoverJobs = false) => createBroker(config, { plugins: [qcow2Module], logger: silentLogger, recoverJobs });

async function offload(...args: string[]): Promise<{ status: number; stdout: string; stderr: string }> {
  let stdout = '';
  let stderr = '';
  const status = await runCli(['--config', config, ...args], {
    plugins: builtinPlugins,
    io: { stdout: { write: (s: string) => (stdout += s) }, stderr: { write: (s: string) => (stderr += s) } },
  });
  return { status, stdout, stderr };
}

/** The job's row as stored: who runs it, under which fencing token. */
function row(id: string): { status: string; runner_pid: number; runner_token: string; fence: number; lease_expires: number; progress_current: number;
  checkpoint: string | null; error_message: string | null; } {
  const db = new Database(join(state, 'jobs.sqlite'), { readonly: true });
  try {
    return db.prepare('SELECT status, runner_pid, runner_token, fence, lease_expires, progress_current, checkpoint, error_message FROM jobs WHERE id = ?').get(id) as ReturnType<typeof row>;
  } finally {
    db.close();
  }
}

/** Every layer file of the pool with a digest of its bytes. */
function poolFiles(): Record<string, string> {
  return Object.fromEntries(layerFiles(pool).map((f) => [f, createHash('sha256').update(readFileSync(join(pool, f))).digest('hex')]));
}

describe('job leases', () => {
  it('an orphan is listed as orphaned and never adopted by list or show; jobs resume takes it over and finishes it', async () => {
    const setup = await open();
    await setUpKid(setup);
    await setup.close();
    const id = await runAndKill('stream', state, pool, 24 * MiB);
    const killed = row(id);
    expect(killed).toMatchObject({ status: 'running', fence: 1 });

    // The regression: these commands used to adopt the job and run it while they lived.
    const list = await offload('--json', 'jobs', 'list');
    expect(list.status, list.stderr).toBe(0);
    const listed = (JSON.parse(list.stdout) as { id: string; orphaned?: boolean; status: string; runner?: { pid: number } }[]).find((j) => j.id === id)!;
    expect(listed).toMatchObject({ orphaned: true, status: 'running', runner: { pid: killed.runner_pid } });
    const human = await offload('jobs', 'list');
    expect(human.stdout).toMatch(new RegExp(`${id}\\s+stream\\s+orphaned\\s`));
    expect(human.stdout).toMatch(new RegExp(`pid ${killed.runner_pid}, seen \\d+ s ago`));
    expect((await offload('jobs', 'show', id)).stdout).toMatch(/status: orphaned/);
    const waited = await offload('jobs', 'wait', id);
    expect(waited.status).toBe(1);
    expect(waited.stderr).toMatch(/orphaned.*offload jobs resume/s);
    const looker = await open(false);
    expect((await looker.jobs.get(id)).info()).toMatchObject({ orphaned: true });
    await looker.close();
    // It keeps its locks (the half-streamed clone stays as it was left), and a verb that needs a
    // runner says to take it over first.
    const del = await offload('volume', 'delete', 'local/kid');
    expect(del.status).toBe(1);
    expect(del.stderr).toMatch(new RegExp(`Busy.*orphaned: take it over with \`offload jobs resume ${id}\``));
    const pause = await offload('jobs', 'pause', id);
    expect(pause.status).toBe(1);
    expect(pause.stderr).toMatch(/FailedPrecondition.*orphaned/);
    // Nothing was taken over or moved.
    expect(row(id)).toEqual(killed);

    // Taken over explicitly: the next fencing token, resumed from the checkpoint, to the end.
    const resumed = await offload('jobs', 'resume', id);
    expect(resumed.status, resumed.stderr).toBe(0);
    expect(resumed.stderr).toMatch(new RegExp(`job ${id} is orphaned .*taking it over`));
    expect(row(id)).toMatchObject({ status: 'concluded', fence: 2, error_message: null });
    const b = await open();
    try {
      expect((await b.jobs.get(id)).info()).toMatchObject({ status: 'concluded' });
      expect((await b.jobs.get(id)).info().orphaned).toBeUndefined();
      await kidReadsRight(b);
      await expect(b.jobs.takeOver(id)).rejects.toMatchObject({ code: 'FailedPrecondition' });
    } finally {
      await b.close();
    }
    if (HAVE_QEMU_IMG) expect(failedChecks(pool, { killed: true })).toEqual([]);
  });

  it('cancelling an orphan takes it over to cancel it: its task ends as on any cancel, and its locks go', async () => {
    const setup = await open();
    await setUpKid(setup);
    await setup.close();
    const id = await runAndKill('stream', state, pool, 8 * MiB);
    const r = await offload('jobs', 'cancel', id);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(new RegExp(`job ${id}: taken over and cancelled`));
    expect(row(id)).toMatchObject({ status: 'concluded', fence: 2 });
    const b = await open();
    try {
      expect((await b.jobs.get(id)).info().error?.code).toBe('Cancelled');
      // The chain is valid (the clone still reads its parent's data), and nothing holds it.
      const dev = await b.volumes.open('local/kid', 'r');
      for (let i = 0; i < 32; i += 7) expect(Buffer.from(await dev.read(i * 2 * MiB, MiB)).equals(fill(i))).toBe(true);
      await dev.close();
      await b.volumes.delete('local/kid');
    } finally {
      await b.close();
    }
    if (HAVE_QEMU_IMG) expect(failedChecks(pool, { killed: true })).toEqual([]);
  });

  it('a runner paused past its lease is taken over, and once it wakes writes nothing more: not the record, not the data', async () => {
    const setup = await open();
    await setUpKid(setup);
    await setup.close();
    const { child, id, out } = await startJobChild('stream', state, pool, 16 * MiB, undefined, { OFFLOAD_TEST_LEASE_SECONDS: '1' });
    const exited = new Promise<number | null>((r) => child.on('exit', (c) => r(c)));
    try {
      child.kill('SIGSTOP');
      const b = await open();
      try {
        // Alive on this host and within its lease: Busy, naming its runner.
        if (Date.now() < row(id).lease_expires - 200) {
          await expect(b.jobs.takeOver(id)).rejects.toMatchObject({ code: 'Busy' });
        }
        await new Promise((r) => setTimeout(r, 1500));
        expect((await b.jobs.get(id)).info()).toMatchObject({ orphaned: true });
        const job = await b.jobs.takeOver(id);
        expect(row(id)).toMatchObject({ fence: 2, runner_pid: process.pid });
        // Hold the new runner still, so that any write from here on would be the old one's.
        // Paused, it finishes the writes it had started (a pause point comes before each write)
        // and starts none: wait for the files to stay as they are.
        await job.pause();
        for (let i = 0; i < 100 && job.info().status !== 'paused'; i++) await new Promise((r) => setTimeout(r, 50));
        for (let last = poolFiles(), i = 0; i < 50; i++) {
          await new Promise((r) => setTimeout(r, 300));
          const now = poolFiles();
          if (JSON.stringify(now) === JSON.stringify(last)) break;
          last = now;
        }
        // The record without its lease's expiry, which the new runner keeps renewing meanwhile.
        const record = () => {
          const { lease_expires: _renewed, ...rest } = row(id);
          return rest;
        };
        const before = { files: poolFiles(), row: record() };
        child.kill('SIGCONT');
        // It wakes, finds its lease gone, and stops: nothing of the job's record or data changed.
        expect(await exited).toBe(3);
        expect(out()).toMatch(/^stopped: job .*(lease|taken over|another runner)/m);
        expect(record()).toEqual(before.row);
        expect(poolFiles()).toEqual(before.files);
        await job.resume();
        const info = await job.wait();
        expect(info.error).toBeUndefined();
        expect(row(id)).toMatchObject({ status: 'concluded', fence: 2, runner_pid: process.pid });
        await kidReadsRight(b);
      } finally {
        await b.close();
      }
    } finally {
      child.kill('SIGKILL');
    }
    if (HAVE_QEMU_IMG) expect(failedChecks(pool, { killed: true })).toEqual([]);
  });
});
