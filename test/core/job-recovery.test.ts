import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterEach, describe, expect, it } from 'vitest';
import { createBroker, silentLogger } from '../../core/index.js';
import { tickerModule } from '../support/ticker-backend.js';
import { tsChild } from '../support/ts-child.js';

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

/** Start the child, wait until its job has made progress, then kill -9 it. Returns the job id. */
async function runAndKill(stateDir: string, resumable: boolean, log: string): Promise<string> {
  const child = spawn(process.execPath, [...tsChild('test/support/ticker-child.ts'), stateDir, String(resumable), log], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const id = await new Promise<string>((resolve, reject) => {
    let buf = '';
    child.stdout.on('data', (d: Buffer) => {
      buf += d.toString();
      if (buf.includes('\n')) resolve(buf.trim());
    });
    child.on('exit', (code) => reject(new Error(`child exited early with ${code}`)));
  });
  const db = new Database(join(stateDir, 'jobs.sqlite'), { readonly: true });
  try {
    // Wait for a few checkpoints (bounded: the child runs 200 steps of 25 ms).
    for (let i = 0; i < 400; i++) {
      const row = db.prepare('SELECT checkpoint FROM jobs WHERE id = ?').get(id) as { checkpoint: string | null } | undefined;
      if (row?.checkpoint && (JSON.parse(row.checkpoint) as { step: number }).step >= 10) break;
      await new Promise((r) => setTimeout(r, 25));
    }
  } finally {
    db.close();
  }
  const exited = new Promise((r) => child.on('exit', r));
  child.kill('SIGKILL');
  await exited;
  return id;
}

describe('jobs survive a kill -9 of the process running them', () => {
  it('a resumable job is resumed from its checkpoint by the next broker and completes', async () => {
    const state = mkdtempSync(join(tmpdir(), 'offload-recover-'));
    dirs.push(state);
    const log = join(state, 'steps.log');
    const id = await runAndKill(state, true, log);
    const stepsBefore = readFileSync(log, 'utf8').trim().split('\n').length;
    expect(stepsBefore).toBeGreaterThanOrEqual(10);
    expect(stepsBefore).toBeLessThan(200);

    const broker = await createBroker(
      { state, backends: [{ name: 'tick', kind: 'ticker', steps: 200, stepMs: 1, resumable: true, log }] },
      { plugins: [tickerModule], logger: silentLogger },
    );
    try {
      const info = await broker.jobs.wait(id);
      expect(info.error).toBeUndefined();
      expect(info.status).toBe('concluded');
      expect(info.progress.current).toBe(info.progress.total);
      // Every step ran, and the second process started at the checkpoint, not from zero.
      const lines = readFileSync(log, 'utf8').trim().split('\n').map((l) => l.split(' '));
      const steps = new Set(lines.map(([, s]) => Number(s)));
      expect(steps.size).toBe(200);
      const secondRun = lines.filter(([pid]) => Number(pid) === process.pid).map(([, s]) => Number(s));
      expect(secondRun.length).toBeGreaterThan(0);
      expect(Math.min(...secondRun)).toBeGreaterThanOrEqual(stepsBefore - 1);
      expect(lines.length).toBeLessThanOrEqual(201);
    } finally {
      await broker.close();
    }
  });

  it('a job its executor cannot resume is concluded with an error that says it was interrupted', async () => {
    const state = mkdtempSync(join(tmpdir(), 'offload-recover-'));
    dirs.push(state);
    const id = await runAndKill(state, false, join(state, 'steps.log'));
    const broker = await createBroker(
      { state, backends: [{ name: 'tick', kind: 'ticker', resumable: false }] },
      { plugins: [tickerModule], logger: silentLogger },
    );
    try {
      const info = (await broker.jobs.get(id)).info();
      expect(info.status).toBe('concluded');
      expect(info.error?.message).toMatch(/interrupted/);
      expect(info.error?.message).toMatch(/run it again/);
      // never left "running" again
      expect((await broker.jobs.list({ status: 'running' }))).toHaveLength(0);
    } finally {
      await broker.close();
    }
  });
});
