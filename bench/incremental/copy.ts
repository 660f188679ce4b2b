/**
 * bench/incremental.ts, part 2: an incremental copy (`copy SRC@s2 DST --since s1`) vs a full copy.
 *
 * The source: a volume of `size` (4 GiB) with `allocated` (1 GiB) written as 1 MiB chunks evenly
 * spread (the first MiB of every 4 MiB), on the local qcow2 pool (and with --san on the FlashArray
 * mock too, started in this process); snapshot s1; then `changed` % (1 %) of the allocated data
 * rewritten — whole 64 KiB granules (the pool's cluster size) at random, distinct offsets inside
 * the data, new bytes in each — and snapshot s2. The backend's own answer for what changed
 * (`broker.volumes.changes(SRC@s2, { since: 's1' })`) is timed and checked to cover every
 * rewritten granule.
 * Each round (order of the two copies alternating), into pool volumes made for the round:
 *   full         `broker.copy(SRC@s2, dst)` into a fresh volume (a copy into an existing volume:
 *                the source's data read and written, the rest of the target zeroed without data);
 *   incremental  `broker.copy(SRC@s2, dst2, { since: 's1' })`, where dst2 already holds s1's data
 *                (a full copy of SRC@s1, untimed).
 * Timed from the call to the job's end (wait()); bytes through the host: the job's progress
 * (data bytes read from the source and written to the target), and — pool only, since the SAN
 * mock's HTTP runs in this process too — this process's read/write system-call bytes over the job
 * (/proc/self/io rchar/wchar: data, metadata and the broker's records). Goal: incremental bytes ≤
 * 1.05 × the changed bytes (the backend's answer); also given against the bytes rewritten.
 * The last round checks both targets equal SRC (nothing is written to it after s2) over every
 * range any of the three holds data in.
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { createBroker, silentLogger, type BlockDevice, type Broker, type JobInfo } from '../../core/index.js';
import { startFlashArrayMock } from '../../plugins/flasharray/index.js';
import { builtinPlugins } from '../../plugins/index.js';
import { median } from '../harness.js';
import { GRANULE, MiB, fmtBytes, layout, ms, procIo, rng } from './common.js';

export interface CopySettings {
  size: number;
  allocated: number;
  /** Percent of the allocated data rewritten between s1 and s2. */
  changedPct: number;
  rounds: number;
  /** Also with the FlashArray mock as the source's backend. */
  san: boolean;
}

interface OneCopy { ms: number; progress: number; total: number; rchar: number; wchar: number }

export interface SourceResult {
  source: string;
  /** Bytes rewritten between s1 and s2 (whole granules) and how many granules. */
  writtenBytes: number;
  granules: number;
  /** The backend's answer. */
  changes: { bytes: number; extents: number; granularity: number; ms: number };
  full: OneCopy;
  incremental: OneCopy;
  /** Incremental bytes through the host / changed bytes (goal ≤ 1.05), / bytes rewritten, and incremental / full (time, bytes). */
  bytesVsChanged: number;
  bytesVsWritten: number;
  timeRatio: number;
  bytesRatio: number;
  perRound: { full: OneCopy[]; incremental: OneCopy[] };
  /** Setup times (ms): the source written, the untimed copy of s1 (median). */
  setup: { writeMs: number; s1CopyMs: number };
  verified: string;
}

export interface CopyBenchResult { settings: CopySettings; sources: SourceResult[]; notes: string[] }

export const COPY_GOAL = 1.05;

async function withDevice<T>(broker: Broker, ref: string, mode: 'r' | 'rw', fn: (d: BlockDevice) => Promise<T>): Promise<T> {
  const dev = await broker.volumes.open(ref, mode);
  try {
    return await fn(dev);
  } finally {
    await dev.close();
  }
}

