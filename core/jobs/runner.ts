import { readFileSync, statSync } from 'node:fs';
import { hostname } from 'node:os';

/** Tokens of the job managers alive in this process (a pid alone may be reused or be ours). */
export const liveTokens = new Set<string>();

/**
 * This host as runners record it: its name, and — so that a pid is only judged where it means
 * the same process — the boot and the pid namespace (containers may share a host's name but not
 * its pids). A dead pid on the same host needs no lease expiry to be known dead. A broker given
 * a host id (the config's `hostId`) records `id NAME` in place of the host name: see runnerHost.
 */
export const HOST = runnerHost();

/**
 * The identity a broker's runners record: `id NAME (boot B, pid ns P)` with a configured host id,
 * else `HOSTNAME (boot B, pid ns P)`. A host id is a promise that no other machine uses it: a
 * runner recorded under it in another boot is then known gone (a process does not outlive its
 * machine's boot), where a host name may be shared by machines and only a lease can tell.
 *
 * OFFLOAD_RUNNER_HOST overrides it: brokers on one machine that must treat each other as other
 * hosts (judged by lease, never by pid), or as one host across a reboot — tests of many hosts on
 * one machine. Two real hosts must never share a value.
 */
export function runnerHost(hostId?: string): string {
  if (process.env.OFFLOAD_RUNNER_HOST) return process.env.OFFLOAD_RUNNER_HOST;
  const part = (read: () => string) => {
    try {
      return read();
    } catch {
      return '';
    }
  };
  const name = hostId !== undefined ? `id ${hostId}` : hostname();
  const boot = currentBoot();
  const pidns = part(() => String(statSync('/proc/self/ns/pid').ino));
  return boot && pidns ? `${name} (boot ${boot}, pid ns ${pidns})` : name;
}

/**
 * This machine's boot (the first 8 hex digits of Linux's boot_id, random at each boot; '' where
 * there is none): a row naming another boot was written by a process that is gone.
 */
export function currentBoot(): string {
  try {
    return readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim().slice(0, 8);
  } catch {
    return '';
  }
}

const IDENTIFIED = /^id ([^ ]+) \(boot ([^,]+), pid ns [^)]+\)$/;

/**
 * Whether `recorded` (a runner's host) is this machine, `host`, in a boot that has ended: both
 * name the same configured host id and different boots. Its processes are all gone, whatever
 * their leases say.
 */
export function bootEnded(recorded: string, host: string): boolean {
  const a = IDENTIFIED.exec(recorded);
  const b = IDENTIFIED.exec(host);
  return a !== null && b !== null && a[1] === b[1] && a[2] !== b[2];
}

/** Whether `recorded` is the machine `host` is (its files, its pool): the same identity, or the same host id in another boot. */
export function sameMachine(recorded: string, host: string): boolean {
  return recorded === host || bootEnded(recorded, host);
}

/** Whether the runner of a job, an operation or an export is known gone without waiting for its lease: its pid dead on this host, or its boot ended. */
export function runnerGone(r: { runnerPid: number; runnerHost: string }, host: string): boolean {
  return bootEnded(r.runnerHost, host) || (r.runnerHost === host && !pidAlive(r.runnerPid));
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
 * process that is open; on this host (`host`, as its broker records runners), a live pid; on this
 * machine in a boot that ended, never; elsewhere, a lease it keeps renewing, unless `lockGone`
 * (its runner lock in this state folder is free: RunnerLocks) says its process is gone. (Rows of a build
 * before hosts were recorded name no host: they were written on this one.)
 */
export function holderAlive(r: { runnerToken: string; runnerPid: number; runnerHost: string; leaseExpires: number }, host: string, now = Date.now(), lockGone?: (token: string) => boolean): boolean {
  if (liveTokens.has(r.runnerToken)) return true;
  if (r.runnerHost === host || r.runnerHost === '') return r.runnerPid !== process.pid && pidAlive(r.runnerPid);
  if (bootEnded(r.runnerHost, host)) return false;
  return r.leaseExpires > now && !lockGone?.(r.runnerToken);
}
