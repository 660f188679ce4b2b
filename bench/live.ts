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
 * Rounds interleave the ways (their order reverses every other round) after a short warm-up round
 * that is not counted (V8 compiling the export's and the mirror's code); figures are medians of
 * the rounds, ratios medians of the per-round ratios.
 *
 * Comparison: QEMU's mirror (blockdev-mirror, sync=top: what is allocated, as ours) on the same
 * kind of file, served over NBD by qemu-storage-daemon (its NBD export, the job driven over QMP),
 * the same writer against it; the same figures. qemu-storage-daemon is in Debian's
 * qemu-system-common; without it on PATH (or QEMU_STORAGE_DAEMON=/path/to/it) the table says so.
 *
 *   node --import tsx bench/live.ts                       (1 GiB, 512 MiB allocated, 200 writes/s, 10 s, 3 rounds)
 *   node --import tsx bench/live.ts --size 256M --allocated 128M --seconds 3 --rounds 1    (a quick run)
 * Options: --size, --allocated, --rate (writes/s, all connections together), --connections (1–2
 * or more), --seconds (baseline), --rounds (or OFFLOAD_BENCH_ROUNDS), --modes background,write-blocking,
 * --fua (every write FUA: durable when answered), --no-qemu, --json (the figures as JSON on stdout,
 * progress on stderr). OFFLOAD_BENCH_DIR: where the temporary folder goes (default $TMPDIR).
 */
import { fork, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { rmSync, mkdirSync, existsSync } from 'node:fs';
import { connect, createServer, type Socket } from 'node:net';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { CMD, CMD_FLAG, FLAG, HANDSHAKE, IHAVEOPT, NBDMAGIC, OPT, OPTION_REPLY_MAGIC, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC } from '../core/export/nbd-protocol.js';

const MiB = 1024 * 1024;
const BLOCK = 4096;
/** Both the mirror's granularity and the pool's cluster size (64 KiB): what one small write dirties or allocates. */
const GRANULE = 64 * 1024;

/** Absolute ms (epoch), sub-ms: the same clock in the writer's process and ours. */
const now = () => performance.timeOrigin + performance.now();
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, Math.max(0, ms)));

// ---------------------------------------------------------------------------------------------
// The writer (a child process: `--writer-child`), driven over IPC.
// ---------------------------------------------------------------------------------------------

interface WriterStart { port: number; name: string; sizeBytes: number; rate: number; connections: number; fua: boolean }
/** One write: send time (abs ms), latency (ms), how late its send was against the schedule (ms), offset, connection, sequence. */
type Sample = [sentAt: number, latency: number, late: number, offset: number, conn: number, seq: number];
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
function writeData(conn: number, seq: number): Buffer {
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
      samples.push([sentAt, at - sentAt, Math.max(0, sentAt - due), offset, i, seq]);
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
class Writer {
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

// ---------------------------------------------------------------------------------------------
// The bench.
// ---------------------------------------------------------------------------------------------

type Mode = 'background' | 'write-blocking';

interface Settings { size: number; allocated: number; rate: number; connections: number; seconds: number; fua: boolean }

/** One way's one round. */
interface RoundResult {
  baseP50: number; baseP99: number;
  copyP50: number; copyP99: number; copyMax: number;
  /** Writes sent during the copy, and those sent late against the schedule (> 1 period). */
  copyWrites: number; copyLate: number;
  readyS: number;
  copied: number; allocatedAtStart: number;
  switchMs: number; switchMaxLatency: number;
}

function parseSize(s: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?$/i.exec(s.trim());
  if (!m) throw new Error(`not a size: ${s} (e.g. 1G, 512M)`);
  const unit = { '': 1, k: 1024, m: MiB, g: 1024 * MiB, t: 1024 * 1024 * MiB }[m[2]!.toLowerCase() as '' | 'k' | 'm' | 'g' | 't'];
  return Math.round(Number(m[1]) * unit);
}

function fmtBytes(n: number): string {
  return n >= 1024 * MiB ? `${(n / 1024 / MiB).toFixed(n % (1024 * MiB) ? 2 : 0)} GiB` : `${(n / MiB).toFixed(n % MiB ? 1 : 0)} MiB`;
}

function percentile(xs: number[], q: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1))]!;
}

