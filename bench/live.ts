/**
 * Issue 16 item 7's benchmark: what a live copy costs the guest that writes to the volume while it
 * runs, and how much it copies. On the local qcow2 pool, a source volume of 1 GiB with 512 MiB
 * allocated (1 MiB every other MiB, as bench/nbd.ts) is exported read-write by an embedded broker
 * (broker.exports); a writer — its own process, as a guest is — sends 4 KiB writes at random
 * 4 KiB-aligned offsets at a FIXED RATE (200/s, scheduled send times, one request in flight per
 * connection) over NBD and measures each write from its send to its reply. Each round, for each
 * mode (`background`, `write-blocking`):
 *   1. the baseline: the writer alone for `--seconds` → p50/p99;
 *   2. `broker.copy(SRC, DST, { live: true, mode })` into a new pool volume while the writer goes on,
 *      until the job is `ready` → time to ready, p50/p99 of the writes sent meanwhile, their ratios
 *      to the baseline, and the bytes the mirror copied (job progress at ready: the bulk pass and
 *      every copy again) / the bytes allocated when it started;
 *   3. `complete` (the export switches over under the writer's connections) → how long the
 *      switch-over took and the longest write sent during it; then a sample of the writes is read
 *      back from the target (a bench that loses writes measures nothing).
 * Goals: p50 and p99 ratios ≤ 1.5 (background), ≤ 3 (write-blocking); copied / allocated ≤ 1.1.
 * Rounds interleave the ways (their order reverses every other round) after a warm-up round that
 * is not counted (V8 compiling the export's and the mirror's code, first touches of memory); figures are medians of
 * the rounds, ratios medians of the per-round ratios.
 *
 * Latency is counted from each write's send (as asked); a write that waits for the one before it
 * is sent late, so the table also gives the p99 counted from the scheduled send (what a guest with
 * a queue sees) and how many sends were late. Also shown, to tell what the copy costs: the
 * serving process's CPU during the copy and (ours) its event loop's delay.
 *
 * Comparison: QEMU's mirror (blockdev-mirror, copy-mode as the row says, sync=top: what is
 * allocated, as ours — sync=full zeroes and counts the whole target: 1.86× the allocated bytes at
 * 256 MiB) on the same kind of file (qemu-img create, 64 KiB clusters, the same layout written by
 * qemu-io), served over NBD by qemu-storage-daemon (its NBD export, page cache as ours, the job
 * driven over QMP, the target opened by blockdev-add); the same writer against it, the same
 * figures; the ratios are each server's to its own baseline. qemu-storage-daemon is in Debian's
 * qemu-system-common (`apt-get download qemu-system-common && dpkg -x qemu-system-common_*.deb DIR`
 * gives a binary that runs next to qemu-utils without installing); without it on PATH (or
 * QEMU_STORAGE_DAEMON=/path/to/it) the table says so in a line of its own.
 *
 *   node --import tsx bench/live.ts                       (1 GiB, 512 MiB allocated, 200 writes/s, 10 s, 3 rounds)
 *   node --import tsx bench/live.ts --size 256M --allocated 128M --seconds 3    (quick: ~35 s, ~70 s with
 *     the QEMU rows; add --rounds 1 for ~25 s)
 * Options: --size, --allocated, --rate (writes/s, all connections together), --connections (1–2
 * or more), --seconds (baseline), --rounds (or OFFLOAD_BENCH_ROUNDS), --modes background,write-blocking,
 * --fua (every write FUA: durable when answered), --speed (the copy's speed limit, e.g. 100M: bytes/s
 * for both mirrors; default none), --hold SECONDS (leave the copy ready that long before `complete`,
 * and give the writes' latency then: a ready copy's write-intent record trims every 4 s, each
 * trim flushing the target and, where the guest wrote, the source), --no-qemu, --json (the figures as JSON on stdout,
 * progress on stderr). OFFLOAD_BENCH_DIR: where the temporary folder goes (default $TMPDIR).
 *
 * Files: this one (options, the rounds, our way, the table); bench/live/writer.ts (the writer's
 * process and its NBD client: forked as `bench/live/writer.ts --writer-child`); bench/live/measure.ts
 * (the phases of a round and what is read from the writes); bench/live/qemu.ts (QEMU's way: finding
 * qemu-storage-daemon, its QMP client); bench/live/common.ts (sizes, the clock, percentiles, the layout).
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { createBroker, silentLogger, type Job, type JobInfo } from '../core/index.js';
import { builtinPlugins } from '../plugins/index.js';
import { median, workDir } from './harness.js';
import { BLOCK, GRANULE, MiB, fmtBytes, layout, parseSize, type Mode, type RoundResult, type Settings } from './live/common.js';
import { lastWrites, measure, type Way } from './live/measure.js';
import { findQsd, qemuWay } from './live/qemu.js';
import { Writer, writeData } from './live/writer.js';

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      size: { type: 'string', default: '1G' },
      allocated: { type: 'string', default: '512M' },
      rate: { type: 'string', default: '200' },
      connections: { type: 'string', default: '1' },
      seconds: { type: 'string', default: '10' },
      rounds: { type: 'string', default: process.env.OFFLOAD_BENCH_ROUNDS ?? '3' },
      modes: { type: 'string', default: 'background,write-blocking' },
      fua: { type: 'boolean', default: false },
      speed: { type: 'string', default: '0' },
      hold: { type: 'string', default: '0' },
      'no-qemu': { type: 'boolean', default: false },
      json: { type: 'boolean', default: false },
    },
    strict: true,
  });
  const s: Settings = {
    size: parseSize(values.size), allocated: parseSize(values.allocated), rate: Number(values.rate),
    connections: Number(values.connections), seconds: Number(values.seconds), fua: values.fua, speed: parseSize(values.speed), hold: Number(values.hold),
  };
  const rounds = Number(values.rounds);
  const modes = values.modes.split(',').map((m) => m.trim()) as Mode[];
  for (const m of modes) if (m !== 'background' && m !== 'write-blocking') throw new Error(`--modes: background and/or write-blocking, got ${m}`);
  if (!(s.rate > 0) || !(s.seconds > 0) || !(rounds >= 1) || !(s.connections >= 1)) throw new Error('--rate, --seconds, --rounds and --connections must be positive');
  if (!(s.hold >= 0)) throw new Error('--hold takes seconds ≥ 0');
  if (s.size % GRANULE) throw new Error('--size must be a multiple of 64 KiB');
  layout(s.size, s.allocated);
  const out = values.json ? process.stderr : process.stdout;
  const say = (line: string) => out.write(`${line}\n`);

  const dir = workDir('offload-bench-live-');
  const closers: (() => Promise<unknown> | unknown)[] = [];
  try {
    mkdirSync(join(dir, 'pool'));
    const broker = await createBroker({ state: join(dir, 'state'), backends: [{ name: 'local', kind: 'qcow2', path: join(dir, 'pool') }] } as never,
      { plugins: builtinPlugins, logger: silentLogger });
    closers.push(() => broker.close());
    const writer = Writer.spawn();
    closers.unshift(() => writer.close());

    /** A source volume as the layout says, its dirty pages written back. */
    const makeSource = async (ref: string, st: Settings) => {
      await broker.volumes.create(ref, { sizeBytes: st.size });
      const { chunks, stride } = layout(st.size, st.allocated);
      const dev = await broker.volumes.open(ref, 'rw');
      try {
        for (let i = 0; i < chunks; i++) await dev.write(i * stride, Buffer.alloc(MiB, (i % 250) + 1));
        await dev.flush();
      } finally {
        await dev.close();
      }
      spawnSync('sync');
    };

    const ours = (mode: Mode): Way => ({
      what: `ours, ${mode}`, kind: 'ours', mode,
      async run(st, tag, writer) {
        const src = `local/src-${tag}`;
        const dst = `local/dst-${tag}`;
        await makeSource(src, st);
        const exp = await broker.exports.start(src, { listen: { port: 0 } });
        let job: Job | undefined;
        let r: Awaited<ReturnType<typeof measure>>;
        try {
          const cpuMs = () => {
            const u = process.cpuUsage();
            return (u.user + u.system) / 1000;
          };
          r = await measure(st, writer, { port: Number(new URL(exp.uri).port), name: exp.name, cpuMs, inProcess: true }, {
            async start() {
              job = await broker.copy(src, dst, { live: true, mode, ...(st.speed ? { speed: st.speed } : {}) });
            },
            async ready() {
              const j = job!;
              // The job runs in this process: its info is live; ready is an event.
              return new Promise<number>((resolve, reject) => {
                const check = (info: JobInfo): boolean => {
                  if (info.status === 'ready') resolve(info.progress.current);
                  else if (info.status === 'concluded') reject(new Error(`the live copy ended before ready: ${JSON.stringify(info.error)}`));
                  else return false;
                  return true;
                };
                const off = j.on((e) => {
                  if (check(e.job)) off();
                });
                if (check(j.info())) off();
              });
            },
            async complete() {
              await broker.jobs.complete(job!.id);
              const info = await job!.wait();
              if (info.error) throw new Error(`the live copy failed at its switch-over: ${info.error.message}`);
            },
          });
        } catch (e) {
          if (job && job.info().status !== 'concluded') await job.cancel().catch(() => undefined);
          await exp.stop().catch(() => undefined);
          throw e;
        }
        await exp.stop();
        // The target holds every write: a sample of the last ones to each offset, read back.
        const last = [...lastWrites(r.samples).values()];
        const dev = await broker.volumes.open(dst, 'r');
        try {
          for (let i = 0; i < last.length; i += Math.max(1, Math.floor(last.length / 256))) {
            const x = last[i]!;
            const got = Buffer.from(await dev.read(x[3], BLOCK));
            if (!got.equals(writeData(x[4], x[5]))) throw new Error(`${dst} does not hold write ${x[5]} of connection ${x[4]} at ${x[3]}`);
          }
        } finally {
          await dev.close();
        }
        await broker.volumes.delete(src);
        await broker.volumes.delete(dst);
        spawnSync('sync');
        return r;
      },
    });

    const ways: Way[] = modes.map(ours);
    const qsd = values['no-qemu'] ? undefined : findQsd();
    let qemuNote: string | undefined;
    if (values['no-qemu']) qemuNote = 'left out (--no-qemu)';
    else if (!qsd) {
      qemuNote = 'not available on this machine: neither qemu-storage-daemon nor qemu-system-x86_64 is installed (QEMU\'s mirror needs a QMP monitor; qemu-img/qemu-nbd have none). ' +
        'Install qemu-system-common (Debian), or set QEMU_STORAGE_DAEMON=/path/to/qemu-storage-daemon';
    } else if (spawnSync('qemu-img', ['--version']).status !== 0) {
      qemuNote = 'not available: qemu-img (to make the files) is not installed';
    } else {
      for (const m of modes) ways.push(qemuWay(m, qsd, dir));
    }

    say(`live copy bench in ${dir}: ${fmtBytes(s.size)} volume, ${fmtBytes(s.allocated)} allocated; ${s.rate} writes/s of 4 KiB over ${s.connections} connection(s)${s.fua ? ' (FUA)' : ''}; baseline ${s.seconds} s; ${rounds} round(s)${s.speed ? `; copies limited to ${fmtBytes(s.speed)}/s` : ''}`);
    // Warm-up, not counted: a full-size round of each of our ways with a short baseline. V8 compiles
    // the export's, the mirror's and the writer's code, and the VM touches the memory the page cache
    // will use: on a VM whose host takes back memory the guest leaves idle (this one: DAMON reclaim),
    // the first copy of the process into fresh page-cache memory took 1.3–1.7 s against 0.65 s for
    // the same copy afterwards, in whichever way ran first.
    {
      const warm: Settings = { ...s, seconds: 1, hold: 0 };
      for (const w of ways.filter((x) => x.kind === 'ours')) {
        await w.run(warm, `warm-${w.mode}`, writer);
        say(`  warm-up: ${w.what} done`);
      }
    }
    const results = ways.map(() => [] as RoundResult[]);
    for (let r = 0; r < rounds; r++) {
      const order = r % 2 === 0 ? ways.map((_, i) => i) : ways.map((_, i) => ways.length - 1 - i);
      for (const i of order) {
        const w = ways[i]!;
        const x = await w.run(s, `r${r}-${i}`, writer);
        results[i]!.push(x);
        say(`  round ${r + 1}/${rounds} ${w.what.padEnd(26)} ready in ${x.readyS.toFixed(2)} s; p50 ${x.baseP50.toFixed(3)} → ${x.copyP50.toFixed(3)} ms, p99 ${x.baseP99.toFixed(3)} → ${x.copyP99.toFixed(3)} ms (max ${x.copyMax.toFixed(1)}); copied ${fmtBytes(x.copied)} of ${fmtBytes(x.allocatedAtStart)}; switch-over ${x.switchMs.toFixed(0)} ms (longest write ${x.switchMaxLatency.toFixed(1)} ms)`);
      }
    }

    // Medians of the rounds; ratios: medians of the per-round ratios.
    const summary = ways.map((w, i) => {
      const rs = results[i]!;
      const med = (f: (x: RoundResult) => number) => median(rs.map(f));
      return {
        way: w.what, kind: w.kind, mode: w.mode,
        readyS: med((x) => x.readyS),
        baseP50Ms: med((x) => x.baseP50), copyP50Ms: med((x) => x.copyP50), p50Ratio: med((x) => x.copyP50 / x.baseP50),
        baseP99Ms: med((x) => x.baseP99), copyP99Ms: med((x) => x.copyP99), p99Ratio: med((x) => x.copyP99 / x.baseP99),
        copyMaxMs: med((x) => x.copyMax), copyDueP99Ms: med((x) => x.copyDueP99),
        serverCpuPct: med((x) => x.serverCpuPct), loopDelayP99Ms: w.kind === 'ours' ? med((x) => x.loopDelayP99 ?? NaN) : undefined,
        writesDuringCopy: med((x) => x.copyWrites), lateDuringCopy: med((x) => x.copyLate),
        copiedBytes: med((x) => x.copied), allocatedBytes: med((x) => x.allocatedAtStart), copiedRatio: med((x) => x.copied / x.allocatedAtStart),
        switchMs: med((x) => x.switchMs), switchMaxLatencyMs: med((x) => x.switchMaxLatency),
        heldP50Ms: med((x) => x.heldP50), heldP99Ms: med((x) => x.heldP99),
        heldP50Ratio: med((x) => x.heldP50 / x.baseP50), heldP99Ratio: med((x) => x.heldP99 / x.baseP99),
        rounds: rs,
      };
    });

    const goalLatency = (m: Mode) => (m === 'background' ? 1.5 : 3);
    const COPY_GOAL = 1.1;
    const mark = (ok: boolean) => (ok ? '✓' : '✗');
    const W = Math.max(16, ...summary.map((x) => x.way.length + 2));
    const col = (v: string) => v.padStart(W);
    say(`\nlive copy (issue 16): ${fmtBytes(s.size)} qcow2 with ${fmtBytes(s.allocated)} allocated, pool → pool; a writer at ${s.rate}/s (4 KiB random${s.fua ? ', FUA' : ''}, ${s.connections} connection(s), one in flight each)${s.speed ? `, copy speed limit ${fmtBytes(s.speed)}/s` : ''}; medians of ${rounds} round(s)`);
    say(`goals: write latency during the copy / baseline ≤ 1.5 background, ≤ 3 write-blocking (p50 and p99); bytes copied / allocated ≤ ${COPY_GOAL}; ✓/✗ on ours`);
    say(`${'figure'.padEnd(38)}${summary.map((x) => col(x.way)).join('')}`);
    const row = (label: string, f: (x: (typeof summary)[number]) => string) => say(`${label.padEnd(38)}${summary.map((x) => col(f(x))).join('')}`);
    const withMark = (v: string, ok: boolean, x: { kind: string }) => (x.kind === 'ours' ? `${v} ${mark(ok)}` : v);
    row('time to ready (s)', (x) => x.readyS.toFixed(2));
    row('write p50, no copy (ms)', (x) => x.baseP50Ms.toFixed(3));
    row('write p50 during the copy (ms)', (x) => x.copyP50Ms.toFixed(3));
    row('  p50 ratio (goal ≤ 1.5 bg / ≤ 3 wb)', (x) => withMark(x.p50Ratio.toFixed(2), x.p50Ratio <= goalLatency(x.mode), x));
    row('write p99, no copy (ms)', (x) => x.baseP99Ms.toFixed(3));
    row('write p99 during the copy (ms)', (x) => x.copyP99Ms.toFixed(3));
    row('  p99 ratio (goal ≤ 1.5 bg / ≤ 3 wb)', (x) => withMark(x.p99Ratio.toFixed(2), x.p99Ratio <= goalLatency(x.mode), x));
    row('longest write during the copy (ms)', (x) => x.copyMaxMs.toFixed(1));
    row('p99 from the scheduled send (ms)', (x) => x.copyDueP99Ms.toFixed(3));
    row('writes due during the copy (sent late)', (x) => `${x.writesDuringCopy.toFixed(0)} (${x.lateDuringCopy.toFixed(0)})`);
    row('server CPU during the copy (% core)', (x) => x.serverCpuPct.toFixed(0));
    row('broker event-loop delay p99 (ms)', (x) => (x.loopDelayP99Ms === undefined ? '–' : x.loopDelayP99Ms.toFixed(1)));
    row('allocated at the start', (x) => fmtBytes(x.allocatedBytes));
    row('bytes copied at ready', (x) => fmtBytes(x.copiedBytes));
    row(`  copied / allocated (goal ≤ ${COPY_GOAL})`, (x) => withMark(x.copiedRatio.toFixed(3), x.copiedRatio <= COPY_GOAL, x));
    if (s.hold > 0) {
      row(`write p50 held ready ${s.hold} s (ms)`, (x) => x.heldP50Ms.toFixed(3));
      row('  p50 ratio (goal as during the copy)', (x) => withMark(x.heldP50Ratio.toFixed(2), x.heldP50Ratio <= goalLatency(x.mode), x));
      row(`write p99 held ready (ms)`, (x) => x.heldP99Ms.toFixed(3));
      row('  p99 ratio (goal as during the copy)', (x) => withMark(x.heldP99Ratio.toFixed(2), x.heldP99Ratio <= goalLatency(x.mode), x));
    }
    row('switch-over (complete → ended, ms)', (x) => x.switchMs.toFixed(0));
    row('  longest write across it (ms)', (x) => x.switchMaxLatencyMs.toFixed(1));
    if (qemuNote) say(`QEMU's mirror (blockdev-mirror on qemu-storage-daemon): ${qemuNote}`);

    if (values.json) {
      process.stdout.write(`${JSON.stringify({
        settings: { ...s, rounds, modes },
        goals: { latencyRatio: { background: 1.5, 'write-blocking': 3 }, copiedRatio: COPY_GOAL },
        qemu: qemuNote ?? 'measured',
        results: summary,
      }, null, 2)}\n`);
    }
  } finally {
    for (const c of closers) await c();
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
