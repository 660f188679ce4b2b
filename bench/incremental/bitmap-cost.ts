/**
 * bench/incremental.ts, part 1: what one enabled persistent dirty bitmap costs the write path.
 *
 * One base image (the volume's size and layout: by default 4 GiB with 1 GiB allocated, the first
 * MiB of every 4 MiB) made by our engine, copied four times: ours without a bitmap, ours with one
 * (`img.bitmaps.add('b0')`: enabled, 64 KiB granularity), QEMU's without, QEMU's with one
 * (`qemu-img bitmap --add`). Each round, every file gets the same two batches of 4 KiB writes at
 * random 4 KiB-aligned offsets (a seeded sequence per round and batch, the same for all four):
 *   in place    offsets inside the allocated MiBs (the cheapest write: no allocation);
 *   allocating  offsets in the unallocated MiBs (mostly a new cluster each).
 * Ours: in this process (openImage read-write with deferred metadata, as `offload img io` and
 * QEMU's metadata cache; no flush between writes). QEMU: one `qemu-io -t writeback` process per
 * file and round, fed the same writes as `write -q -P 0x5a OFF 4096` lines on its stdin (then
 * `read 0 512`, whose answer ends the slice; stdin unbuffered, see QemuIo.open — its byte-by-byte
 * reads of the commands count in both of QEMU's columns alike). The four files are open at once, and each batch is
 * cut into slices of `slice` writes that go to the four in turn (the order rotating slice by
 * slice): this VM's other load (other processes take half its CPU at times, and a pass of the
 * same writes varies 3× from one second to the next) falls on all four alike. A batch's time is
 * the sum of its slices; each round also times the opens (ours: the bitmap loaded and claimed)
 * and the closes (the bitmap stored; qemu-io: `quit` to exit). Figures are medians of the rounds,
 * ratios medians of the per-round ratios (bitmap / none).
 * At the end: each bitmap covers every write made to its file (ours and QEMU's, read through our
 * engine), `qemu-img info` reads ours as enabled and consistent, `qemu-img check` finds all four
 * files clean.
 */
