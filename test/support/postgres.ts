/**
 * A real PostgreSQL for the tests that need one: a throwaway cluster of its own per call of
 * startPostgres() (initdb into a temp dir, trust auth, listening only on a unix socket in that
 * dir), so nothing depends on how the Debian cluster's auth is set up, and test files never share
 * a server. One cluster per test file (beforeAll/afterAll) is the intended use.
 *
 * The binaries: the highest /usr/lib/postgresql/VERSION/bin (Debian does not put initdb on PATH),
 * else wherever `initdb` on PATH points. PostgreSQL refuses to run as root: when the tests run as
 * root, initdb, pg_ctl and the server run as the `postgres` OS user (Debian's package creates it;
 * `nobody` otherwise), by spawn's uid/gid, and the temp dir is chowned to it.
 *
 * The server never outlives the test process: a watchdog shell (its own process group) reads a
 * pipe from this process, and when the pipe closes — stop(), or this process dying in any way —
 * it SIGQUITs the postmaster (PostgreSQL's immediate shutdown), SIGKILLs the postmaster and its
 * children if it is still there after 5 s, and removes the temp dir. stop() waits for it and checks.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { chownSync, existsSync, mkdtempSync, readdirSync, readFileSync, realpathSync, rmSync, appendFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import pg from 'pg';

export interface Postgres {
  /** The `postgres` database as the superuser `postgres`: postgres://postgres@/postgres?host=SOCKETDIR */
  readonly url: string;
  /** The directory of the server's unix socket (and of the cluster: data/ and server.log are in it). */
  readonly socketDir: string;
  /** The postmaster's pid. */
  readonly pid: number;
  /** The server's version, e.g. "15.18". */
  readonly version: string;
  /** Create a database (a fresh name unless one is given) and return its URL. */
  createDatabase(name?: string): Promise<string>;
  /** The server log so far (for a test's failure message). */
  log(): string;
  /** Shut the server down (immediately: nothing of a throwaway cluster is worth a checkpoint) and remove its dir. Idempotent. */
  stop(): Promise<void>;
}

export interface StartOptions {
  /** Extra server settings (postgresql.conf lines), e.g. { max_connections: 20, lock_timeout: '2s' }. */
  settings?: Record<string, string | number | boolean>;
  /** How long pg_ctl waits for the server to accept connections, in seconds (default 30). */
  timeoutSeconds?: number;
}

interface Binaries { dir: string; initdb: string; pgCtl: string; postgres: string }

function versionKey(v: string): number[] {
  return v.split('.').map((p) => Number.parseInt(p, 10) || 0);
}

function byVersion(a: string, b: string): number {
  const x = versionKey(a);
  const y = versionKey(b);
  for (let i = 0; i < Math.max(x.length, y.length); i++) {
    const d = (x[i] ?? 0) - (y[i] ?? 0);
    if (d !== 0) return d;
  }
  return 0;
}

function binariesIn(dir: string): Binaries | undefined {
  const b = { dir, initdb: join(dir, 'initdb'), pgCtl: join(dir, 'pg_ctl'), postgres: join(dir, 'postgres') };
  return existsSync(b.initdb) && existsSync(b.pgCtl) && existsSync(b.postgres) ? b : undefined;
}

let found: Binaries | null | undefined;

/** initdb, pg_ctl and postgres: the highest Debian version under /usr/lib/postgresql, else initdb's dir on PATH. */
function binaries(): Binaries | undefined {
  if (found !== undefined) return found ?? undefined;
  const root = '/usr/lib/postgresql';
  const versions = existsSync(root) ? readdirSync(root).sort(byVersion).reverse() : [];
  for (const v of versions) {
    const b = binariesIn(join(root, v, 'bin'));
    if (b) return (found = b);
  }
  const which = spawnSync('sh', ['-c', 'command -v initdb'], { encoding: 'utf8' });
  const onPath = which.status === 0 ? which.stdout.trim() : '';
  found = (onPath ? binariesIn(dirname(realpathSync(onPath))) : undefined) ?? null;
  return found ?? undefined;
}

interface RunAs { uid: number; gid: number; name: string }

let runAsCache: RunAs | null | undefined;