async function runCopy(broker: Broker, source: string, target: string, opts: { since?: string }, measure: boolean): Promise<OneCopy> {
  const io0 = measure ? procIo() : { rchar: NaN, wchar: NaN };
  const t0 = process.hrtime.bigint();
  const job = await broker.copy(source, target, opts);
  const info: JobInfo = await job.wait();
  const t = ms(t0);
  const io1 = measure ? procIo() : { rchar: NaN, wchar: NaN };
  if (info.error) throw new Error(`copy ${source} → ${target}${opts.since ? ` since ${opts.since}` : ''} failed: ${info.error.code} ${info.error.message}`);
  return { ms: t, progress: info.progress.current, total: info.progress.total, rchar: io1.rchar - io0.rchar, wchar: io1.wchar - io0.wchar };
}

/** Every range where any of the devices holds data (sorted, merged). */
async function dataRanges(devs: BlockDevice[], size: number): Promise<{ offset: number; length: number }[]> {
  const all: { offset: number; length: number }[] = [];
  for (const d of devs) for (const e of await d.extents(0, size)) if (e.kind === 'data') all.push({ offset: e.offset, length: e.length });
  all.sort((a, b) => a.offset - b.offset);
  const out: { offset: number; length: number }[] = [];
  for (const r of all) {
    const last = out[out.length - 1];
    if (last && r.offset <= last.offset + last.length) last.length = Math.max(last.length, r.offset + r.length - last.offset);
    else out.push({ ...r });
  }
  return out;
}

/** The targets equal the source over every range any of them holds data in (elsewhere all read as zeros). */
async function verify(broker: Broker, source: string, targets: string[], size: number): Promise<number> {
  const devs: BlockDevice[] = [];
  try {
    devs.push(await broker.volumes.open(source, 'r'));
    for (const t of targets) devs.push(await broker.volumes.open(t, 'r'));
    const ranges = await dataRanges(devs, size);
    let compared = 0;
    for (const r of ranges) {
      for (let off = r.offset; off < r.offset + r.length; off += 8 * MiB) {
        const n = Math.min(8 * MiB, r.offset + r.length - off);
        const [a, ...bs] = await Promise.all(devs.map((d) => d.read(off, n)));
        const want = Buffer.from(a!.buffer, a!.byteOffset, a!.byteLength);
        bs.forEach((b, i) => {
          const got = Buffer.from(b.buffer, b.byteOffset, b.byteLength);
          if (!want.equals(got)) {
            const at = want.findIndex((x, j) => x !== got[j]);
            throw new Error(`${targets[i]} differs from ${source} at byte ${off + at}`);
          }
        });
        compared += n;
      }
    }
    return compared;
  } finally {
    await Promise.allSettled(devs.map((d) => d.close()));
  }
}

