import { readFileSync, statSync } from 'node:fs';
import { hostname } from 'node:os';

/** Tokens of the job managers alive in this process (a pid alone may be reused or be ours). */
export const liveTokens = new Set<string>();

/**
 * This host as runners record it: its name, and — so that a pid is only judged where it means
 * the same process — the boot and the pid namespace (containers may share a host's name but not
 * its pids). A dead pid on the same host needs no lease expiry to be known dead.
 */
export const HOST = process.env.OFFLOAD_RUNNER_HOST || hostIdentity();

/**
 * OFFLOAD_RUNNER_HOST overrides it: brokers on one machine that must treat each other as other
 * hosts (judged by lease, never by pid) — tests of many hosts on one machine. Two real hosts must
 * never share a value.
 */
function hostIdentity(): string {
  const part = (read: () => string) => {
    try {
      return read();
    } catch {
      return '';
    }
  };
  const boot = part(() => readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim().slice(0, 8));
  const pidns = part(() => String(statSync('/proc/self/ns/pid').ino));
  return boot && pidns ? `${hostname()} (boot ${boot}, pid ns ${pidns})` : hostname();
}

export function pidAlive(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false; // released by its broker, or never set
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Whether the runner of an operation's locks or of an export still holds them: a broker of this
 * process that is open; on this host, a live pid; elsewhere, a lease it keeps renewing. (Rows of a
 * build before hosts were recorded name no host: they were written on this one.)
 */
export function holderAlive(r: { runnerToken: string; runnerPid: number; runnerHost: string; leaseExpires: number }, now = Date.now()): boolean {
  if (liveTokens.has(r.runnerToken)) return true;
  if (r.runnerHost === HOST || r.runnerHost === '') return r.runnerPid !== process.pid && pidAlive(r.runnerPid);
  return r.leaseExpires > now;
}