import { spawn, spawnSync, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { createImage, openImage, type Image } from '../../plugins/qcow2/engine/index.js';
import { median } from '../harness.js';
import { BLOCK, GRANULE, MiB, fmtBytes, layout, ms, rng } from './common.js';

export interface BitmapCostSettings {
  size: number;
  allocated: number;
  /** 4 KiB writes per batch. */
  writes: number;
  /** Writes per slice (the four files take turns slice by slice). */
  slice: number;
  rounds: number;
  qemu: boolean;
}

interface Pair { none: number; bitmap: number }
interface PairRatio extends Pair {
  /** Median over the rounds of bitmap / none (each round's sums). */
  ratio: number;
}
interface BatchRatio extends PairRatio {
  /** Median over every slice of bitmap / none, the two slices written one right after the other. */
  sliceRatio: number;
}

export interface BitmapCostResult {
  settings: BitmapCostSettings;
  ours: {
    inPlaceMs: BatchRatio;
    allocatingMs: BatchRatio;
    openMs: Pair;
    closeMs: Pair;
    /** open + both batches + close. */
    wholeMs: PairRatio;
    /** The bitmap's own work per write, `mark()` alone (µs). */
    markUs: number;
  };
  qemu?: {
    inPlaceMs: BatchRatio;
    allocatingMs: BatchRatio;
    /** Process start to its first prompt (the image open, the bitmap loaded and claimed). */
    openMs: Pair;
    /** `quit` to exit (the bitmap stored). */
    closeMs: Pair;
    wholeMs: PairRatio;
  };
  qemuNote?: string;
  checks: string;
  perRound: Record<string, number[]>;
}

type Batch = 'inPlace' | 'allocating';
const BATCHES: Batch[] = ['inPlace', 'allocating'];

/** `s.writes` 4 KiB-aligned offsets of a batch, the same for a given round and batch. */
function offsets(s: BitmapCostSettings, batch: Batch, round: number): number[] {
  const { chunks, stride } = layout(s.size, s.allocated);
  const r = rng(0x17 + round * 2 + (batch === 'allocating' ? 1 : 0));
  const out: number[] = [];
  for (let i = 0; i < s.writes; i++) {
    const chunk = Math.floor(r() * chunks) * stride;
    if (batch === 'inPlace') out.push(chunk + Math.floor(r() * (MiB / BLOCK)) * BLOCK);
    else out.push(chunk + MiB + Math.floor(r() * ((stride - MiB) / BLOCK)) * BLOCK);
  }
  return out;
}

function run(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 64 << 20 });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.status}): ${r.stderr || r.stdout}`);
  return r.stdout;
}

/** One qemu-io process on a file, driven over its stdin: `batch` sends writes and waits for the sentinel read's answer. */
class QemuIo {
  private out = '';
  private seen = 0;
  private waiter: { count: number; resolve: () => void } | undefined;
  private exited: Promise<number | null>;
  private err = '';

  private constructor(private readonly p: ChildProcessWithoutNullStreams, private readonly file: string) {
    p.stdout.setEncoding('utf8');
    p.stderr.setEncoding('utf8');
    p.stdout.on('data', (d: string) => {
      this.out += d;
      // Count the sentinel reads' answers; keep only the tail (a line may arrive in pieces).
      let i: number;
      while ((i = this.out.indexOf('read 512/512 bytes')) >= 0) {
        this.seen++;
        this.out = this.out.slice(i + 18);
      }
      if (this.out.length > 4096) this.out = this.out.slice(-64);
      if (this.waiter && this.seen >= this.waiter.count) {
        const w = this.waiter;
        this.waiter = undefined;
        w.resolve();
      }
    });
    p.stderr.on('data', (d: string) => { this.err += d; });
    this.exited = new Promise((r) => p.on('exit', (code) => r(code)));
  }

  /** Start it and wait for its first prompt (the image is open); resolves with the time taken. */
  static async open(file: string): Promise<{ q: QemuIo; ms: number }> {
    const t0 = process.hrtime.bigint();
    // stdbuf: stdout line-buffered (its answers reach us as it gives them, not when its buffer
    // fills) and stdin unbuffered: qemu-io waits for stdin to be readable before each command and
    // then fgets() one line, so lines that stdio had already buffered would wait for more input.
    const p = spawn('stdbuf', ['-oL', '-i0', 'qemu-io', '-f', 'qcow2', '-t', 'writeback', file], { stdio: ['pipe', 'pipe', 'pipe'] });
    const q = new QemuIo(p, file);
    await q.batch([]);
    return { q, ms: ms(t0) };
  }

  async batch(offs: number[]): Promise<void> {
    const want = this.seen + 1;
    const done = new Promise<void>((resolve, reject) => {
      this.waiter = { count: want, resolve };
      void this.exited.then((code) => reject(new Error(`qemu-io on ${this.file} exited (${code}): ${this.err.slice(0, 400)}`)));
    });
    this.p.stdin.write(`${offs.map((o) => `write -q -P 0x5a ${o} ${BLOCK}\n`).join('')}read 0 512\n`);
    await done;
    if (/error|failed/i.test(this.err)) throw new Error(`qemu-io on ${this.file}: ${this.err.slice(0, 400)}`);
  }

  /** `quit`, and wait for the exit; resolves with the time taken. */
  async close(): Promise<number> {
    const t0 = process.hrtime.bigint();
    this.p.stdin.end('quit\n');
    const code = await this.exited;
    if (code !== 0 || /error|failed/i.test(this.err)) throw new Error(`qemu-io on ${this.file} exited (${code}): ${this.err.slice(0, 400)}`);
    return ms(t0);
  }

  kill(): void {
    if (this.p.exitCode === null) this.p.kill('SIGKILL');
  }
}

/** One of the four files as a writer: open, write a slice, close — each timed by the caller. */
interface Way {
  key: string;
  open(): Promise<number>;
  slice(offs: number[]): Promise<void>;
  close(): Promise<number>;
  abort(): void;
}

export async function bitmapCost(dir: string, s: BitmapCostSettings, say: (line: string) => void): Promise<BitmapCostResult> {
  const base = join(dir, 'base.qcow2');
  const { chunks, stride } = layout(s.size, s.allocated);
  {
    const t0 = process.hrtime.bigint();
    await createImage(base, { size: s.size });
    const img = await openImage(base, { readOnly: false, deferMetadata: true });
    try {
      for (let i = 0; i < chunks; i++) await img.write(i * stride, new Uint8Array(MiB).fill((i % 250) + 1));
    } finally {
      await img.close();
    }
    say(`  bitmap cost: base image of ${fmtBytes(s.size)} with ${fmtBytes(chunks * MiB)} allocated made in ${ms(t0).toFixed(0)} ms`);
  }
  const file = (who: 'ours' | 'qemu', bm: boolean) => join(dir, `${who}-${bm ? 'bitmap' : 'none'}.qcow2`);
  const haveQemu = s.qemu && spawnSync('stdbuf', ['-oL', 'qemu-io', '--version']).status === 0 && spawnSync('qemu-img', ['--version']).status === 0;
  const qemuNote = !s.qemu ? 'left out (--no-qemu)' : !haveQemu ? 'qemu-io / qemu-img (or stdbuf) not installed (apt-get install qemu-utils coreutils)' : undefined;
  const whos = haveQemu ? (['ours', 'qemu'] as const) : (['ours'] as const);
  for (const who of whos) for (const bm of [false, true]) copyFileSync(base, file(who, bm));
  {
    const img = await openImage(file('ours', true), { readOnly: false });
    await img.bitmaps.add('b0');
    await img.close();
  }
  if (haveQemu) run('qemu-img', ['bitmap', '--add', file('qemu', true), 'b0']);
  spawnSync('sync');

  const data = new Uint8Array(BLOCK).fill(0x5a);
  const oursWay = (bm: boolean): Way => {
    let img: Image | undefined;
    return {
      key: `ours.${bm ? 'bitmap' : 'none'}`,
      async open() {
        const t0 = process.hrtime.bigint();
        img = await openImage(file('ours', bm), { readOnly: false, deferMetadata: true });
        return ms(t0);
      },
      async slice(offs) {
        for (const o of offs) await img!.write(o, data);
      },
      async close() {
        const t0 = process.hrtime.bigint();
        await img!.close();
        return ms(t0);
      },
      abort() {
        void img?.close().catch(() => undefined);
      },
    };
  };
  const qemuWay = (bm: boolean): Way => {
    let q: QemuIo | undefined;
    return {
      key: `qemu.${bm ? 'bitmap' : 'none'}`,
      async open() {
        const r = await QemuIo.open(file('qemu', bm));
        q = r.q;
        return r.ms;
      },
      slice: (offs) => q!.batch(offs),
      close: () => q!.close(),
      abort: () => q?.kill(),
    };
  };
  const ways: Way[] = [oursWay(false), oursWay(true)];
  if (haveQemu) ways.push(qemuWay(false), qemuWay(true));

  const per: Record<string, number[]> = {};
  const push = (k: string, v: number) => (per[k] ??= []).push(v);

  /** One round: open the four, the two batches slice by slice in turn, close the four. */
  const round = async (r: number, counted: boolean) => {
    const times: Record<string, number> = {};
    const add = (k: string, v: number) => { times[k] = (times[k] ?? 0) + v; };
    try {
      for (const w of ways) add(`${w.key}.open`, await w.open());
      let turn = r;
      for (const batch of BATCHES) {
        const offs = offsets(s, batch, counted ? r : 1000 + r);
        for (let i = 0; i < offs.length; i += s.slice, turn++) {
          const part = offs.slice(i, i + s.slice);
          const took: Record<string, number> = {};
          for (let k = 0; k < ways.length; k++) {
            const w = ways[(turn + k) % ways.length]!;
            const t0 = process.hrtime.bigint();
            await w.slice(part);
            took[w.key] = ms(t0);
            add(`${w.key}.${batch}`, took[w.key]!);
          }
          if (counted) for (const who of whos) push(`${who}.${batch}.sliceRatio`, took[`${who}.bitmap`]! / took[`${who}.none`]!);
        }
      }
      for (const w of ways) add(`${w.key}.close`, await w.close());
    } catch (e) {
      for (const w of ways) w.abort();
      throw e;
    }
    if (!counted) return;
    for (const w of ways) add(`${w.key}.whole`, ['open', ...BATCHES, 'close'].reduce((n, k) => n + times[`${w.key}.${k}`]!, 0));
    for (const [k, v] of Object.entries(times)) push(k, v);
    const t = (k: string) => times[k]!.toFixed(0);
    say(`  bitmap cost round ${r + 1}/${s.rounds} (ms, none / bitmap): ours in place ${t('ours.none.inPlace')} / ${t('ours.bitmap.inPlace')}, allocating ${t('ours.none.allocating')} / ${t('ours.bitmap.allocating')}` +
      (haveQemu ? `; qemu-io in place ${t('qemu.none.inPlace')} / ${t('qemu.bitmap.inPlace')}, allocating ${t('qemu.none.allocating')} / ${t('qemu.bitmap.allocating')}` : ''));
  };

  // Warm-up, not counted (V8 compiles the write path, qemu-io's binary and the files' metadata come into the cache): a tenth of a round.
  {
    const full = s.writes;
    s.writes = Math.max(s.slice, Math.floor(full / 10));
    try { await round(0, false); } finally { s.writes = full; }
  }
  for (let r = 0; r < s.rounds; r++) await round(r, true);

  // The mark alone: what the bitmap adds to each write (µs), on the bits of the bitmap of the file.
  let markUs = NaN;
  {
    const img = await openImage(file('ours', true), { readOnly: false });
    try {
      // img.bitmaps is the engine's Bitmaps object (engine/bitmaps.ts), whose mark() Qcow2Image.write calls first.
      const bm = img.bitmaps as unknown as { mark?(o: number, l: number): void };
      const offs = offsets(s, 'allocating', 0);
      if (typeof bm.mark === 'function') {
        for (const o of offs) bm.mark(o, BLOCK);
        const n = 20;
        const t0 = process.hrtime.bigint();
        for (let k = 0; k < n; k++) for (const o of offs) bm.mark(o, BLOCK);
        markUs = (ms(t0) * 1000) / (n * offs.length);
      }
    } finally {
      await img.close();
    }
  }

  // Checks: each bitmap covers the writes made to its file; qemu-img reads ours; every file is clean.
  const written: number[] = [];
  for (let r = 0; r < s.rounds; r++) for (const b of BATCHES) written.push(...offsets(s, b, r));
  const covers = async (f: string, who: string) => {
    const img = await openImage(f);
    try {
      const info = await img.bitmaps.info();
      if (info.length !== 1) throw new Error(`${who}: ${info.length} bitmaps, 1 expected`);
      const ext = await img.bitmaps.dirtyExtents('b0');
      let j = 0;
      const missed = [...written].sort((a, b) => a - b).filter((o) => {
        while (j < ext.length && ext[j]!.offset + ext[j]!.length <= o) j++;
        return !(j < ext.length && ext[j]!.offset <= o && o + BLOCK <= ext[j]!.offset + ext[j]!.length);
      });
      if (missed.length) throw new Error(`${who}'s bitmap misses ${missed.length} of ${written.length} writes (first at ${missed[0]})`);
      return ext.reduce((n, e) => n + e.length, 0);
    } finally {
      await img.close();
    }
  };
  const oursDirty = await covers(file('ours', true), 'ours');
  let checks = `our bitmap marks ${fmtBytes(oursDirty)} (${oursDirty / GRANULE} granules) and covers all ${written.length} timed writes`;
  if (haveQemu) {
    const qemuDirty = await covers(file('qemu', true), 'QEMU');
    checks += `; QEMU's marks ${fmtBytes(qemuDirty)} and covers them too (read by our engine)`;
    const info = JSON.parse(run('qemu-img', ['info', '--output=json', file('ours', true)])) as { 'format-specific'?: { data?: { bitmaps?: { name: string; flags: string[] }[] } } };
    const bms = info['format-specific']?.data?.bitmaps ?? [];
    if (bms.length !== 1 || bms[0]!.name !== 'b0' || bms[0]!.flags.includes('in-use') || !bms[0]!.flags.includes('auto')) {
      throw new Error(`qemu-img info on our image: bitmaps ${JSON.stringify(bms)}, expected b0 [auto]`);
    }
    for (const who of whos) for (const bm of [false, true]) run('qemu-img', ['check', '-q', file(who, bm)]);
    checks += '; qemu-img info reads our b0 as [auto] (not in-use), qemu-img check finds all four files clean';
  } else {
    const img = await openImage(file('ours', true));
    try {
      const c = await img.check();
      if ((c as { corruptions?: number }).corruptions) throw new Error(`our image with a bitmap: check found corruptions ${JSON.stringify(c)}`);
    } finally {
      await img.close();
    }
  }
  say(`  bitmap cost checks: ${checks}`);

  const m = (k: string) => median(per[k]!);
  const pair = (who: string, what: string): Pair => ({ none: m(`${who}.none.${what}`), bitmap: m(`${who}.bitmap.${what}`) });
  const pr = (who: string, what: string): PairRatio => ({
    ...pair(who, what), ratio: median(per[`${who}.bitmap.${what}`]!.map((x, i) => x / per[`${who}.none.${what}`]![i]!)),
  });
  const br = (who: string, what: Batch): BatchRatio => ({ ...pr(who, what), sliceRatio: median(per[`${who}.${what}.sliceRatio`]!) });
  const res: BitmapCostResult = {
    settings: s,
    ours: {
      inPlaceMs: br('ours', 'inPlace'), allocatingMs: br('ours', 'allocating'),
      openMs: pair('ours', 'open'), closeMs: pair('ours', 'close'), wholeMs: pr('ours', 'whole'), markUs,
    },
    checks,
    perRound: per,
  };
  if (haveQemu) {
    res.qemu = {
      inPlaceMs: br('qemu', 'inPlace'), allocatingMs: br('qemu', 'allocating'),
      openMs: pair('qemu', 'open'), closeMs: pair('qemu', 'close'), wholeMs: pr('qemu', 'whole'),
    };
  }
  if (qemuNote) res.qemuNote = qemuNote;
  return res;
}

