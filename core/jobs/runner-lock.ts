import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';

/**
 * Whether a runner of this machine is alive, told by the kernel: each job manager that records
 * anything under its token holds an exclusive lock on `<state>/runners/<token>.lock` for as long
 * as its process lives. The lock goes with the process — a kill -9, a container's restart (another
 * pid namespace, where a pid tells nothing), a power loss or a reboot — so a lock that can be
 * taken says its runner is gone, at once and without a lease's wait. The lock is SQLite's
 * (POSIX record locks, per process; better-sqlite3 is here already): the holder's connection runs
 * `locking_mode=EXCLUSIVE` after one write, a prober's `BEGIN IMMEDIATE` is refused while it does.
 * A state folder on a filesystem without working locks (some FUSE ones) makes every runner look
 * gone: keep it on a local filesystem, as SQLite's own state must be.
 */
export class RunnerLocks {
  private held: Database.Database | undefined;

  constructor(private readonly dir: string) {}

  /**
   * Hold this runner's lock (once; later calls do nothing), and note that runners recorded under
   * `host` (runnerHost) work with this state folder: a job one of them gave up at a clean stop
   * (its token is `released` then, its lock file gone) is still known to be this machine's — the
   * next container or boot records another host, and the job's files are here (ranAs).
   */
  hold(token: string, host?: string): void {
    if (this.held) return;
    if (host !== undefined) this.noteHost(host);
    mkdirSync(this.dir, { recursive: true });
    const file = this.fileOf(token);
    let db: Database.Database | undefined;
    try {
      db = new Database(file);
      // Its journal in memory: nothing is ever written; the lock is all there is (and no -journal file is left).
      db.pragma('journal_mode = MEMORY');
      db.pragma('locking_mode = EXCLUSIVE');
      db.exec('BEGIN EXCLUSIVE');
      db.exec('COMMIT');
    } catch (e) {
      // A file left unlocked would say a live runner is gone: it goes (unlinking needs no space).
      db?.close();
      removeFiles(file);
      throw e;
    }
    this.held = db;
  }

  /**
   * Let go of it (the broker closes): its file goes first, then the lock (never a file free while
   * this process lives). `host` is noted again: the jobs it released name it (another broker's
   * sweep may have taken the note while none did).
   */
  release(token: string, host?: string): void {
    if (!this.held) return;
    if (host !== undefined) this.noteHost(host);
    removeFiles(this.fileOf(token));
    this.held.close();
    this.held = undefined;
  }

  /**
   * Whether the runner with this token is known gone: its lock file is in this state folder (it
   * ran on this machine) and nobody holds it. False where it is held, or there is none.
   */
  gone(token: string): boolean {
    if (!/^[0-9a-f]{1,64}$/.test(token)) return false; // `released`, or not a token of ours
    let db: Database.Database;
    try {
      db = new Database(this.fileOf(token), { fileMustExist: true, timeout: 0 });
    } catch {
      return false; // no such file: not a runner of this folder (or it closed cleanly)
    }
    try {
      db.exec('BEGIN IMMEDIATE');
      db.exec('ROLLBACK');
      return true;
    } catch {
      return false; // SQLITE_BUSY: held by a live process
    } finally {
      db.close();
    }
  }

  /** Whether the runner with this token ran on this machine (its lock file is here), alive or not. */
  isHere(token: string): boolean {
    return /^[0-9a-f]{1,64}$/.test(token) && existsSync(this.fileOf(token));
  }

  /** Whether runners recorded under `host` worked with this state folder (hold noted it). */
  ranAs(host: string): boolean {
    return existsSync(this.hostFile(host));
  }

  /**
   * Remove the files of gone runners that `inUse` says no record names any more, and the notes of
   * hosts that `hostInUse` says none does.
   */
  sweep(inUse: (token: string) => boolean, hostInUse: (host: string) => boolean = () => true): void {
    for (const f of this.files()) {
      const token = f.endsWith('.lock') ? f.slice(0, -'.lock'.length) : undefined;
      if (token === undefined || inUse(token) || !this.gone(token)) continue;
      removeFiles(join(this.dir, f));
    }
    for (const f of this.files(HOSTS)) {
      if (f.endsWith('.tmp')) continue;
      const file = join(this.dir, HOSTS, f);
      let host: string;
      try {
        host = readFileSync(file, 'utf8').trimEnd();
      } catch {
        continue;
      }
      if (!hostInUse(host)) rmSync(file, { force: true });
    }
  }

  private noteHost(host: string): void {
    try {
      mkdirSync(join(this.dir, HOSTS), { recursive: true });
      const file = this.hostFile(host);
      if (existsSync(file)) return;
      // Whole or not at all: a sweep reading it half-written would take it for no host's.
      writeFileSync(`${file}.${process.pid}.tmp`, `${host}\n`);
      renameSync(`${file}.${process.pid}.tmp`, file);
    } catch {
      // Without the note, a job released here is judged by its recorded host alone, as before.
    }
  }

  private hostFile(host: string): string {
    return join(this.dir, HOSTS, createHash('sha256').update(host).digest('hex').slice(0, 32));
  }

  private files(sub = ''): string[] {
    try {
      return readdirSync(join(this.dir, sub), { withFileTypes: true }).filter((e) => e.isFile()).map((e) => e.name);
    } catch {
      return [];
    }
  }

  private fileOf(token: string): string {
    return join(this.dir, `${token}.lock`);
  }
}

/** The folder of the host notes (beside the lock files). */
const HOSTS = 'hosts';

/** A lock file, and a journal a prober may have left beside it. */
function removeFiles(file: string): void {
  rmSync(file, { force: true });
  rmSync(`${file}-journal`, { force: true });
}
