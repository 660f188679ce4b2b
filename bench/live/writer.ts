/**
 * bench/live.ts's writer: its own process (this file run with `--writer-child`, as a guest is),
 * driven over IPC by the bench's Writer; a minimal NBD client sends the writes.
 */
import { fork, type ChildProcess } from 'node:child_process';
import { connect, type Socket } from 'node:net';
import { fileURLToPath } from 'node:url';
import { CMD, CMD_FLAG, FLAG, HANDSHAKE, IHAVEOPT, NBDMAGIC, OPT, OPTION_REPLY_MAGIC, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC } from '../../core/export/nbd-protocol.js';
import { BLOCK, now, sleep, type Sample } from './common.js';

export interface WriterStart { port: number; name: string; sizeBytes: number; rate: number; connections: number; fua: boolean }
type FromWriter = { type: 'started'; at: number } | { type: 'stopped'; samples: Sample[] } | { type: 'error'; message: string };

/** A minimal NBD client: fixed newstyle, NO_ZEROES, GO, simple replies (no STRUCTURED_REPLY asked), one request in flight. */
class NbdConn {
  private buf: Buffer = Buffer.alloc(0);
  private want: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | undefined;
  private closed: Error | undefined;
  sizeBytes = 0;
  flags = 0;

  private constructor(private readonly socket: Socket) {
    socket.setNoDelay(true);
    socket.on('data', (b: Buffer) => {
      this.buf = this.buf.length === 0 ? b : Buffer.concat([this.buf, b]);
      this.pump();
    });
    const end = (e?: Error) => {
      this.closed ??= e ?? new Error('the server closed the connection');
      const w = this.want;
      this.want = undefined;
      w?.reject(this.closed);
    };
    socket.on('error', end);
    socket.on('close', () => end());
  }

  static async open(port: number, name: string): Promise<NbdConn> {
    const socket = connect(port, '127.0.0.1');
    await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
    const c = new NbdConn(socket);
    const g = await c.read(18);
    if (g.readBigUInt64BE(0) !== NBDMAGIC || g.readBigUInt64BE(8) !== IHAVEOPT) throw new Error('not an NBD server (bad greeting)');
    if (!(g.readUInt16BE(16) & HANDSHAKE.FIXED_NEWSTYLE)) throw new Error('the server is not fixed newstyle');
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(HANDSHAKE.FIXED_NEWSTYLE | HANDSHAKE.NO_ZEROES, 0);
    socket.write(flags);
    // NBD_OPT_GO: name, then no information requests.
    const n = Buffer.from(name, 'utf8');
    const data = Buffer.alloc(4 + n.length + 2);
    data.writeUInt32BE(n.length, 0);
    n.copy(data, 4);
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(IHAVEOPT, 0);
    h.writeUInt32BE(OPT.GO, 8);
    h.writeUInt32BE(data.length, 12);
    socket.write(Buffer.concat([h, data]));
    for (;;) {
      const r = await c.read(20);
      if (r.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) throw new Error('bad option reply magic');
      const type = r.readUInt32BE(12);
      const body = await c.read(r.readUInt32BE(16));
      if (type >= 0x80000000) throw new Error(`GO ${name} refused: 0x${type.toString(16)} ${body.toString()}`);
      if (type === 3 && body.readUInt16BE(0) === 0) { // NBD_REP_INFO, NBD_INFO_EXPORT
        c.sizeBytes = Number(body.readBigUInt64BE(2));
        c.flags = body.readUInt16BE(10);
      }
      if (type === 1) return c; // ACK: transmission
    }
  }

  /** One write; resolves with the time its reply arrived. */
  async write(offset: number, data: Buffer, cookie: bigint, fua: boolean): Promise<number> {
    const h = Buffer.alloc(28);
    h.writeUInt32BE(REQUEST_MAGIC, 0);
    h.writeUInt16BE(fua ? CMD_FLAG.FUA : 0, 4);
    h.writeUInt16BE(CMD.WRITE, 6);
    h.writeBigUInt64BE(cookie, 8);
    h.writeBigUInt64BE(BigInt(offset), 16);
    h.writeUInt32BE(data.length, 24);
    this.socket.cork();
    this.socket.write(h);
    this.socket.write(data);
    this.socket.uncork();
    const r = await this.read(16);
    const at = now();
    if (r.readUInt32BE(0) !== SIMPLE_REPLY_MAGIC) throw new Error(`unexpected reply magic 0x${r.readUInt32BE(0).toString(16)}`);
    if (r.readBigUInt64BE(8) !== cookie) throw new Error('a reply to another request');
    const err = r.readUInt32BE(4);
    if (err !== 0) throw new Error(`write of ${data.length} at ${offset} failed: NBD error ${err}`);
    return at;
  }

  async disconnect(): Promise<void> {
    const h = Buffer.alloc(28);
    h.writeUInt32BE(REQUEST_MAGIC, 0);
    h.writeUInt16BE(CMD.DISC, 6);
    this.socket.end(h);
    await new Promise<void>((r) => (this.socket.destroyed ? r() : this.socket.once('close', () => r())));
  }

