/**
 * A guest for live jobs: writes at random over NBD (raw protocol, one request in flight per
 * connection) and keeps a model of every write the server acknowledged. Each connection owns
 * its own 64 KiB stripes (stripe index mod connections), so the model is exact however the
 * connections interleave; each also reads back what it wrote now and then, which catches a
 * stale read (after a switch-over, say) at once.
 */
import { CMD_FLAG } from '../../core/export/nbd-protocol.js';
import { CMD, openExport, readData, reply, request, type Opened } from './nbd-client.js';

const STRIPE = 64 * 1024;

export interface NbdWriterOptions {
  port: number;
  name: string;
  connections?: number;
  /** Bytes per write (default 4 KiB, 512-aligned offsets within a stripe). */
  writeBytes?: number;
  /** Pause between one connection's writes (ms; default 1). */
  pauseMs?: number;
  /** Told of every acknowledged write (a crash test logs them). */
  onAck?(offset: number, data: Buffer): void;
  /** Send each write with FUA: acknowledged means durable (a crash test's writer). */
  fua?: boolean;
  /** Write within the first `span` bytes only (default: the whole volume). */
  span?: number;
}

export class NbdWriter {
  readonly model: Buffer;
  /** Offsets written at least once (so a comparison can skip what was never written by the writer). */
  acked = 0;
  readBacks = 0;
  /** Each connection's write in flight (sent, not acknowledged): after a crash it may or may not have landed. */
  readonly pending = new Map<number, { offset: number; data: Buffer }>();
  private stopping = false;
  private readonly loops: Promise<void>[] = [];
  private failure: Error | undefined;

  private constructor(private readonly o: NbdWriterOptions, private readonly conns: Opened[], base: Buffer) {
    this.model = base;
  }

  /** Connect and start writing; `base` is what the volume holds now (the model starts from it). */
  static async start(o: NbdWriterOptions, base: Buffer): Promise<NbdWriter> {
    const n = o.connections ?? 2;
    const conns: Opened[] = [];
    for (let i = 0; i < n; i++) conns.push(await openExport(o.port, o.name));
    const w = new NbdWriter(o, conns, Buffer.from(base));
    conns.forEach((c, i) => w.loops.push(w.loop(c, i, n)));
    return w;
  }

  get failed(): Error | undefined {
    return this.failure;
  }

  /** Stop writing; rejects with the first error a connection met (an NBD error reply, a stale read, a hang-up). */
  async stop(): Promise<void> {
    this.stopping = true;
    await Promise.all(this.loops);
    for (const c of this.conns) {
      if (!c.wire.closed) request(c.wire, CMD.DISC, 0, 0);
      c.wire.socket.end();
    }
    if (this.failure) throw this.failure;
  }

  /**
   * Where `image` (the volume as read back after a crash) departs from the model: ranges that are
   * neither what was acknowledged nor a write that was in flight (either outcome is allowed).
   */
  lost(image: Buffer): { offset: number; length: number }[] {
    const out: { offset: number; length: number }[] = [];
    const inFlight = [...this.pending.values()];
    for (let off = 0; off < this.model.length; off += 512) {
      const a = image.subarray(off, off + 512);
      if (a.equals(this.model.subarray(off, off + 512))) continue;
      const p = inFlight.find((w) => off >= w.offset && off < w.offset + w.data.length);
      if (p && a.equals(p.data.subarray(off - p.offset, off - p.offset + 512))) continue;
      const last = out[out.length - 1];
      if (last && last.offset + last.length === off) last.length += 512;
      else out.push({ offset: off, length: 512 });
    }
    return out;
  }

  private async loop(c: Opened, index: number, n: number): Promise<void> {
    const len = this.o.writeBytes ?? 4096;
    const stripes = Math.floor((this.o.span ?? this.model.length) / STRIPE);
    let seq = 0;
    try {
      while (!this.stopping) {
        const stripe = index + n * Math.floor(Math.random() * Math.floor((stripes - index + n - 1) / n));
        const offset = stripe * STRIPE + 512 * Math.floor(Math.random() * ((STRIPE - len) / 512 + 1));
        const data = Buffer.alloc(len, ((index * 97 + seq++) % 255) + 1);
        data.writeUInt32BE(seq, 0);
        this.pending.set(index, { offset, data });
        request(c.wire, CMD.WRITE, offset, len, { payload: data, ...(this.o.fua ? { flags: CMD_FLAG.FUA } : {}) });
        const r = await reply(c.wire);
        if (r.error !== 0) throw new Error(`write of ${len} at ${offset} failed: NBD error ${r.error}`);
        data.copy(this.model, offset);
        this.pending.delete(index);
        this.acked++;
        this.o.onAck?.(offset, data);
        if (seq % 8 === 0) {
          request(c.wire, CMD.READ, offset, len);
          const rr = await reply(c.wire, len);
          if (rr.error !== 0) throw new Error(`read of ${len} at ${offset} failed: NBD error ${rr.error}`);
          if (!readData(rr, offset, len).equals(this.model.subarray(offset, offset + len))) throw new Error(`stale read at ${offset}: not what was acknowledged`);
          this.readBacks++;
        }
        if ((this.o.pauseMs ?? 1) > 0) await new Promise((r) => setTimeout(r, this.o.pauseMs ?? 1));
      }
    } catch (e) {
      this.failure ??= e as Error;
    }
  }
}

/**
 * qemu-io as a second guest: 64 KiB writes of a pattern per block at `from`, `from + 64 KiB`, …,
 * in one connection, in order (its exit means every write was acknowledged). Resolves with the
 * writes, for a model; rejects on any qemu-io error.
 */
export async function qemuIoWrites(uri: string, from: number, count: number): Promise<{ offset: number; data: Buffer }[]> {
  const { qemuIo } = await import('./nbd-tools.js');
  const writes = Array.from({ length: count }, (_, i) => ({ offset: from + i * 65536, data: Buffer.alloc(65536, (i % 200) + 40) }));
  await qemuIo(uri, writes.map((w) => `write -P ${w.data[0]} ${w.offset} 64k`));
  return writes;
}
