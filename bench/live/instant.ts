/**
 * Issue 16 item 7, instant clone: how soon the clone is usable, whatever its size, and what a read
 * of a range not copied yet costs. For each size (default 1 GiB and 64 GiB, 256 MiB allocated
 * in 1 MiB pieces spread over the volume) on the local qcow2 pool, and 1 GiB into the SAN mock:
 *   - usable: from `startClone(SRC, DST, { instant })` to `exports.start(DST)` returning (the
 *     clone created, the record of what is pending saved, the export serving) — goal < 1 s;
 *   - reads: 4 KiB random reads of data not yet filled (the fill held at 4 KiB/s) through DST's
 *     export, one in flight, vs the same reads through a read-only export of SRC: p50/p99 and
 *     their ratios (what a VM booting from the clone pays before the fill reaches a range).
 *
 *   node --import tsx bench/live/instant.ts [--sizes 1G,64G] [--allocated 256M] [--reads 2000]
 */
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createBroker, type Broker } from '../../core/index.js';
import { startFlashArrayMock } from '../../plugins/flasharray/index.js';
import { builtinPlugins } from '../../plugins/index.js';
import { CMD, openExport, reply, request } from '../../test/support/nbd-client.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1]! : fallback;
}
function size(s: string): number {
  const m = /^(\d+(?:\.\d+)?)([KMGT]?)$/i.exec(s.trim());
  if (!m) throw new Error(`not a size: ${s}`);
  return Math.round(Number(m[1]) * { '': 1, K: 1024, M: MiB, G: GiB, T: 1024 * GiB }[m[2]!.toUpperCase() as '' | 'K' | 'M' | 'G' | 'T']);
}
const pct = (xs: number[], q: number) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(q * xs.length))]!;

/** `n` random 4 KiB reads within `ranges` through an export: each read's latency (ms). */
async function reads(port: number, name: string, ranges: [number, number][], n: number, seed: number): Promise<number[]> {
  const c = await openExport(port, name);
  let x = seed;
  const rand = () => ((x = (x * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const [o, l] = ranges[Math.floor(rand() * ranges.length)]!;
    const off = o + Math.floor(rand() * (l / 4096)) * 4096;
    const t = performance.now();
    request(c.wire, CMD.READ, off, 4096);
    const r = await reply(c.wire, 4096);
    out.push(performance.now() - t);
    if (r.error !== 0) throw new Error(`read at ${off}: NBD error ${r.error}`);
  }
  request(c.wire, CMD.DISC, 0, 0);
  c.wire.socket.end();
  return out;
}

async function one(broker: Broker, from: string, to: string, bytes: number, allocated: number, n: number): Promise<Record<string, string | number>> {
  await broker.volumes.create(from, { sizeBytes: bytes });
  // 1 MiB pieces spread evenly: a boot reads all over the disk.
  const pieces = Math.max(1, Math.floor(allocated / MiB));
  const stride = Math.floor(bytes / pieces / MiB) * MiB;
  const ranges: [number, number][] = [];
  const dev = await broker.volumes.open(from, 'rw');
  for (let i = 0; i < pieces; i++) {
    await dev.write(i * stride, Buffer.alloc(MiB, (i % 250) + 1));
    ranges.push([i * stride, MiB]);
  }
  await dev.flush();
  await dev.close();

  const t0 = performance.now();
  const started = await broker.startClone(from, to, { instant: true, speed: 4096 });
  const exp = await broker.exports.start(to, { listen: { port: 0 } });
  const usableMs = performance.now() - t0;
  // Reads of the not-yet-filled ranges (the fill is held at 4 KiB/s), then the same through the source's own export.
  const viaClone = await reads(Number(new URL(exp.uri).port), exp.name, ranges, n, 7);
  const srcExp = await broker.exports.start(from, { listen: { port: 0 }, readOnly: true, name: `${from}-ro` }).catch(() => undefined);
  let viaSource: number[] = [];
  if (srcExp) {
    viaSource = await reads(Number(new URL(srcExp.uri).port), srcExp.name, ranges, n, 7);
    await srcExp.stop();
  }
  await broker.jobs.cancel(started.job!.id);
  await started.job!.wait();
  await exp.stopped;
  await broker.volumes.delete(from);
  const row: Record<string, string | number> = {
    clone: `${from} → ${to}`, size: `${(bytes / GiB).toFixed(0)} GiB`, 'usable (ms)': Math.round(usableMs), goal: usableMs < 1000 ? '< 1 s ✓' : '< 1 s ✗',
    'unfilled read p50 (ms)': pct(viaClone, 0.5).toFixed(3), 'p99 (ms)': pct(viaClone, 0.99).toFixed(3),
  };
  if (viaSource.length > 0) {
    row['source read p50 (ms)'] = pct(viaSource, 0.5).toFixed(3);
    row['ratio p50'] = (pct(viaClone, 0.5) / pct(viaSource, 0.5)).toFixed(2);
    row['ratio p99'] = (pct(viaClone, 0.99) / pct(viaSource, 0.99)).toFixed(2);
  }
  return row;
}

export async function runInstant(): Promise<Record<string, string | number>[]> {
  const sizes = arg('sizes', '1G,64G').split(',').map(size);
  const allocated = size(arg('allocated', '256M'));
  const n = Number(arg('reads', '2000'));
  const san = await startFlashArrayMock({ port: 0 });
  const state = mkdtempSync(join(tmpdir(), 'offload-bench-instant-'));
  mkdirSync(join(state, 'pool'));
  const broker = await createBroker({
    state, backends: [{ name: 'local', kind: 'qcow2', path: join(state, 'pool') }, { name: 'san1', kind: 'flasharray', endpoint: san.url, apiToken: san.apiToken }] as never,
  }, { plugins: builtinPlugins });
  const rows: Record<string, string | number>[] = [];
  try {
    let k = 0;
    for (const b of sizes) rows.push(await one(broker, `local/src${++k}`, `local/dst${k}`, b, allocated, n));
    rows.push(await one(broker, `local/src${++k}`, `san1/dst${k}`, sizes[0]!, allocated, n));
  } finally {
    await broker.close();
    await san.close();
    rmSync(state, { recursive: true, force: true });
  }
  return rows;
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const rows = await runInstant();
  console.log('instant clone (issue 16): usable = startClone → exports.start returned; reads = 4 KiB random, one in flight, of ranges not filled yet');
  console.table(rows);
}
