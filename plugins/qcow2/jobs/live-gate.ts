/**
 * Active commit needs two things the engine does not offer (yet): to learn which ranges live
 * writers change while the job runs (a dirty map), and to swap the image behind an open Image
 * object at the pivot so that callers holding it carry on against the base. The gate wraps the
 * open image's I/O methods on that one object: it marks what writes touch, and at the pivot it
 * holds new calls, waits for those in flight, switches every call and property to the base,
 * and lets the held calls through.
 */
import type { Image } from '../engine/types.js';

const METHODS = ['read', 'write', 'writeZeroes', 'discard', 'blockStatus', 'map', 'resize', 'flush', 'close', 'fileSize', 'check'] as const;
const PROPERTIES = ['path', 'format', 'readOnly', 'virtualSize', 'clusterSize', 'header', 'backing', 'chain', 'snapshots'] as const;

type AnyFn = (...args: unknown[]) => Promise<unknown>;

/** Guest ranges written since they were last taken, at a fixed granularity. */
export class DirtyMap {
  private bits: Uint8Array;
  private wake: (() => void) | undefined;

  constructor(readonly granularity: number, size: number) {
    this.bits = new Uint8Array(Math.ceil(size / granularity / 8) + 1);
  }

  mark(offset: number, length: number): void {
    if (length <= 0) return;
    const first = Math.floor(offset / this.granularity);
    const last = Math.floor((offset + length - 1) / this.granularity);
    if (last >> 3 >= this.bits.length) {
      const grown = new Uint8Array((last >> 3) + 1);
      grown.set(this.bits);
      this.bits = grown;
    }
    for (let b = first; b <= last; b++) this.bits[b >> 3]! |= 1 << (b & 7);
    const w = this.wake;
    this.wake = undefined;
    w?.();
  }

  /**
   * Every dirty run as it is now (each at most maxBytes), cleared. Writes that land later are
   * left for the next call, so a pass ends even while writers keep going.
   */
  takeAll(maxBytes: number): { start: number; end: number }[] {
    const out: { start: number; end: number }[] = [];
    const maxBits = Math.max(1, Math.floor(maxBytes / this.granularity));
    const bits = this.bits;
    for (let i = 0; i < bits.length; i++) {
      if (bits[i] === 0) continue;
      for (let b = i * 8; b < i * 8 + 8; b++) {
        if (!(bits[b >> 3]! & (1 << (b & 7)))) continue;
        bits[b >> 3]! &= ~(1 << (b & 7));
        const last = out[out.length - 1];
        const start = b * this.granularity;
        if (last && last.end === start && (last.end - last.start) / this.granularity < maxBits) last.end = start + this.granularity;
        else out.push({ start, end: start + this.granularity });
      }
    }
    return out;
  }

  empty(): boolean {
    return this.bits.every((x) => x === 0);
  }

  /** Resolves at the next mark. */
  changed(): Promise<void> {
    return new Promise((r) => {
      const prev = this.wake;
      this.wake = () => { prev?.(); r(); };
    });
  }
}

export class LiveGate {
  private target: Image | undefined;
  private inflight = 0;
  private held: { promise: Promise<void>; release: () => void } | undefined;
  private drained: (() => void) | undefined;
  private installed = false;

  constructor(private readonly image: Image, private readonly dirty: DirtyMap) {}

  install(): void {
    const proto = Object.getPrototypeOf(this.image) as Record<string, AnyFn>;
    for (const m of METHODS) {
      const direct = proto[m]!;
      Object.defineProperty(this.image, m, {
        configurable: true, writable: true,
        value: (...args: unknown[]) => this.call(m, args, direct),
      });
    }
    this.installed = true;
  }

  private async call(m: (typeof METHODS)[number], args: unknown[], direct: AnyFn): Promise<unknown> {
    while (this.held) await this.held.promise;
    if (this.target) return (this.target[m] as AnyFn).apply(this.target, args);
    this.inflight++;
    try {
      return await direct.apply(this.image, args);
    } finally {
      this.inflight--;
      this.markFor(m, args);
      if (this.inflight === 0) this.drained?.();
    }
  }

  /** Record what a call may have changed — also when it failed half-way. */
  private markFor(m: string, args: unknown[]): void {
    const off = args[0] as number;
    if (m === 'write') this.dirty.mark(off, (args[1] as Uint8Array | undefined)?.length ?? 0);
    else if (m === 'writeZeroes' || m === 'discard') this.dirty.mark(off, args[1] as number);
  }

  /** Hold new calls and wait until none is in flight. */
  async quiesce(): Promise<void> {
    let release!: () => void;
    const promise = new Promise<void>((r) => { release = r; });
    this.held = { promise, release };
    if (this.inflight > 0) await new Promise<void>((r) => { this.drained = r; });
    this.drained = undefined;
  }

  /** Let held calls through (to the base when switched, else to the image as before). */
  release(): void {
    const h = this.held;
    this.held = undefined;
    h?.release();
  }

  /** From now on every call and property of the image object is the base's. */
  switchTo(base: Image): void {
    this.target = base;
    for (const p of PROPERTIES) {
      Object.defineProperty(this.image, p, { configurable: true, enumerable: true, get: () => base[p] });
    }
  }

  /** Back to the image's own methods (cancel or failure before the pivot). */
  uninstall(): void {
    if (!this.installed || this.target) return;
    for (const m of METHODS) delete (this.image as unknown as Record<string, unknown>)[m];
    this.installed = false;
    this.release();
  }
}
