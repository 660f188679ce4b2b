/**
 * Runners take over each other's jobs, as `offload serve` processes will: long-running brokers
 * (child processes, one-second leases) on one state directory and one pool. Killed with SIGKILL
 * mid-stream, a runner's job is taken over by another once the runner is seen dead, resumed from
 * its checkpoint (the new runner reads only what was left) and concluded once, with the next
 * fencing token. Stopped with SIGTERM, a runner releases its job and another takes it at once.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterAll, describe, expect, it } from 'vitest';
import { createBroker, silentLogger } from '../../core/index.js';
import { qcow2Module } from '../../plugins/qcow2/module.js';
import { failedChecks, HAVE_QEMU_IMG, kidReadsRight, MiB, restartFixture, setUpKid } from './pool-helpers.js';
import { tsChild } from '../support/ts-child.js';

const { state, pool, open, cleanup } = restartFixture('offload-job-takeover-');
const ROOT = join(import.meta.dirname, '../..');
const children: ChildProcess[] = [];
afterAll(() => {
  for (const c of children) c.kill('SIGKILL');
  cleanup();
});

/** A runner child; resolves with it and the first line it printed (a job id, or "ready"). */
async function runner(stream: boolean): Promise<{ child: ChildProcess; line: string; exited: Promise<number | null> }> {
  const child = spawn(process.execPath, [...tsChild('test/pool/runner-child.ts'), state, pool, ...(stream ? ['stream'] : [])],
    { cwd: ROOT, stdio: ['ignore', 'pipe', 'inherit'] });
  children.push(child);
  const exited = new Promise<number | null>((r) => child.on('exit', (c) => r(c)));
  const line = await new Promise<string>((resolve, reject) => {
    let out = '';
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      if (out.includes('\n')) resolve(out.slice(0, out.indexOf('\n')));
    });
    child.on('exit', (c) => reject(new Error(`runner exited ${c}`)));
  });
  return { child, line, exited };
}

function row(id: string): { status: string; runner_pid: number; fence: number; progress_current: number; progress_total: number; error_message: string | null } {
  const db = new Database(join(state, 'jobs.sqlite'), { readonly: true });
  try {
    return db.prepare('SELECT status, runner_pid, fence, progress_current, progress_total, error_message FROM jobs WHERE id = ?').get(id) as ReturnType<typeof row>;
  } finally {
    db.close();
  }
}

async function until(what: string, ok: () => boolean): Promise<void> {
  for (let i = 0; i < 600; i++) {
    if (ok()) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out waiting for ${what}`);
}

const rchar = (pid: number) => Number(/^rchar: (\d+)$/m.exec(readFileSync(`/proc/${pid}/io`, 'utf8'))![1]);

describe('runners taking over jobs', () => {
  it('a runner killed mid-stream: another takes the job over, resumes it from its checkpoint and concludes it once', async () => {
    const setup = await open();
    await setUpKid(setup);
    await setup.close();
    const a = await runner(true);
    const id = a.line;
    const b = await runner(false);
    expect(b.line).toBe('ready');
    await until('progress', () => row(id).progress_current >= 16 * MiB);
    // B does nothing while A runs it: A holds the lease.
    expect(row(id)).toMatchObject({ runner_pid: a.child.pid, fence: 1 });
    const readBefore = rchar(b.child.pid!);
    a.child.kill('SIGKILL');
    await a.exited;
    const atKill = row(id);
    await until('the job to conclude', () => row(id).status === 'concluded');
    const done = row(id);
    expect(done).toMatchObject({ runner_pid: b.child.pid, fence: 2, error_message: null });
    // Resumed, not restarted: B read about the data above the checkpoint (half of every 2 MiB is
    // data; the checkpoint lags the progress by up to a second, 4 MiB), not all 32 MiB again.
    const read = rchar(b.child.pid!) - readBefore;
    expect(read).toBeLessThan((atKill.progress_total - atKill.progress_current) / 2 + 8 * MiB);
    expect(read).toBeLessThan(24 * MiB);
    const check = await createBroker({ state, backends: [{ name: 'local', kind: 'qcow2', path: pool }] }, { plugins: [qcow2Module], logger: silentLogger, recoverJobs: false });
    try {
      await kidReadsRight(check);
    } finally {
      await check.close();
    }

    // SIGTERM: the runner releases its job and exits 0; B takes it at once (no lease to wait out).
    const setup2 = await open();
    await setUpKid(setup2);
    await setup2.close();
    const c = await runner(true);
    const id2 = c.line;
    await until('progress', () => row(id2).progress_current >= 8 * MiB);
    c.child.kill('SIGTERM');
    expect(await c.exited).toBe(0);
    await until('the second job to conclude', () => row(id2).status === 'concluded');
    expect(row(id2)).toMatchObject({ runner_pid: b.child.pid, fence: 2, error_message: null });
    b.child.kill('SIGTERM');
    expect(await b.exited).toBe(0);
    if (HAVE_QEMU_IMG) expect(failedChecks(pool, { killed: true })).toEqual([]);
  });
});