/** The 1 MiB chunks the source has written: `allocated / 1 MiB` of them, spread evenly. */
function layout(size: number, allocated: number): { chunks: number; stride: number } {
  const chunks = Math.floor(allocated / MiB);
  const stride = Math.floor(size / chunks / GRANULE) * GRANULE;
  if (chunks < 1 || stride < MiB) throw new Error(`--allocated must be 1 MiB to --size (got ${allocated} of ${size})`);
  return { chunks, stride };
}

/** Bytes allocated once these writes have landed: the layout's chunks and every other granule a write touched. */
function allocatedAfter(s: Settings, writes: Sample[]): number {
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

/** The writes' figures between `from` and `to` (send times). */
function window(samples: Sample[], from: number, to: number): Sample[] {
  return samples.filter((x) => x[0] >= from && x[0] < to);
}

interface Way {
  what: string;
  kind: 'ours' | 'qemu';
  mode: Mode;
  run(s: Settings, tag: string, writer: Writer): Promise<RoundResult>;
}

/** The phases every way goes through, given how to start, await and complete its copy. */
async function measure(s: Settings, writer: Writer, served: { port: number; name: string }, copy: {
  start(): Promise<void>;
  /** Resolves at ready with the bytes copied so far. */
  ready(): Promise<number>;
  complete(): Promise<void>;
}): Promise<RoundResult & { samples: Sample[] }> {
  const t0 = await writer.start({ port: served.port, name: served.name, sizeBytes: s.size, rate: s.rate, connections: s.connections, fua: s.fua });
  await sleep(t0 + s.seconds * 1000 - now());
  const tCopy = now();
  await copy.start();
  const copied = await copy.ready();
  const tReady = now();
  // In sync for a moment (writes go on), then the switch-over under the writer's connections.
  await sleep(500);
  if (process.env.LIVE_SYNC) spawnSync('sync');
  const tComplete = now();
  await copy.complete();
  const tDone = now();
  await sleep(300);
  const samples = await writer.stop();
  if (process.env.LIVE_DUMP) (await import('node:fs')).appendFileSync(process.env.LIVE_DUMP, `${JSON.stringify({ t0, tCopy, tReady, tComplete, tDone, samples })}\n`);
  // The baseline skips its first half second (a new connection, the server's first requests).
  const base = window(samples, t0 + 500, tCopy).map((x) => x[1]);
  const during = window(samples, tCopy, tReady);
  const lat = during.map((x) => x[1]);
  const period = 1000 / s.rate;
  return {
    baseP50: percentile(base, 0.5), baseP99: percentile(base, 0.99),
    copyP50: percentile(lat, 0.5), copyP99: percentile(lat, 0.99), copyMax: Math.max(...lat),
    copyWrites: during.length, copyLate: during.filter((x) => x[2] > period).length,
    readyS: (tReady - tCopy) / 1000,
    copied, allocatedAtStart: allocatedAfter(s, window(samples, 0, tCopy)),
    switchMs: tDone - tComplete,
    // Writes in flight at the switch-over's start count too: sent up to one latency before it.
    switchMaxLatency: Math.max(0, ...samples.filter((x) => x[0] < tDone && x[0] + x[1] > tComplete).map((x) => x[1])),
    samples,
  };
}

/** The last write to each offset (connections own disjoint offsets; within one, the highest sequence). */
function lastWrites(samples: Sample[]): Map<number, Sample> {
  const last = new Map<number, Sample>();
  for (const x of samples) {
    const p = last.get(x[3]);
    if (!p || x[5] > p[5]) last.set(x[3], x);
  }
  return last;
}

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
      'no-qemu': { type: 'boolean', default: false },
      json: { type: 'boolean', default: false },
    },
    strict: true,
  });
  const s: Settings = {
    size: parseSize(values.size), allocated: parseSize(values.allocated), rate: Number(values.rate),
    connections: Number(values.connections), seconds: Number(values.seconds), fua: values.fua,
  };
  const rounds = Number(values.rounds);
  const modes = values.modes.split(',').map((m) => m.trim()) as Mode[];
  for (const m of modes) if (m !== 'background' && m !== 'write-blocking') throw new Error(`--modes: background and/or write-blocking, got ${m}`);
  if (!(s.rate > 0) || !(s.seconds > 0) || !(rounds >= 1) || !(s.connections >= 1)) throw new Error('--rate, --seconds, --rounds and --connections must be positive');
  if (s.size % GRANULE) throw new Error('--size must be a multiple of 64 KiB');
  layout(s.size, s.allocated);
  const out = values.json ? process.stderr : process.stdout;
  const say = (line: string) => out.write(`${line}\n`);

  // Imported here: the writer's process needs none of the broker.
  const { createBroker, silentLogger } = await import('../core/index.js');
  const { builtinPlugins } = await import('../plugins/index.js');
  const { median, workDir } = await import('./harness.js');

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
        let job: Awaited<ReturnType<typeof broker.copy>> | undefined;
        let r: Awaited<ReturnType<typeof measure>>;
        try {
          r = await measure(st, writer, { port: Number(new URL(exp.uri).port), name: exp.name }, {
            async start() {
              job = await broker.copy(src, dst, { live: true, mode });
            },
            async ready() {
              const j = job!;
              // The job runs in this process: its info is live; ready is an event.
              const copied = await new Promise<number>((resolve, reject) => {
                const check = (info: ReturnType<typeof j.info>) => {
                  if (info.status === 'ready') return resolve(info.progress.current), true;
                  if (info.status === 'concluded') return reject(new Error(`the live copy ended before ready: ${JSON.stringify(info.error)}`)), true;
                  return false;
                };
                const off = j.on((e) => {
                  if (check(e.job)) off();
                });
                if (check(j.info())) off();
              });
              return copied;
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

    say(`live copy bench in ${dir}: ${fmtBytes(s.size)} volume, ${fmtBytes(s.allocated)} allocated; ${s.rate} writes/s of 4 KiB over ${s.connections} connection(s)${s.fua ? ' (FUA)' : ''}; baseline ${s.seconds} s; ${rounds} round(s)`);
    // Warm-up, not counted: a small volume through each of our ways (V8 compiles the export's, the mirror's and the writer's code).
    {
      const warm: Settings = { ...s, size: 64 * MiB, allocated: 32 * MiB, seconds: 1 };
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
        copyMaxMs: med((x) => x.copyMax),
        writesDuringCopy: med((x) => x.copyWrites), lateDuringCopy: med((x) => x.copyLate),
        copiedBytes: med((x) => x.copied), allocatedBytes: med((x) => x.allocatedAtStart), copiedRatio: med((x) => x.copied / x.allocatedAtStart),
        switchMs: med((x) => x.switchMs), switchMaxLatencyMs: med((x) => x.switchMaxLatency),
        rounds: rs,
      };
    });

    const goalLatency = (m: Mode) => (m === 'background' ? 1.5 : 3);
    const COPY_GOAL = 1.1;
    const mark = (ok: boolean) => (ok ? '✓' : '✗');
    const W = Math.max(16, ...summary.map((x) => x.way.length + 2));
    const col = (v: string) => v.padStart(W);
    say(`\nlive copy (issue 16): ${fmtBytes(s.size)} qcow2 with ${fmtBytes(s.allocated)} allocated, pool → pool; a writer at ${s.rate}/s (4 KiB random${s.fua ? ', FUA' : ''}, ${s.connections} connection(s), one in flight each); medians of ${rounds} round(s)`);
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
    row('writes during the copy (late sends)', (x) => `${x.writesDuringCopy.toFixed(0)} (${x.lateDuringCopy.toFixed(0)})`);
    row('allocated at the start', (x) => fmtBytes(x.allocatedBytes));
    row('bytes copied at ready', (x) => fmtBytes(x.copiedBytes));
    row(`  copied / allocated (goal ≤ ${COPY_GOAL})`, (x) => withMark(x.copiedRatio.toFixed(3), x.copiedRatio <= COPY_GOAL, x));
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

// ---------------------------------------------------------------------------------------------
// QEMU's mirror: qemu-storage-daemon serving the source over NBD, blockdev-mirror over QMP.
// ---------------------------------------------------------------------------------------------

function findQsd(): string | undefined {
  const env = process.env.QEMU_STORAGE_DAEMON;
  if (env) {
    if (!existsSync(env)) throw new Error(`QEMU_STORAGE_DAEMON=${env} does not exist`);
    return env;
  }
  const r = spawnSync('qemu-storage-daemon', ['--version']);
  return r.status === 0 ? 'qemu-storage-daemon' : undefined;
}

async function freePort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as { port: number }).port;
  await new Promise<void>((r) => srv.close(() => r()));
  return port;
}