export const BITMAP_GOAL = 1.1;

export function reportBitmapCost(r: BitmapCostResult, say: (line: string) => void): void {
  const mark = (x: number) => (x <= BITMAP_GOAL ? '✓' : '✗');
  const n = r.settings.writes;
  const us = (msTotal: number) => `${((msTotal * 1000) / n).toFixed(1)}`;
  say(`\n1. write-path cost of one enabled dirty bitmap (64 KiB granularity) vs none: ${n} × 4 KiB writes at random 4 KiB-aligned offsets per batch, ` +
    `on a ${fmtBytes(r.settings.size)} qcow2 with ${fmtBytes(r.settings.allocated)} allocated; the four files written in turn, ${r.settings.slice} writes at a time; ` +
    `medians of ${r.settings.rounds} rounds; goal bitmap / none ≤ ${BITMAP_GOAL} (✓/✗ on ours)`);
  say('   ratio: median of the per-round ratios of the sums; paired: median of the per-slice ratios (a slice of each, written back to back)');
  const W = 40;
  const c = (v: string, w = 11) => v.padStart(w);
  say(`${'figure'.padEnd(W)}${c('none')}${c('bitmap')}${c('ratio', 9)}${c('paired', 9)}${c('µs/write', 16)}`);
  const row = (what: string, p: Pair, ratio?: number, paired?: number, perWrite = false, goal = false) => {
    const f = (x: number | undefined) => (x === undefined ? '' : `${x.toFixed(3)}${goal ? ` ${mark(x)}` : ''}`);
    say(`${what.padEnd(W)}${c(`${p.none.toFixed(1)} ms`)}${c(`${p.bitmap.toFixed(1)} ms`)}${c(f(ratio), 9)}${c(f(paired), 9)}${c(perWrite ? `${us(p.none)} → ${us(p.bitmap)}` : '', 16)}`);
  };
  const o = r.ours;
  row('ours (in-process), in place', o.inPlaceMs, o.inPlaceMs.ratio, o.inPlaceMs.sliceRatio, true, true);
  row('ours (in-process), allocating', o.allocatingMs, o.allocatingMs.ratio, o.allocatingMs.sliceRatio, true, true);
  row('ours, open (bitmap: load, claim)', o.openMs);
  row('ours, close (bitmap: store)', o.closeMs);
  row('ours, open + both batches + close', o.wholeMs, o.wholeMs.ratio, undefined, false, true);
  say(`${'ours, mark() alone (the bitmap\'s part)'.padEnd(W)}${c('')}${c('')}${c('', 9)}${c('', 9)}${c(`${o.markUs.toFixed(3)}`, 16)}`);
  if (r.qemu) {
    const q = r.qemu;
    row('qemu-io -t writeback, in place', q.inPlaceMs, q.inPlaceMs.ratio, q.inPlaceMs.sliceRatio, true);
    row('qemu-io -t writeback, allocating', q.allocatingMs, q.allocatingMs.ratio, q.allocatingMs.sliceRatio, true);
    row('qemu-io, start to first prompt', q.openMs);
    row('qemu-io, quit to exit', q.closeMs);
    row('qemu-io, open + both batches + close', q.wholeMs, q.wholeMs.ratio);
  } else {
    say(`qemu-io: ${r.qemuNote}`);
  }
  say(`checks: ${r.checks}`);
}
