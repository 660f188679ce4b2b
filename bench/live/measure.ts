/** bench/live.ts's measurement: the phases every way (ours, QEMU's) goes through, and what is read from the writes. */
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { GRANULE, MiB, layout, now, percentile, sleep, type Mode, type RoundResult, type Sample, type Settings } from './common.js';
import type { Writer } from './writer.js';

/** Bytes allocated once these writes have landed: the layout's chunks and every other granule a write touched. */
export function allocatedAfter(s: Settings, writes: Sample[]): number {
  const { chunks, stride } = layout(s.size, s.allocated);
  const extra = new Set<number>();
  for (const w of writes) {
    const off = w[3];
    const i = Math.floor(off / stride);
    const inChunk = i < chunks && off - i * stride < MiB;
    if (!inChunk) extra.add(Math.floor(off / GRANULE));
  }
  return chunks * MiB + extra.size * GRANULE;
}

/** The writes sent between `from` and `to`. */
export function window(samples: Sample[], from: number, to: number): Sample[] {
  return samples.filter((x) => x[0] >= from && x[0] < to);
}

export interface Way {
  what: string;
  kind: 'ours' | 'qemu';
  mode: Mode;
  run(s: Settings, tag: string, writer: Writer): Promise<RoundResult>;
}

/** The phases every way goes through, given how to start, await and complete its copy. */
export async function measure(s: Settings, writer: Writer, served: { port: number; name: string; cpuMs(): number; inProcess: boolean }, copy: {
  start(): Promise<void>;
  /** Resolves at ready with the bytes copied so far. */
  ready(): Promise<number>;
  complete(): Promise<void>;
}): Promise<RoundResult & { samples: Sample[] }> {
  const t0 = await writer.start({ port: served.port, name: served.name, sizeBytes: s.size, rate: s.rate, connections: s.connections, fua: s.fua });
  await sleep(t0 + s.seconds * 1000 - now());
  const loop = served.inProcess ? monitorEventLoopDelay({ resolution: 1 }) : undefined;
  loop?.enable();
  const cpu0 = served.cpuMs();
  const tCopy = now();
  await copy.start();
  const copied = await copy.ready();
  const tReady = now();
  const cpu = served.cpuMs() - cpu0;
  loop?.disable();
  // In sync for a moment, or `hold` seconds (writes go on), then the switch-over under the writer's connections.
  await sleep(Math.max(500, s.hold * 1000));
  const tComplete = now();
  await copy.complete();
  const tDone = now();
  await sleep(300);
  const samples = await writer.stop();
  // The baseline skips its first half second (a new connection, the server's first requests).
  const base = window(samples, t0 + 500, tCopy).map((x) => x[1]);
  const lat = window(samples, tCopy, tReady).map((x) => x[1]);
  const due = samples.filter((x) => x[2] >= tCopy && x[2] < tReady);
  const period = 1000 / s.rate;
  const held = s.hold > 0 ? window(samples, tReady + 500, tComplete).map((x) => x[1]) : [];
  return {
    baseP50: percentile(base, 0.5), baseP99: percentile(base, 0.99),
    copyP50: percentile(lat, 0.5), copyP99: percentile(lat, 0.99), copyMax: Math.max(0, ...lat),
    copyDueP99: percentile(due.map((x) => x[0] + x[1] - x[2]), 0.99),
    copyWrites: due.length, copyLate: due.filter((x) => x[0] - x[2] > period).length,
    readyS: (tReady - tCopy) / 1000,
    copied, allocatedAtStart: allocatedAfter(s, window(samples, 0, tCopy)),
    switchMs: tDone - tComplete,
    heldP50: held.length > 0 ? percentile(held, 0.5) : NaN, heldP99: held.length > 0 ? percentile(held, 0.99) : NaN,
    // Writes in flight at the switch-over's start count too: sent up to one latency before it.
    switchMaxLatency: Math.max(0, ...samples.filter((x) => x[0] < tDone && x[0] + x[1] > tComplete).map((x) => x[1])),
    serverCpuPct: (100 * cpu) / (tReady - tCopy),
    ...(loop ? { loopDelayP99: loop.percentile(99) / 1e6 } : {}),
    samples,
  };
}

/** The last write to each offset (connections own disjoint offsets; within one, the highest sequence). */
export function lastWrites(samples: Sample[]): Map<number, Sample> {
  const last = new Map<number, Sample>();
  for (const x of samples) {
    const p = last.get(x[3]);
    if (!p || x[5] > p[5]) last.set(x[3], x);
  }
  return last;
}