export async function incrementalCopy(dir: string, s: CopySettings, say: (line: string) => void): Promise<CopyBenchResult> {
  const notes: string[] = [];
  mkdirSync(join(dir, 'pool'), { recursive: true });
  const san = s.san ? await startFlashArrayMock({ port: 0 }) : undefined;
  const broker = await createBroker({
    state: join(dir, 'state'),
    backends: [
      { name: 'pool', kind: 'qcow2', path: join(dir, 'pool') },
      ...(san ? [{ name: 'san1', kind: 'flasharray', endpoint: san.url, apiToken: san.apiToken }] : []),
    ],
  } as never, { plugins: builtinPlugins, logger: silentLogger });
  const sources: SourceResult[] = [];
  if (san) notes.push('system-call bytes (rchar/wchar) are given for the pool source only: the SAN mock serves its HTTP from this process, so its side would count too');
  try {
    const { chunks, stride } = layout(s.size, s.allocated);
    const perChunk = MiB / GRANULE;
    const granules = Math.max(1, Math.round((chunks * MiB * s.changedPct) / 100 / GRANULE));
    if (granules > chunks * perChunk) throw new Error(`--changed ${s.changedPct} % is more than the allocated data`);
    // Which granules change: distinct, at random inside the data (the same for every source).
    const pick = rng(0x1717);
    const chosen = new Set<number>();
    while (chosen.size < granules) chosen.add(Math.floor(pick() * chunks * perChunk));
    const changedOffsets = [...chosen].map((g) => Math.floor(g / perChunk) * stride + (g % perChunk) * GRANULE);

    for (const backend of san ? ['pool', 'san1'] : ['pool']) {
      const src = `${backend}/vol`;
      let t0 = process.hrtime.bigint();
      await broker.volumes.create(src, { sizeBytes: s.size });
      await withDevice(broker, src, 'rw', async (d) => {
        for (let i = 0; i < chunks; i++) await d.write(i * stride, new Uint8Array(MiB).fill((i % 250) + 1));
        await d.flush();
      });
      const writeMs = ms(t0);
      await broker.snapshots.create(`${src}@s1`);
      await withDevice(broker, src, 'rw', async (d) => {
        for (const [k, off] of changedOffsets.entries()) {
          const g = new Uint8Array(GRANULE);
          // New bytes, different from the chunk's fill everywhere.
          for (let j = 0; j < GRANULE; j++) g[j] = 251 + ((k + j) % 5);
          await d.write(off, g);
        }
        await d.flush();
      });
      await broker.snapshots.create(`${src}@s2`);
      spawnSync('sync');
      say(`  copy: ${src} ${fmtBytes(s.size)} with ${fmtBytes(chunks * MiB)} written in ${writeMs.toFixed(0)} ms; s1; ${granules} granules of 64 KiB rewritten (${fmtBytes(granules * GRANULE)}); s2`);

      t0 = process.hrtime.bigint();
      const ch = await broker.volumes.changes(`${src}@s2`, { since: 's1' });
      const changesMs = ms(t0);
      const changedBytes = ch.extents.reduce((n, e) => n + e.length, 0);
      const missed = changedOffsets.filter((o) => !ch.extents.some((e) => e.offset <= o && o + GRANULE <= e.offset + e.length));
      if (missed.length) throw new Error(`${src}: the backend's changes since s1 miss ${missed.length} of the ${granules} rewritten granules`);

      const full: OneCopy[] = [];
      const incr: OneCopy[] = [];
      const s1Copies: number[] = [];
      let verified = '';
      const measureIo = backend === 'pool';
      for (let r = 0; r < s.rounds; r++) {
        const dst = `pool/${backend}-full-${r}`;
        const dst2 = `pool/${backend}-incr-${r}`;
        await broker.volumes.create(dst, { sizeBytes: s.size });
        await broker.volumes.create(dst2, { sizeBytes: s.size });
        s1Copies.push((await runCopy(broker, `${src}@s1`, dst2, {}, false)).ms);
        spawnSync('sync');
        const doFull = async () => { full.push(await runCopy(broker, `${src}@s2`, dst, {}, measureIo)); spawnSync('sync'); };
        const doIncr = async () => { incr.push(await runCopy(broker, `${src}@s2`, dst2, { since: 's1' }, measureIo)); spawnSync('sync'); };
        if (r % 2 === 0) { await doFull(); await doIncr(); } else { await doIncr(); await doFull(); }
        const f = full.at(-1)!;
        const i = incr.at(-1)!;
        say(`  copy round ${r + 1}/${s.rounds} from ${src}@s2: full ${f.ms.toFixed(0)} ms, ${fmtBytes(f.progress)}; incremental ${i.ms.toFixed(0)} ms, ${fmtBytes(i.progress)}`);
        if (r === s.rounds - 1) {
          // The volume is read as it is now: nothing is written to it after s2.
          const n = await verify(broker, src, [dst, dst2], s.size);
          verified = `both targets equal ${src} (= s2: nothing written since) over the ${fmtBytes(n)} where any of the three holds data`;
        }
        await broker.volumes.delete(dst);
        await broker.volumes.delete(dst2);
      }
      const med = (xs: OneCopy[]): OneCopy => ({
        ms: median(xs.map((x) => x.ms)), progress: median(xs.map((x) => x.progress)), total: median(xs.map((x) => x.total)),
        rchar: median(xs.map((x) => x.rchar)), wchar: median(xs.map((x) => x.wchar)),
      });
      const F = med(full);
      const I = med(incr);
      sources.push({
        source: src, writtenBytes: granules * GRANULE, granules,
        changes: { bytes: changedBytes, extents: ch.extents.length, granularity: ch.granularity, ms: changesMs },
        full: F, incremental: I,
        bytesVsChanged: I.progress / changedBytes, bytesVsWritten: I.progress / (granules * GRANULE),
        timeRatio: median(incr.map((x, k) => x.ms / full[k]!.ms)), bytesRatio: I.progress / F.progress,
        perRound: { full, incremental: incr },
        setup: { writeMs, s1CopyMs: median(s1Copies) },
        verified,
      });
    }
  } finally {
    await broker.close();
    await san?.close();
  }
  return { settings: s, sources, notes };
}

