/**
 * Crash safety: a writer process is killed with SIGKILL at random points; after each kill
 * `qemu-img check` finds no corruption (leaks at most) and every cluster reads as its content
 * either before or after the op in flight. 5 kills normally; OFFLOAD_LONG=1 runs 60.
 */
import { spawn } from 'node:child_process';
import { copyFileSync, mkdirSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { createImage, openImage } from '../index.js';
import { CRASH_CS, CRASH_SIZE, crashOps, stateAfter } from './crash-ops.js';
import { hasQemu, pattern, qemuCheckJson, tempDir, warnIfNoQemu } from './helpers.js';
import { tsChild } from '../../../test/support/ts-child.js';

const here = dirname(fileURLToPath(import.meta.url));
const KILLS = process.env.OFFLOAD_LONG ? 60 : 5;

interface Outcome { ended: number; killed: boolean; busyMs: number }

type Mode = 'write-through' | 'deferred' | 'fua';

function runWriter(file: string, seed: number, killAfterMs: number | undefined, mode: Mode): Promise<Outcome> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [...tsChild(join(here, 'crash-writer.ts')), file, String(seed), mode], {
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

  /*
   * Write-through (and FUA writes, whose file writes go in batches): every op that ended is in
   * the file, so each cluster reads as after the op in flight or before it. Deferred metadata: ops since the last (automatic) metadata flush may be
   * lost, so each cluster reads as after some op up to the one in flight — never anything else.
   */
  it.each<[Mode, string]>([
    ['write-through', 'every cluster old or new'],
    ['deferred', 'every cluster as after some op up to the one in flight'],
    ['fua', 'every cluster old or new'],
  ])(`%s: ${KILLS} kills: no corruption, %s`, async (mode) => {
    const dir = join(t.dir, mode);
    mkdirSync(dir);
    const base = join(dir, 'base.qcow2');
    await createImage(base, { size: CRASH_SIZE });
    const initial = pattern(CRASH_SIZE, 77);
    const b = await openImage(base, { readOnly: false });
    await b.write(0, initial);
    await b.close();
    const template = join(dir, 'template.qcow2');
    await createImage(template, { backingFile: 'base.qcow2', backingFormat: 'qcow2', clusterSize: CRASH_CS, refcountBits: 64 });

    // One undisturbed run tells how long the op sequence takes, to spread the kills over it.
    const timing = join(dir, 'timing.qcow2');
    copyFileSync(template, timing);
    const full = await runWriter(timing, 1, undefined, mode);
    const span = Math.max(20, Math.floor(full.busyMs * 0.9));
    expect(full.ended).toBe(crashOps(1).length);

    let kills = 0;
    let r = 12345;
    for (let i = 0; i < KILLS * 3 && kills < KILLS; i++) {
      r = (r * 1103515245 + 12345) % 2 ** 31;
      const seed = 1 + (i % 5);
      const file = join(dir, `crash-${i}.qcow2`);
      copyFileSync(template, file);
      const { ended, killed } = await runWriter(file, seed, r % span, mode);
      if (!killed) continue;
      kills++;
      const { status, json } = qemuCheckJson(file);
      expect({ kill: i, corruptions: json.corruptions ?? 0, errors: json['check-errors'] ?? 0 }).toEqual({ kill: i, corruptions: 0, errors: 0 });
      expect([0, 3]).toContain(status);

      const ops = crashOps(seed);
      const last = Math.min(ops.length, ended + 1);
      const candidates = mode === 'deferred' ? Array.from({ length: last + 1 }, (_, k) => k) : [ended, last];
      const states = candidates.map((k) => stateAfter(initial, ops, k));
      const img = await openImage(file);
      const got = await img.read(0, img.virtualSize);
      await img.close();
      expect(states.map((st) => st.length)).toContain(got.length);
      for (let c = 0; c < got.length; c += CRASH_CS) {
        const g = Buffer.from(got.subarray(c, c + CRASH_CS));
        const ok = states.some((st) => c < st.length && g.equals(Buffer.from(st.subarray(c, c + CRASH_CS))));
        if (!ok) expect.fail(`kill ${i} (after op ${ended}, ${mode}): cluster at ${c} reads as no state the ops could have left`);
      }
    }
    expect(kills).toBe(KILLS);
  }, (KILLS * 8 + 60) * 1000);
});
