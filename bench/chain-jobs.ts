/**
 * Benchmark (issue 4 item 10): our stream vs `qemu-img rebase -b ''` (flatten) and our commit vs
 * `qemu-img commit`, on a base of 1 GiB virtual with 512 MiB written and an overlay with 256 MiB
 * rewritten (64 KiB clusters), then the same data in a 16 GiB virtual image. Fresh copies of the
 * chain every round, median of 5, times, ratio ours/qemu-img and our peak RSS (each of our runs is
 * the built `offload img stream|commit` command, start-up included, as qemu-img's time is).
 *
 *   node --import tsx bench/chain-jobs.ts            (BENCH_ROUNDS=5, BENCH_DIR=$TMPDIR)
 * Needs the build (`npm run bench` builds first).
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { copyFileSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { ROOT, median, peakRssOurs, requireBuilt, timedOurs } from './harness.js';

const MiB = 1 << 20;

/**
 * The job alone, as the broker runs it inside its long-lived process: a child process on dist/
 * that loads the jobs module, then times only the job.
 */
const DIST = join(ROOT, 'dist', 'plugins', 'qcow2', 'jobs', 'index.js');
const CORE = join(ROOT, 'dist', 'core', 'index.js');
const CHILD = (jobsModule: string, coreModule: string) => `
  const { commitTask, streamTask } = await import(${JSON.stringify(jobsModule)});
  const { JobRun } = await import(${JSON.stringify(coreModule)});
  const [job, dir] = process.argv.slice(1);
  const ctx = new JobRun({ jobId: 'bench' }); // what the broker gives a job (checkpoints saved once a second)
  const baseline = process.resourceUsage().maxRSS / 1024;
  const t0 = performance.now();
  const task = job === 'stream' ? streamTask(dir + '/top.qcow2') : commitTask(dir + '/top.qcow2', { empty: true });
  if (job !== 'none') await task.run(ctx);
  process.stdout.write(JSON.stringify({ ms: performance.now() - t0, maxRssMiB: process.resourceUsage().maxRSS / 1024, baseline }) + '\\n');
`;


function qemu(args: string[], cwd: string): void {
  execFileSync('qemu-img', args, { cwd, stdio: 'ignore' });
}

function qemuIo(file: string, cmds: string[], cwd: string): void {
  // Batches keep each command line short.
  for (let i = 0; i < cmds.length; i += 128) {
    execFileSync('qemu-io', ['-f', 'qcow2', ...cmds.slice(i, i + 128).flatMap((c) => ['-c', c]), file], { cwd, stdio: 'ignore' });
  }
}

/** base: 512 × 1 MiB written, spread over the virtual size; top: 256 × 1 MiB rewritten over base data. */
function buildTemplate(dir: string, virtual: number): void {
  mkdirSync(dir, { recursive: true });
  qemu(['create', '-f', 'qcow2', '-o', 'cluster_size=64k', 'base.qcow2', String(virtual)], dir);
  const stride = virtual / 512;
  qemuIo('base.qcow2', Array.from({ length: 512 }, (_, i) => `write -P ${1 + (i % 200)} ${i * stride} 1M`), dir);
  qemu(['create', '-f', 'qcow2', '-o', 'cluster_size=64k', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], dir);
  qemuIo('top.qcow2', Array.from({ length: 256 }, (_, i) => `write -P ${201 + (i % 50)} ${i * 2 * stride} 1M`), dir);
}

function fresh(template: string, dir: string): void {
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir);
  for (const f of ['base.qcow2', 'top.qcow2']) copyFileSync(join(template, f), join(dir, f));
  execFileSync('sync');
}

function ourJob(job: string, dir: string): number {
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', CHILD(pathToFileURL(DIST).href, pathToFileURL(CORE).href), job, dir], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`our ${job} job failed: ${r.stderr}`);
  return (JSON.parse(r.stdout.trim().split('\n').pop()!) as { ms: number }).ms;
}

function theirs(job: string, dir: string): number {
  const t0 = performance.now();
  if (job === 'stream') qemu(['rebase', '-b', '', 'top.qcow2'], dir);
  else qemu(['commit', 'top.qcow2'], dir);
  return performance.now() - t0;
}

async function main(): Promise<void> {
  requireBuilt();
  const rounds = Number(process.env.BENCH_ROUNDS ?? 5);
  const work0 = mkdtempSync(join(process.env.BENCH_DIR ?? tmpdir(), 'chain-bench-'));
  try {
    for (const [label, virtual] of [['1 GiB', 1024 * MiB], ['16 GiB', 16384 * MiB]] as const) {
      const template = join(work0, `template-${label.replace(' ', '')}`);
      buildTemplate(template, virtual);
      for (const job of ['stream', 'commit']) {
        const ourMs: number[] = [];
        const jobMs: number[] = [];
        const theirMs: number[] = [];
        const work = join(work0, 'work');
        const runOurs = () => {
          fresh(template, work);
          // The whole `offload img stream|commit` command, start-up included, as qemu-img's is.
          ourMs.push(timedOurs(['img', job, 'top.qcow2'], work).ms);
        };
        const runJob = () => {
          fresh(template, work);
          jobMs.push(ourJob(job, work));
        };
        const runTheirs = () => {
          fresh(template, work);
          theirMs.push(theirs(job, work));
        };
        // Who goes first alternates (see harness.compare).
        for (let i = 0; i < rounds; i++) {
          if (i % 2 === 0) { runTheirs(); runOurs(); } else { runOurs(); runTheirs(); }
          runJob();
        }
        fresh(template, work);
        const rss = peakRssOurs(['img', job, 'top.qcow2'], work) / 1024; // one more run, not timed
        const vs = job === 'stream' ? "qemu-img rebase -b ''" : 'qemu-img commit';
        const [a, b, j] = [median(ourMs), median(theirMs), median(jobMs)];
        console.log(`${label} ${job.padEnd(6)}: ours ${(a / 1000).toFixed(2)} s, ${vs} ${(b / 1000).toFixed(2)} s, ratio ${(a / b).toFixed(2)}; ` +
          `the job alone (as the broker runs it) ${(j / 1000).toFixed(2)} s, ratio ${(j / b).toFixed(2)}; our peak RSS ${rss.toFixed(0)} MiB (median of ${rounds})`);
      }
      rmSync(template, { recursive: true, force: true });
    }
  } finally {
    rmSync(work0, { recursive: true, force: true });
  }
}

await main();
