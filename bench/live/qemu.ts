/** bench/live.ts's comparison, QEMU's mirror: qemu-storage-daemon serving the source over NBD, blockdev-mirror over QMP. */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { freePort } from '../harness.js';
import { join } from 'node:path';
import { GRANULE, layout, sleep, type Mode, type Settings } from './common.js';
import { measure, type Way } from './measure.js';

export function findQsd(): string | undefined {
  const env = process.env.QEMU_STORAGE_DAEMON;
  if (env) {
    if (!existsSync(env)) throw new Error(`QEMU_STORAGE_DAEMON=${env} does not exist`);
    return env;
  }
  const r = spawnSync('qemu-storage-daemon', ['--version']);
  return r.status === 0 ? 'qemu-storage-daemon' : undefined;
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

export function qemuWay(mode: Mode, qsd: string, dir: string): Way {
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
        // utime + stime of the daemon, in clock ticks (USER_HZ: 100 on Linux).
        const cpuMs = () => {
          const f = readFileSync(`/proc/${child.pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
          return (Number(f[11]) + Number(f[12])) * 10;
        };
        const r = await measure(s, writer, { port, name: 'vol', cpuMs, inProcess: false }, {
          async start() {
            await q.cmd('blockdev-add', { driver: 'qcow2', 'node-name': 'dst', file: { driver: 'file', filename: dst } });
            await q.cmd('blockdev-mirror', { 'job-id': 'm0', device: 'src', target: 'dst', sync: 'top', 'copy-mode': mode, ...(s.speed ? { speed: s.speed } : {}) });
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
