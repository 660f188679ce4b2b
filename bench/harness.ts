/** Shared benchmark plumbing: run commands, time them, take medians, report ours/qemu ratios. */
import { spawnSync } from 'node:child_process';
import { createServer } from 'node:net';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

export const ROOT = resolve(import.meta.dirname, '..');
const MAIN = join(ROOT, 'dist/cli/main.js');
/** Our CLI as users run it (the executable picks the bundled entry and its environment). */
const OFFLOAD = join(ROOT, 'bin/offload');

export function requireBuilt(): void {
  if (!existsSync(MAIN)) throw new Error('run `npm run build` first (benchmarks run the built CLI)');
  if (spawnSync('qemu-img', ['--version']).status !== 0) throw new Error('qemu-img is not installed (apt-get install qemu-utils)');
}

export function workDir(prefix: string): string {
  return mkdtempSync(join(process.env.OFFLOAD_BENCH_DIR ?? tmpdir(), prefix));
}

export function run(cmd: string, args: string[], cwd?: string): void {
  const r = spawnSync(cmd, args, { cwd, encoding: 'utf8', maxBuffer: 64 << 20 });
  if (r.status !== 0) throw new Error(`${cmd} ${args.slice(0, 4).join(' ')}… failed (${r.status}): ${r.stderr || r.stdout}`);
}

/** Time a command (wall clock, from spawn to exit). */
export function timed(cmd: string, args: string[], cwd?: string): { ms: number } {
  const t0 = process.hrtime.bigint();
  run(cmd, args, cwd);
  return { ms: Number(process.hrtime.bigint() - t0) / 1e6 };
}

/** Time our CLI, exactly as a user runs it (nothing preloaded: see peakRssOurs). */
export function timedOurs(args: string[], cwd?: string): { ms: number } {
  return timed(OFFLOAD, args, cwd);
}

/**
 * Our CLI's peak RSS (KiB), from one more run with a preload that reports it. Not timed: the
 * preload is a module more to load, and the timed runs should be what users run.
 */
export function peakRssOurs(args: string[], cwd?: string): number {
  const dir = mkdtempSync(join(tmpdir(), 'rss-'));
  const out = join(dir, 'rss');
  const preload = `--require=${join(ROOT, 'bench/report-rss.cjs')}`;
  try {
    const r = spawnSync(OFFLOAD, args, {
      cwd, encoding: 'utf8', maxBuffer: 64 << 20,
      env: { ...process.env, OFFLOAD_RSS_OUT: out, NODE_OPTIONS: `${process.env.NODE_OPTIONS ?? ''} ${preload}`.trim() },
    });
    if (r.status !== 0) throw new Error(`offload ${args.slice(0, 4).join(' ')}… failed (${r.status}): ${r.stderr || r.stdout}`);
    return Number(readFileSync(out, 'utf8'));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
}

export interface Row { what: string; qemuMs: number; oursMs: number; oursRssMiB: number }

export function report(title: string, rows: Row[]): void {
  process.stdout.write(`\n${title}\n`);
  process.stdout.write(`${'operation'.padEnd(46)} ${'qemu ms'.padStart(9)} ${'ours ms'.padStart(9)} ${'ratio'.padStart(6)} ${'our RSS'.padStart(9)}\n`);
  for (const r of rows) {
    process.stdout.write(`${r.what.padEnd(46)} ${r.qemuMs.toFixed(0).padStart(9)} ${r.oursMs.toFixed(0).padStart(9)} ${(r.oursMs / r.qemuMs).toFixed(2).padStart(6)} ${`${r.oursRssMiB.toFixed(0)} MiB`.padStart(9)}\n`);
  }
}

/**
 * `rounds` rounds of qemu and ours; medians. Each timed command starts from `prepare()` (which
 * removes every output of earlier commands) and written-back dirty pages, so it runs alone: on
 * this kind of machine a command runs up to 3x slower while another freshly written image of
 * 512 MiB is still on disk, whichever tool wrote it (measured by hand for both tools). Our output
 * is checked by `verify` before it is removed. Which side runs first still alternates by round.
 */
export function compare(what: string, rounds: number, prepare: () => void, qemu: () => { ms: number }, ours: () => { ms: number },
  oursRss: () => number, verify?: () => void): Row {
  const q: number[] = [];
  const o: number[] = [];
  const settle = () => { prepare(); spawnSync('sync'); };
  const runQemu = () => { settle(); q.push(qemu().ms); };
  const runOurs = () => {
    settle();
    o.push(ours().ms);
    verify?.();
  };
  for (let i = 0; i < rounds; i++) {
    if (i % 2 === 0) { runQemu(); runOurs(); } else { runOurs(); runQemu(); }
  }
  settle();
  const rss = oursRss();
  verify?.();
  prepare();
  return { what, qemuMs: median(q), oursMs: median(o), oursRssMiB: rss / 1024 };
}

/** A TCP port free on loopback now (for a server started next). */
export async function freePort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as { port: number }).port;
  await new Promise<void>((r) => srv.close(() => r()));
  return port;
}