/** A QMP client: line-delimited JSON, commands answered by id, events kept and awaited. */
class Qmp {
  private buf = '';
  private id = 0;
  private readonly pending = new Map<string, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  private readonly eventWaiters: { name: string; resolve: (data: Record<string, unknown>) => void }[] = [];
  private greeted: (() => void) | undefined;

  private constructor(private readonly socket: Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (d: string) => {
      this.buf += d;
      for (let nl = this.buf.indexOf('\n'); nl >= 0; nl = this.buf.indexOf('\n')) {
        const line = this.buf.slice(0, nl).trim();
        this.buf = this.buf.slice(nl + 1);
        if (line) this.onMessage(JSON.parse(line) as Record<string, unknown>);
      }
    });
    socket.on('close', () => {
      for (const p of this.pending.values()) p.reject(new Error('QMP closed'));
      this.pending.clear();
    });
  }

  static async connect(path: string): Promise<Qmp> {
    for (let i = 0; ; i++) {
      try {
        const socket = connect(path);
        await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
        const q = new Qmp(socket);
        await new Promise<void>((r) => (q.greeted = r));
        await q.cmd('qmp_capabilities');
        return q;
      } catch (e) {
        if (i > 200) throw e;
        await sleep(25);
      }
    }
  }

  cmd(execute: string, args?: Record<string, unknown>): Promise<unknown> {
    const id = `c${++this.id}`;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.socket.write(`${JSON.stringify({ execute, ...(args ? { arguments: args } : {}), id })}\n`);
    });
  }

  /** The next event of this name (registered before what triggers it). */
  event(name: string): Promise<Record<string, unknown>> {
    return new Promise((resolve) => this.eventWaiters.push({ name, resolve }));
  }

  close(): void {
    this.socket.destroy();
  }

  private onMessage(m: Record<string, unknown>): void {
    if ('QMP' in m) {
      this.greeted?.();
      return;
    }
    if (typeof m.event === 'string') {
      const i = this.eventWaiters.findIndex((w) => w.name === m.event);
      if (i >= 0) this.eventWaiters.splice(i, 1)[0]!.resolve((m.data ?? {}) as Record<string, unknown>);
      return;
    }
    const p = this.pending.get(String(m.id));
    if (!p) return;
    this.pending.delete(String(m.id));
    if (m.error) p.reject(new Error(`QMP: ${JSON.stringify(m.error)}`));
    else p.resolve(m.return);
  }
}