  private read(n: number): Promise<Buffer> {
    if (this.want) throw new Error('one read at a time');
    return new Promise<Buffer>((resolve, reject) => {
      this.want = { n, resolve, reject };
      this.pump();
    });
  }

  private pump(): void {
    const w = this.want;
    if (w && this.buf.length >= w.n) {
      this.want = undefined;
      const out = this.buf.subarray(0, w.n);
      this.buf = this.buf.subarray(w.n);
      w.resolve(out);
    } else if (w && this.closed) {
      this.want = undefined;
      w.reject(this.closed);
    }
  }
}

/** What a write carries: its sequence number and connection first, then a non-zero fill. */
export function writeData(conn: number, seq: number): Buffer {
  const b = Buffer.alloc(BLOCK, (seq % 251) + 1);
  b.writeUInt32BE(seq, 0);
  b.writeUInt32BE(conn, 4);
  return b;
}

/** xorshift32, seeded: the same offsets every round and for every way. */
function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13; s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5; s >>>= 0;
    return s;
  };
}

async function writerChild(): Promise<void> {
  let stopping = false;
  let loops: Promise<void>[] = [];
  let conns: NbdConn[] = [];
  let samples: Sample[] = [];
  let failure: Error | undefined;
  const send = (m: FromWriter) => process.send!(m);

  const loop = async (c: NbdConn, i: number, o: WriterStart, t0: number) => {
    const period = 1000 / o.rate;
    // Connection i writes the 4 KiB blocks ≡ i (mod connections): the last write to each offset is known.
    const blocks = Math.floor(o.sizeBytes / BLOCK / o.connections);
    const next = rng(0x2545f491 + i * 7919);
    let k = 0;
    let cookie = 1n;
    while (!stopping) {
      const due = t0 + (k * o.connections + i) * period;
      const wait = due - now();
      if (wait > 0) await sleep(wait);
      if (stopping) break;
      const offset = ((next() % blocks) * o.connections + i) * BLOCK;
      const seq = k + 1;
      const data = writeData(i, seq);
      const sentAt = now();
      const at = await c.write(offset, data, cookie++, o.fua);
      samples.push([sentAt, at - sentAt, due, offset, i, seq]);
      k++;
    }
  };

  process.on('message', (m: { cmd: 'start'; o: WriterStart } | { cmd: 'stop' } | { cmd: 'exit' }) => {
    void (async () => {
      try {
        if (m.cmd === 'start') {
          stopping = false;
          failure = undefined;
          samples = [];
          conns = [];
          for (let i = 0; i < m.o.connections; i++) conns.push(await NbdConn.open(m.o.port, m.o.name));
          if (m.o.fua && !(conns[0]!.flags & FLAG.SEND_FUA)) throw new Error('the export does not take FUA');
          if (conns[0]!.sizeBytes !== m.o.sizeBytes) throw new Error(`the export is ${conns[0]!.sizeBytes} bytes, expected ${m.o.sizeBytes}`);
          const t0 = now() + 20;
          loops = conns.map((c, i) => loop(c, i, m.o, t0).catch((e: unknown) => {
            failure ??= e instanceof Error ? e : new Error(String(e));
            stopping = true;
          }));
          send({ type: 'started', at: t0 });
        } else if (m.cmd === 'stop') {
          stopping = true;
          await Promise.all(loops);
          await Promise.all(conns.map((c) => c.disconnect()));
          if (failure) throw failure;
          send({ type: 'stopped', samples });
        } else {
          process.exit(0);
        }
      } catch (e) {
        send({ type: 'error', message: e instanceof Error ? e.message : String(e) });
      }
    })();
  });
}

/** The parent's handle on the writer process. */
export class Writer {
  private constructor(private readonly child: ChildProcess) {}

  static spawn(): Writer {
    const child = fork(fileURLToPath(import.meta.url), ['--writer-child'], { execArgv: ['--import', 'tsx'], stdio: ['ignore', 'ignore', 'inherit', 'ipc'] });
    return new Writer(child);
  }

  private next(): Promise<FromWriter> {
    return new Promise((resolve, reject) => {
      const exit = (code: number | null) => reject(new Error(`the writer exited (${code})`));
      this.child.once('exit', exit);
      this.child.once('message', (m: FromWriter) => {
        this.child.off('exit', exit);
        if (m.type === 'error') reject(new Error(`writer: ${m.message}`));
        else resolve(m);
      });
    });
  }

  /** Connect and start writing; resolves with the time of the first scheduled send. */
  async start(o: WriterStart): Promise<number> {
    const r = this.next();
    this.child.send({ cmd: 'start', o });
    return ((await r) as { at: number }).at;
  }

  async stop(): Promise<Sample[]> {
    const r = this.next();
    this.child.send({ cmd: 'stop' });
    return ((await r) as { samples: Sample[] }).samples;
  }

  async close(): Promise<void> {
    if (this.child.exitCode !== null) return;
    const exited = new Promise<void>((r) => this.child.once('exit', () => r()));
    this.child.send({ cmd: 'exit' });
    await exited;
  }
}

// The writer's process: this file, forked by Writer.spawn.
if (process.argv.includes('--writer-child')) await writerChild();
