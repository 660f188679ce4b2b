/**
 * Who a job's runner was, and when it is known gone without waiting for its lease
 * (core/jobs/runner.ts): its pid dead on this host, or — with a host id — a boot of this machine
 * that ended (a power loss, a reboot). The config's `hostId` names the machine.
 */
import { spawnSync } from 'node:child_process';
import { hostname } from 'node:os';
import { describe, expect, it } from 'vitest';
import { validateConfig } from '../../core/config/config.js';
import { bootEnded, currentBoot, holderAlive, runnerGone, runnerHost, sameMachine } from '../../core/jobs/runner.js';

const deadPid = () => spawnSync(process.execPath, ['-e', '0']).pid!;

describe('runner identity', () => {
  it('a host id names the machine in place of its host name, with the boot and the pid namespace', () => {
    const boot = currentBoot();
    expect(boot).toMatch(/^[0-9a-f]{8}$/);
    expect(runnerHost('node-17')).toMatch(new RegExp(`^id node-17 \\(boot ${boot}, pid ns \\d+\\)$`));
    expect(runnerHost()).toMatch(new RegExp(`^${hostname().replace(/[.]/g, '\\.')} \\(boot ${boot}, pid ns \\d+\\)$`));
  });

  it('the same host id in another boot: known gone, and the same machine (its files, its pool); a host name alone or another id: neither', () => {
    const now = 'id node1 (boot bbbb0002, pid ns 11)';
    expect(bootEnded('id node1 (boot aaaa0001, pid ns 10)', now)).toBe(true);
    expect(bootEnded('id node1 (boot aaaa0001, pid ns 11)', now)).toBe(true);
    expect(bootEnded('id node1 (boot bbbb0002, pid ns 12)', now)).toBe(false); // this boot, another container: only its lease can tell
    expect(bootEnded('id node2 (boot aaaa0001, pid ns 10)', now)).toBe(false);
    expect(bootEnded('node1 (boot aaaa0001, pid ns 10)', 'node1 (boot bbbb0002, pid ns 11)')).toBe(false); // host names may be shared
    expect(sameMachine('id node1 (boot aaaa0001, pid ns 10)', now)).toBe(true);
    expect(sameMachine(now, now)).toBe(true);
    expect(sameMachine('id node2 (boot aaaa0001, pid ns 10)', now)).toBe(false);
  });

  it('a runner is gone at once if its pid is dead on this host or its boot ended; elsewhere its lease decides', () => {
    const here = 'id node1 (boot bbbb0002, pid ns 11)';
    expect(runnerGone({ runnerHost: here, runnerPid: deadPid() }, here)).toBe(true);
    expect(runnerGone({ runnerHost: here, runnerPid: process.pid }, here)).toBe(false);
    // A live pid of an ended boot is another process now.
    expect(runnerGone({ runnerHost: 'id node1 (boot aaaa0001, pid ns 11)', runnerPid: process.pid }, here)).toBe(true);
    expect(runnerGone({ runnerHost: 'id node2 (boot aaaa0001, pid ns 11)', runnerPid: deadPid() }, here)).toBe(false);
    const row = { runnerToken: 'gone', runnerPid: process.pid, leaseExpires: Date.now() + 60_000 };
    expect(holderAlive({ ...row, runnerHost: 'id node1 (boot aaaa0001, pid ns 11)' }, here)).toBe(false);
    expect(holderAlive({ ...row, runnerHost: 'id node2 (boot aaaa0001, pid ns 11)' }, here)).toBe(true);
    expect(holderAlive({ ...row, runnerHost: 'id node2 (boot aaaa0001, pid ns 11)', leaseExpires: Date.now() - 1 }, here)).toBe(false);
  });

  it('hostId in the config: a name, or a clear error', () => {
    expect(validateConfig({ hostId: 'node-17.rack2', backends: [] }, []).hostId).toBe('node-17.rack2');
    expect(validateConfig({ hostId: '${NODE_NAME}', backends: [] }, [], { env: { NODE_NAME: 'worker-3' } }).hostId).toBe('worker-3');
    expect(() => validateConfig({ hostId: 'node 1', backends: [] }, [])).toThrow(/^hostId: expected a name of 1–128 characters/);
    expect(() => validateConfig({ hostId: '', backends: [] }, [])).toThrow(/^hostId/);
  });
});
