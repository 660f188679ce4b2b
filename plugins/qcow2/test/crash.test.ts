/**
 * Crash safety: a writer process is killed with SIGKILL at random points; after each kill
 * `qemu-img check` finds no corruption (leaks at most) and every cluster reads as its content
 * either before or after the op in flight. 10 kills normally; OFFLOAD_LONG=1 runs 60.
 */
import { spawn } from 'node:child_process';
import { copyFileSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { createImage, openImage } from '../index.js';
import { CRASH_CS, CRASH_SIZE, crashOps, stateAfter } from './crash-ops.js';
import { hasQemu, pattern, qemuCheckJson, tempDir, warnIfNoQemu } from './helpers.js';

const here = dirname(fileURLToPath(import.meta.url));
const KILLS = process.env.OFFLOAD_LONG ? 60 : 10;

interface Outcome { ended: number; killed: boolean; busyMs: number }

function runWriter(file: string, seed: number, killAfterMs: number | undefined): Promise<Outcome> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', 'tsx', join(here, 'crash-writer.ts'), file, String(seed)], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    let err = '';
    let timer: NodeJS.Timeout | undefined;
    let readyAt = 0;
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      if (!readyAt && out.includes('READY')) readyAt = Date.now();
      if (killAfterMs !== undefined && timer === undefined && out.includes('READY')) {
        timer = setTimeout(() => child.kill('SIGKILL'), killAfterMs);
      }
    });
    child.stderr.on('data', (d: Buffer) => { err += d.toString(); });
    child.on('error', reject);
    child.on('exit', (code, signal) => {
      if (timer) clearTimeout(timer);
      const ends = [...out.matchAll(/END (\d+)/g)].map((m) => Number(m[1]));
      const ended = ends.length ? Math.max(...ends) + 1 : 0;
      if (signal !== 'SIGKILL' && code !== 0) reject(new Error(`writer failed (${code}): ${err}`));
      else resolve({ ended, killed: signal === 'SIGKILL' && !out.includes('DONE'), busyMs: Date.now() - readyAt });
    });
  });
}

describe.skipIf(!hasQemu)('crash safety: kill -9 a writer at random points', () => {
  warnIfNoQemu('qcow2 crash test');
  const t = tempDir('qcow2-crash-');
  afterAll(t.cleanup);

  it(`${KILLS} kills: no corruption, every cluster old or new`, async () => {
    const base = join(t.dir, 'base.qcow2');
    await createImage(base, { size: CRASH_SIZE });
    const initial = pattern(CRASH_SIZE, 77);
    const b = await openImage(base, { readOnly: false });
    await b.write(0, initial);
    await b.close();
    const template = join(t.dir, 'template.qcow2');
    await createImage(template, { backingFile: 'base.qcow2', backingFormat: 'qcow2', clusterSize: CRASH_CS, refcountBits: 64 });

    // One undisturbed run tells how long the op sequence takes, to spread the kills over it.
    const timing = join(t.dir, 'timing.qcow2');
    copyFileSync(template, timing);
    const full = await runWriter(timing, 1, undefined);
    const span = Math.max(20, Math.floor(full.busyMs * 0.9));
    expect(full.ended).toBe(crashOps(1).length);

    let kills = 0;
    let r = 12345;
    for (let i = 0; i < KILLS * 3 && kills < KILLS; i++) {
      r = (r * 1103515245 + 12345) % 2 ** 31;
      const seed = 1 + (i % 5);
      const file = join(t.dir, `crash-${i}.qcow2`);
      copyFileSync(template, file);
      const { ended, killed } = await runWriter(file, seed, r % span);
      if (!killed) continue;
      kills++;
      const { status, json } = qemuCheckJson(file);
      expect({ kill: i, corruptions: json.corruptions ?? 0, errors: json['check-errors'] ?? 0 }).toEqual({ kill: i, corruptions: 0, errors: 0 });
      expect([0, 3]).toContain(status);

      const ops = crashOps(seed);
      const before = stateAfter(initial, ops, ended);
      const after = stateAfter(initial, ops, Math.min(ops.length, ended + 1));
      const img = await openImage(file);
      const got = await img.read(0, img.virtualSize);
      await img.close();
      expect([before.length, after.length]).toContain(got.length);
      for (let c = 0; c < got.length; c += CRASH_CS) {
        const g = Buffer.from(got.subarray(c, c + CRASH_CS));
        const okOld = c < before.length && g.equals(Buffer.from(before.subarray(c, c + CRASH_CS)));
        const okNew = c < after.length && g.equals(Buffer.from(after.subarray(c, c + CRASH_CS)));
        if (!okOld && !okNew) expect.fail(`kill ${i} (after op ${ended}): cluster at ${c} is neither old nor new`);
      }
    }
    expect(kills).toBe(KILLS);
  }, (KILLS * 8 + 60) * 1000);
});