function qemuWay(mode: Mode, qsd: string, dir: string): Way {
  const qdir = join(dir, 'qemu');
  const made = new Map<string, string>();
  /** The source file for these settings: qemu-img create + qemu-io, the same layout as ours (made once, copied per round). */
  const template = (s: Settings): string => {
    const key = `${s.size}-${s.allocated}`;
    const have = made.get(key);
    if (have) return have;
    mkdirSync(qdir, { recursive: true });
    const file = join(qdir, `template-${key}.qcow2`);
    const run = (cmd: string, args: string[]) => {
      const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 64 << 20 });
      if (r.status !== 0 || /fail|error/i.test(`${r.stdout}${r.stderr}`)) throw new Error(`${cmd} ${args.slice(0, 4).join(' ')}… failed (${r.status}): ${r.stderr}${r.stdout}`);
    };
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${GRANULE}`, file, String(s.size)]);
    const { chunks, stride } = layout(s.size, s.allocated);
    for (let i = 0; i < chunks; i += 128) {
      const cmds: string[] = [];
      for (let j = i; j < Math.min(chunks, i + 128); j++) cmds.push('-c', `write -q -P ${(j % 250) + 1} ${j * stride} 1M`);
      run('qemu-io', ['-f', 'qcow2', ...cmds, file]);
    }
    made.set(key, file);
    return file;
  };
  return {
    what: `QEMU mirror, ${mode}`, kind: 'qemu', mode,
    async run(s, tag, writer) {
      const src = join(qdir, `src-${tag}.qcow2`);
      const dst = join(qdir, `dst-${tag}.qcow2`);
      spawnSync('cp', ['--sparse=always', template(s), src]);
      // The target as the pool makes it (an empty qcow2 of the source's size); opened by blockdev-add within the copy's time.
      spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${GRANULE}`, dst, String(s.size)]);
      spawnSync('sync');
      const port = await freePort();
      const qmpPath = join(qdir, `qmp-${tag}.sock`);
      const child = spawn(qsd, [
        '--blockdev', `driver=file,node-name=src-file,filename=${src}`,
        '--blockdev', 'driver=qcow2,node-name=src,file=src-file',
        '--nbd-server', `addr.type=inet,addr.host=127.0.0.1,addr.port=${port}`,
        '--export', 'type=nbd,id=exp0,node-name=src,name=vol,writable=on',
        '--chardev', `socket,id=qmp0,path=${qmpPath},server=on,wait=off`,
        '--monitor', 'chardev=qmp0',
      ], { stdio: ['ignore', 'ignore', 'pipe'] });
      let err = '';
      child.stderr!.setEncoding('utf8').on('data', (d: string) => { err += d; });
      const exited = new Promise<void>((r) => child.once('exit', () => r()));
      let qmp: Qmp | undefined;
      try {
        qmp = await Qmp.connect(qmpPath);
        const q = qmp;
        const r = await measure(s, writer, { port, name: 'vol' }, {
          async start() {
            await q.cmd('blockdev-add', { driver: 'qcow2', 'node-name': 'dst', file: { driver: 'file', filename: dst } });
            await q.cmd('blockdev-mirror', { 'job-id': 'm0', device: 'src', target: 'dst', sync: 'top', 'copy-mode': mode });
          },
          async ready() {
            const ready = q.event('BLOCK_JOB_READY');
            // Ready may have come already (a small volume): the job's own flag says.
            const jobs = (await q.cmd('query-block-jobs')) as { device: string; offset: number; ready: boolean }[];
            if (!jobs[0]?.ready) await ready;
            const after = (await q.cmd('query-block-jobs')) as { device: string; offset: number }[];
            return after[0]!.offset;
          },
          async complete() {
            const done = q.event('BLOCK_JOB_COMPLETED');
            await q.cmd('block-job-complete', { device: 'm0' });
            const d = await done;
            if (d.error) throw new Error(`QEMU's mirror failed: ${String(d.error)}`);
          },
        });
        await q.cmd('quit').catch(() => undefined);
        await exited;
        return r;
      } catch (e) {
        throw new Error(`${e instanceof Error ? e.message : String(e)}${err ? ` (qemu-storage-daemon: ${err.trim()})` : ''}`);
      } finally {
        qmp?.close();
        if (child.exitCode === null) {
          child.kill('SIGTERM');
          await exited;
        }
        rmSync(src, { force: true });
        rmSync(dst, { force: true });
        rmSync(qmpPath, { force: true });
      }
    },
  };
}

if (process.argv.includes('--writer-child')) await writerChild();
else await main();
