/** bench/live.ts's shared pieces: sizes, the clock, the settings and results, percentiles, the source's layout. */

export const MiB = 1024 * 1024;
export const BLOCK = 4096;
/** Both the mirror's granularity and the pool's cluster size (64 KiB): what one small write dirties or allocates. */
export const GRANULE = 64 * 1024;

/** Absolute ms (epoch), sub-ms: the same clock in the writer's process and ours. */
export const now = () => performance.timeOrigin + performance.now();
export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, Math.max(0, ms)));

/** One write: send time (abs ms), latency from the send (ms), scheduled send time (abs ms), offset, connection, sequence. */
export type Sample = [sentAt: number, latency: number, due: number, offset: number, conn: number, seq: number];

export type Mode = 'background' | 'write-blocking';

export interface Settings {
  size: number; allocated: number; rate: number; connections: number; seconds: number; fua: boolean;
  /** The copy's speed limit (bytes/s; 0 = none). */
  speed: number;
  /** Seconds the copy is left ready (in sync, mirroring) before the switch-over; measured when > 0. */
  hold: number;
}

/** One way's one round. */
export interface RoundResult {
  /** Latency from the send: the writes sent before the copy (its first half second left out) and during it. */
  baseP50: number; baseP99: number;
  copyP50: number; copyP99: number; copyMax: number;
  /** Latency from the scheduled send (what a guest waiting on its queue sees), the writes due during the copy. */
  copyDueP99: number;
  /** Writes due during the copy, and those sent more than one period late (the one before them still in flight). */
  copyWrites: number; copyLate: number;
  readyS: number;
  copied: number; allocatedAtStart: number;
  switchMs: number; switchMaxLatency: number;
  /** Latency of the writes sent while the copy was held ready (its first half second left out); NaN without --hold. */
  heldP50: number; heldP99: number;
  /** The serving process's CPU during the copy (% of one core); ours: also its event loop's delay, p99 (ms). */
  serverCpuPct: number; loopDelayP99?: number;
}

export function parseSize(s: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?$/i.exec(s.trim());
  if (!m) throw new Error(`not a size: ${s} (e.g. 1G, 512M)`);
  const unit = { '': 1, k: 1024, m: MiB, g: 1024 * MiB, t: 1024 * 1024 * MiB }[m[2]!.toLowerCase() as '' | 'k' | 'm' | 'g' | 't'];
  return Math.round(Number(m[1]) * unit);
}

export function fmtBytes(n: number): string {
  return n >= 1024 * MiB ? `${(n / 1024 / MiB).toFixed(n % (1024 * MiB) ? 2 : 0)} GiB` : `${(n / MiB).toFixed(n % MiB ? 1 : 0)} MiB`;
}

export function percentile(xs: number[], q: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1))]!;
}

/** The 1 MiB chunks the source has written: `allocated / 1 MiB` of them, spread evenly. */
export function layout(size: number, allocated: number): { chunks: number; stride: number } {
  const chunks = Math.floor(allocated / MiB);
  const stride = Math.floor(size / chunks / GRANULE) * GRANULE;
  if (chunks < 1 || stride < MiB) throw new Error(`--allocated must be 1 MiB to --size (got ${allocated} of ${size})`);
  return { chunks, stride };
}