/** Whom the server runs as: this process, or — when it is root — an unprivileged user. null: root and no such user. */
function runAs(): RunAs | undefined | null {
  if (process.getuid?.() !== 0) return undefined;
  if (runAsCache !== undefined) return runAsCache;
  runAsCache = null;
  for (const name of ['postgres', 'nobody']) {
    const uid = spawnSync('id', ['-u', name], { encoding: 'utf8' });
    const gid = spawnSync('id', ['-g', name], { encoding: 'utf8' });
    if (uid.status === 0 && gid.status === 0) {
      runAsCache = { name, uid: Number(uid.stdout.trim()), gid: Number(gid.stdout.trim()) };
      break;
    }
  }
  return runAsCache;
}

let warned = false;

/** Whether startPostgres() can work here: the binaries exist (and, as root, a user to run them as). For describe.skipIf. */
export function postgresAvailable(): boolean {
  const ok = binaries() !== undefined && runAs() !== null;
  if (!ok && !warned) {
    warned = true;
    // Loud, not silent: the cases that need it are skipped.
    process.stderr.write(`\n*** PostgreSQL (initdb) not installed${binaries() ? ' or no unprivileged user to run it as' : ''}: tests that need it are SKIPPED ***\n\n`);
  }
  return ok;
}

/** Environment for the PostgreSQL programs: none of the caller's PG* variables (PGDATA, PGPORT, … would change what they do). */
function cleanEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('PG')) env[k] = v;
  env.LC_ALL = 'C';
  env.LANG = 'C';
  return env;
}

interface Run { status: number; output: string }

/** Run a PostgreSQL program (as the unprivileged user when root) without blocking the event loop. Never throws on a non-zero exit. */
function run(cmd: string, args: string[], cwd: string, user: RunAs | undefined): Promise<Run> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { cwd, env: cleanEnv(), stdio: ['ignore', 'pipe', 'pipe'], ...(user ? { uid: user.uid, gid: user.gid } : {}) });
    let output = '';
    p.stdout.setEncoding('utf8').on('data', (d: string) => { output += d; });
    p.stderr.setEncoding('utf8').on('data', (d: string) => { output += d; });
    p.on('error', reject);
    p.on('close', (code, signal) => resolve({ status: code ?? (signal ? 128 : -1), output }));
  });
}

/**
 * The watchdog: waits for its stdin to close, then ends the server whose pid is in data/postmaster.pid
 * (if any) and removes the dir. Detached (its own process group), so whatever kills the test process's
 * group does not take it along before it has cleaned up.
 */
function watchdog(dir: string): ChildProcess {
  // A zombie counts as gone: the postmaster's parent is init (pg_ctl's child daemonizes), which may reap it late.
  // Every server process is a session leader of its own, so the fallback kills the postmaster's children by parent pid.
  const script = `
    running() {
      if [ -d /proc/self ]; then
        s=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)
        [ -n "$s" ] && [ "$s" != Z ]
      else
        kill -0 "$1" 2>/dev/null
      fi
    }
    cat >/dev/null
    pid=$(head -1 "$1/data/postmaster.pid" 2>/dev/null)
    case "$pid" in ''|*[!0-9]*) pid= ;; esac
    if [ -n "$pid" ]; then
      kill -s QUIT "$pid" 2>/dev/null
      i=0
      while running "$pid" && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
      if running "$pid"; then
        for c in $(pgrep -P "$pid" 2>/dev/null); do kill -s KILL "$c" 2>/dev/null; done
        kill -s KILL "$pid" 2>/dev/null
      fi
    fi
    rm -rf "$1"
  `;
  const w = spawn('sh', ['-c', script, 'offload-pg-watchdog', dir], { detached: true, stdio: ['pipe', 'ignore', 'ignore'] });
  w.unref();
  // The pipe must not keep the test process alive either; it closes when the process exits.
  (w.stdin as unknown as { unref?: () => void } | null)?.unref?.();
  w.stdin!.on('error', () => {});
  return w;
}

/** Whether a process runs (a zombie does not: it only waits for init to reap it). */
function alive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT' && existsSync('/proc/self')) return false;
  }
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

function confValue(v: string | number | boolean): string {
  if (typeof v !== 'string') return String(v);
  return `'${v.replace(/\\/g, '\\\\').replace(/'/g, "''")}'`;
}

function tail(text: string, lines = 40): string {
  return text.trimEnd().split('\n').slice(-lines).join('\n');
}

const NAME = /^[a-z_][a-z0-9_]{0,62}$/;

/** The URL of database `db` of a cluster whose socket is in `socketDir`. */
export function postgresUrl(socketDir: string, db = 'postgres'): string {
  return `postgres://postgres@/${encodeURIComponent(db)}?host=${encodeURIComponent(socketDir)}`;
}