export function reportIncrementalCopy(r: CopyBenchResult, say: (line: string) => void): void {
  const s = r.settings;
  const mark = (x: number) => (x <= COPY_GOAL ? '✓' : '✗');
  for (const x of r.sources) {
    say(`\n2. incremental vs full copy from ${x.source}@s2 into pool volumes: ${fmtBytes(s.size)} volume with ${fmtBytes(s.allocated)} allocated; ` +
      `between s1 and s2 ${x.granules} whole 64 KiB granules rewritten at random offsets inside the data (${fmtBytes(x.writtenBytes)}, ${s.changedPct} % of the allocated); ` +
      `medians of ${s.rounds} rounds; goal: incremental bytes through the host ≤ ${COPY_GOAL} × the changed bytes`);
    say(`   changes since s1 as the backend says (volumes.changes): ${fmtBytes(x.changes.bytes)} in ${x.changes.extents} extents, granularity ${fmtBytes(x.changes.granularity)}, answered in ${x.changes.ms.toFixed(1)} ms`);
    const W = 46;
    const c = (v: string, w = 14) => v.padStart(w);
    say(`${'figure'.padEnd(W)}${c('full')}${c('incremental')}${c('incr / full')}`);
    const row = (what: string, f: string, i: string, ratio = '') => say(`${what.padEnd(W)}${c(f)}${c(i)}${c(ratio)}`);
    row('time, call to job end (ms)', x.full.ms.toFixed(0), x.incremental.ms.toFixed(0), x.timeRatio.toFixed(3));
    row('bytes through the host (job progress)', fmtBytes(x.full.progress), fmtBytes(x.incremental.progress), x.bytesRatio.toFixed(4));
    row(`  / changed bytes (goal ≤ ${COPY_GOAL})`, (x.full.progress / x.changes.bytes).toFixed(1), `${x.bytesVsChanged.toFixed(3)} ${mark(x.bytesVsChanged)}`);
    row('  / bytes rewritten between s1 and s2', (x.full.progress / x.writtenBytes).toFixed(1), x.bytesVsWritten.toFixed(3));
    if (Number.isFinite(x.full.rchar)) {
      row('syscall bytes read (rchar)', fmtBytes(x.full.rchar), fmtBytes(x.incremental.rchar), (x.incremental.rchar / x.full.rchar).toFixed(4));
      row('syscall bytes written (wchar)', fmtBytes(x.full.wchar), fmtBytes(x.incremental.wchar), (x.incremental.wchar / x.full.wchar).toFixed(4));
    }
    say(`   untimed: source written in ${x.setup.writeMs.toFixed(0)} ms; dst2 given s1's data by a full copy of ${x.source}@s1 in ${x.setup.s1CopyMs.toFixed(0)} ms (median)`);
    say(`   check: ${x.verified}`);
  }
  for (const n of r.notes) say(`note: ${n}`);
}
