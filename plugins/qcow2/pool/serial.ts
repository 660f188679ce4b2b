import { Busy } from '../../../core/index.js';

/** The pool's change lock between processes (PoolMetadata.tryLock/unlock, bound to one holder). */
export interface CrossProcessLock {
  /** Take it if free (or its holder is gone); else the pid holding it. */
  tryLock(): number | undefined;
  unlock(): void;
}

/** How long a structural change waits for another process's before it is Busy. */
const WAIT_MS = 60_000;

/**
 * Runs async sections one at a time, in call order (the pool's structural changes) — in this
 * process, and, with a CrossProcessLock, across every process that opens the pool: each section
 * holds the pool's change lock, which another process takes once it is released or its holder
 * has died (the pool is a local folder: its processes share one host, so a pid says who lives).
 */
export class Serial {
  private tail: Promise<unknown> = Promise.resolve();

  /**
   * `first`: run at the start of every section, under the lock, before its own work (the pool
   * finishes what a process killed in a change left half done); a section that only looks (pool
   * check) passes `bare`.
   */
  constructor(private readonly shared?: CrossProcessLock, private readonly what = 'the pool', private readonly first?: () => Promise<void>) {}

  run<T>(fn: () => Promise<T>, opts: { bare?: boolean } = {}): Promise<T> {
    return this.runLocal(async () => {
      await this.lock();
      try {
        if (!opts.bare) await this.first?.();
        return await fn();
      } finally {
        this.shared?.unlock();
      }
    });
  }

  /** A section ordered with this process's others only (closing the pool: nothing of it changes). */
  runLocal<T>(fn: () => Promise<T>): Promise<T> {
    const next = this.tail.then(fn, fn);
    this.tail = next.catch(() => undefined);
    return next;
  }

  private async lock(): Promise<void> {
    if (!this.shared) return;
    const until = Date.now() + WAIT_MS;
    for (let wait = 2; ; wait = Math.min(50, wait * 2)) {
      const holder = this.shared.tryLock();
      if (holder === undefined) return;
      if (Date.now() > until) {
        throw new Busy(`${this.what} is being changed by another process (pid ${holder}) for more than ${WAIT_MS / 1000} s`, {
          ref: this.what, hint: 'try again once that process is done', data: { pid: holder },
        });
      }
      await new Promise((r) => setTimeout(r, wait));
    }
  }
}