/** Start a throwaway cluster. Throws (with initdb's or pg_ctl's output and the server log) when it cannot. */
export async function startPostgres(options: StartOptions = {}): Promise<Postgres> {
  const bin = binaries();
  const user = runAs();
  if (!bin || user === null) {
    throw new Error('PostgreSQL is not available here (no initdb under /usr/lib/postgresql/*/bin or on PATH, or running as root without a postgres/nobody user); guard the tests with postgresAvailable()');
  }
  // A unix socket's path is at most 107 bytes: keep the dir short whatever TMPDIR is.
  const base = tmpdir().length <= 60 ? tmpdir() : '/tmp';
  const dir = mkdtempSync(join(base, 'offload-pg-'));
  const dataDir = join(dir, 'data');
  const logFile = join(dir, 'server.log');
  if (user) chownSync(dir, user.uid, user.gid);
  const guard = watchdog(dir);
  const exited = new Promise<void>((r) => {
    if (guard.exitCode !== null || guard.signalCode !== null) r();
    else guard.once('exit', () => r());
  });
  let stopping: Promise<void> | undefined;
  const stop = (): Promise<void> => (stopping ??= shutdown());
  const shutdown = async (): Promise<void> => {
    let pid: number | undefined;
    try {
      pid = Number.parseInt(readFileSync(join(dataDir, 'postmaster.pid'), 'utf8').split('\n')[0]!, 10);
    } catch { /* never started */ }
    guard.stdin!.end();
    await Promise.race([exited, sleep(15_000)]);
    // The watchdog did it all, unless it could not (then do it here, and say so).
    if (pid && alive(pid)) {
      const children = spawnSync('pgrep', ['-P', String(pid)], { encoding: 'utf8' }).stdout?.split('\n').filter(Boolean).map(Number) ?? [];
      for (const c of [...children, pid]) {
        try { process.kill(c, 'SIGKILL'); } catch { /* gone */ }
      }
    }
    rmSync(dir, { recursive: true, force: true });
  };
  const log = (): string => {
    try { return readFileSync(logFile, 'utf8'); } catch { return ''; }
  };

  try {
    const init = await run(bin.initdb, ['-D', dataDir, '-U', 'postgres', '--auth=trust', '--encoding=UTF8', '--no-locale', '--no-sync', '--no-instructions'], dir, user);
    if (init.status !== 0) throw new Error(`initdb (${bin.initdb}) exited ${init.status}:\n${tail(init.output)}`);
    const settings: Record<string, string | number | boolean> = {
      listen_addresses: '',
      unix_socket_directories: dir,
      // A throwaway cluster: no durability, no waiting for the disk.
      fsync: false,
      synchronous_commit: false,
      full_page_writes: false,
      ...options.settings,
    };
    appendFileSync(dataDir + '/postgresql.conf', `\n# test/support/postgres.ts\n${Object.entries(settings).map(([k, v]) => `${k} = ${confValue(v)}`).join('\n')}\n`);
    const start = await run(bin.pgCtl, ['start', '-w', '-t', String(options.timeoutSeconds ?? 30), '-D', dataDir, '-l', logFile], dir, user);
    if (start.status !== 0) {
      throw new Error(`pg_ctl start (${bin.pgCtl}) exited ${start.status}:\n${tail(start.output, 10)}\n--- server log (${logFile}):\n${tail(log()) || '(empty)'}`);
    }
    const pid = Number.parseInt(readFileSync(join(dataDir, 'postmaster.pid'), 'utf8').split('\n')[0]!, 10);
    const url = postgresUrl(dir);
    const client = new pg.Client({ connectionString: url });
    let version: string;
    try {
      await client.connect();
      version = (await client.query<{ server_version: string }>('SHOW server_version')).rows[0]!.server_version.split(' ')[0]!;
    } finally {
      await client.end().catch(() => {});
    }
    let next = 0;
    return {
      url,
      socketDir: dir,
      pid,
      version,
      log,
      stop,
      async createDatabase(name?: string): Promise<string> {
        const db = name ?? `test_${++next}`;
        if (!NAME.test(db)) throw new Error(`createDatabase: ${JSON.stringify(db)} is not a plain lower-case SQL name`);
        const c = new pg.Client({ connectionString: url });
        try {
          await c.connect();
          await c.query(`CREATE DATABASE "${db}"`);
        } finally {
          await c.end().catch(() => {});
        }
        return postgresUrl(dir, db);
      },
    };
  } catch (e) {
    await stop();
    throw e;
  }
}
