/**
 * What a restarted service serves (HostedExports.restore): the ref in its file, unless a live
 * copy's record says the switch-over to another volume was recorded after that ref was written —
 * the window a kill -9 can hit between the job's record and the file. Followed along a chain of
 * copies; older copies (before the file's ref was set) and ones not switched over are ignored.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { silentLogger, type Broker, type ExportOptions, type JobInfo } from '../../core/index.js';
import { HostedExports } from '../../core/service/hosted-exports.js';

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

function mirror(source: string, target: string, createdAt: string, side: 'source' | 'target'): JobInfo {
  return {
    id: `mirror-${source}-${target}`, type: 'mirror', status: 'concluded', executor: 'host', ref: target, owner: 'admin',
    progress: { current: 0, total: 0 }, speed: 0, cancelled: false, createdAt, updatedAt: createdAt,
    params: { mode: 'background', pairs: [{ source, target }] }, authoritative: { side, ref: side === 'source' ? source : target },
  };
}

/** Restore one hosted export whose file says `ref` since `since`, with these job records: what it starts. */
async function restored(ref: string, since: string | undefined, jobs: JobInfo[]): Promise<string[]> {
  const dir = mkdtempSync(join(tmpdir(), 'offload-hosted-'));
  dirs.push(dir);
  writeFileSync(join(dir, 'hosted-exports.json'), JSON.stringify({
    version: 1, exports: [{ name: 'vm', ref, readOnly: false, listen: { host: '127.0.0.1', port: 10809 }, principal: { id: 'admin', role: 'admin' }, ...(since ? { since } : {}) }],
  }));
  const started: string[] = [];
  const broker = {
    principal: { id: 'admin', role: 'admin' },
    as: () => broker,
    jobs: { list: async () => jobs },
    exports: {
      start: async (r: string, o: ExportOptions) => {
        started.push(r);
        return { name: o.name!, ref: r, uri: 'nbd://127.0.0.1:10809/vm', readOnly: false, stopped: new Promise<void>(() => undefined), stop: async () => undefined, onRetarget: () => undefined };
      },
    },
  } as unknown as Broker;
  await new HostedExports(dir, silentLogger).restore(broker);
  return started;
}

describe('hosted exports after a restart', () => {
  const T0 = '2026-12-03T10:00:00.000Z';
  const T1 = '2026-12-03T10:05:00.000Z';
  const T2 = '2026-12-03T10:09:00.000Z';

  it('serve the target of a switch-over recorded after the file was written', async () => {
    expect(await restored('local/a', T0, [mirror('local/a', 'san1/b', T1, 'target')])).toEqual(['san1/b']);
  });

  it('follow a chain of switch-overs', async () => {
    expect(await restored('local/a', T0, [mirror('san1/b', 'nas1/c', T2, 'target'), mirror('local/a', 'san1/b', T1, 'target')])).toEqual(['nas1/c']);
  });

  it('ignore a copy not switched over, and one older than the file\'s ref (a copy back and forth)', async () => {
    expect(await restored('local/a', T0, [mirror('local/a', 'san1/b', T1, 'source')])).toEqual(['local/a']);
    // a → b at T0 (switched), b → a at T1 (switched, file updated at T2): a is current, not b.
    expect(await restored('local/a', T2, [mirror('local/a', 'san1/b', T0, 'target'), mirror('san1/b', 'local/a', T1, 'target')])).toEqual(['local/a']);
  });

  it('a file without `since` (written before it existed) still follows the records', async () => {
    expect(await restored('local/a', undefined, [mirror('local/a', 'san1/b', T1, 'target')])).toEqual(['san1/b']);
  });
});

describe('live copies suspended when the service stopped', () => {
  const T0 = '2026-12-03T10:00:00.000Z';
  const T1 = '2026-12-03T10:05:00.000Z';
  const T2 = '2026-12-03T10:09:00.000Z';
  const suspended = (id: string, createdAt: string): JobInfo => ({
    ...mirror('local/a', 'san1/b', createdAt, 'source'), id, cancelled: true, suspended: true, resumeSince: [`live-${id}`],
  });

  /** The jobs the restarted service resumes (the export of local/a restored read-write, or read-only). */
  async function resumed(jobs: JobInfo[], readOnly = false): Promise<string[]> {
    const dir = mkdtempSync(join(tmpdir(), 'offload-hosted-'));
    dirs.push(dir);
    writeFileSync(join(dir, 'hosted-exports.json'), JSON.stringify({
      version: 1, exports: [{ name: 'vm', ref: 'local/a', readOnly, listen: { host: '127.0.0.1', port: 10809 }, principal: { id: 'admin', role: 'admin' }, since: T0 }],
    }));
    const asked: string[] = [];
    const broker = {
      principal: { id: 'admin', role: 'admin' },
      as: () => broker,
      jobs: { list: async () => jobs },
      liveCopy: async (_pairs: unknown, o: { resume: string }) => {
        asked.push(o.resume);
        return { id: `again-${o.resume}`, wait: () => new Promise(() => undefined) };
      },
      exports: {
        start: async (r: string, o: ExportOptions) => {
          if (o.holdWrites) asked.push(`held ${r}`);
          return { name: o.name!, ref: r, uri: 'nbd://127.0.0.1:10809/vm', readOnly, stopped: new Promise<void>(() => undefined), stop: async () => undefined, onRetarget: () => undefined };
        },
      },
    } as unknown as Broker;
    await new HostedExports(dir, silentLogger).restore(broker);
    return asked;
  }

  it('one suspended copy of a restored export: resumed', async () => {
    expect(await resumed([suspended('j1', T1)])).toEqual(['j1']);
  });

  it('not for a read-only export', async () => {
    expect(await resumed([suspended('j1', T1)], true)).toEqual([]);
  });

  it('a later copy that failed without a point does not hide it (its point is still the way on)', async () => {
    const failed: JobInfo = { ...mirror('local/a', 'san1/b', T2, 'source'), id: 'j2', error: { code: 'Internal', message: 'x' } };
    expect(await resumed([suspended('j1', T1), failed])).toEqual(['j1']);
  });

  it('a later copy that went further does: suspended again (that one is resumed), switched over, or still running', async () => {
    expect(await resumed([suspended('j1', T1), suspended('j2', T2)])).toEqual(['j2']);
    expect(await resumed([suspended('j1', T1), { ...mirror('local/a', 'san1/b', T2, 'target'), id: 'j2' }])).toEqual([]);
    expect(await resumed([suspended('j1', T1), { ...mirror('local/a', 'san1/b', T2, 'source'), id: 'j2', status: 'running' }])).toEqual([]);
  });

  it('a copy whose service died: its source comes back with its writes held, and it is resumed; not once any later copy of its volumes ran (the writes then are in no record of its)', async () => {
    const crashed: JobInfo = { ...mirror('local/a', 'san1/b', T1, 'source'), id: 'j1', crashed: true, error: { code: 'Internal', message: 'interrupted' } };
    expect(await resumed([crashed])).toEqual(['held local/a', 'j1']);
    const cancelledLater: JobInfo = { ...mirror('local/a', 'san1/b', T2, 'source'), id: 'j2', cancelled: true, error: { code: 'Cancelled', message: 'cancelled' } };
    expect(await resumed([crashed, cancelledLater])).toEqual(['held local/a']);
    expect(await resumed([crashed, { ...crashed, id: 'j2', createdAt: T2 }])).toEqual(['held local/a', 'j2']);
  });
});


describe("hosted exports and the tokens file's nbdClients read again", () => {
  /** A broker view of carol whose exports start admitting `clients`; what is done to them is logged. */
  function carolsBroker(clients: string[], o: { setFails?: boolean } = {}): { broker: Broker; log: string[] } {
    const log: string[] = [];
    const broker = {
      principal: { id: 'carol', role: 'tenant', nbdClients: ['alice', 'eve'] },
      as: () => broker,
      exports: {
        start: async (r: string, opt: ExportOptions) => ({
          name: opt.name ?? r, ref: r, uri: 'nbds://127.0.0.1:10809/vm', readOnly: true, clients, stopped: new Promise<void>(() => undefined),
          stop: async () => { log.push(`stop ${opt.name ?? r}`); }, onRetarget: () => undefined,
        }),
        setClients: async (name: string, c: string[]) => {
          if (o.setFails) throw Object.assign(new Error('clients are told apart by TLS, which this server does not require'), { code: 'InvalidArgument' });
          log.push(`clients ${name} ${c.join(',')}`);
          return { name, clients: c };
        },
        stop: async (name: string) => { log.push(`stop ${name}`); },
      },
    } as unknown as Broker;
    return { broker, log };
  }
  const hosted = () => {
    const dir = mkdtempSync(join(tmpdir(), 'offload-hosted-'));
    dirs.push(dir);
    return new HostedExports(dir, silentLogger);
  };
  const narrowed = (p: { id: string; role: 'admin' | 'tenant' }) => (p.id === 'carol' ? { ...p, nbdClients: ['eve'] } : p);

  it('an export started under the file before it was read again (its request let in then) is narrowed at once; one left with none is refused and stopped', async () => {
    const h = hosted();
    await h.rebind(carolsBroker([]).broker, narrowed); // the file read again: carol's hosts are eve's only
    const { broker, log } = carolsBroker(['alice', 'eve']);
    expect(await h.start(broker, 'local/c1', { name: 'c1', readOnly: true })).toMatchObject({ clients: ['eve'] });
    expect(log).toEqual(['clients c1 eve']);
    const only = carolsBroker(['alice']);
    await expect(h.start(only.broker, 'local/c2', { name: 'c2', readOnly: true, clients: ['alice'] })).rejects.toMatchObject({ code: 'PermissionDenied' });
    expect(only.log).toEqual(['stop c2']);
  });

  it('an export whose clients cannot be narrowed stops, rather than admit the hosts the file took away', async () => {
    const h = hosted();
    const { broker, log } = carolsBroker(['alice', 'eve'], { setFails: true });
    await h.start(broker, 'local/c1', { name: 'c1', readOnly: true });
    await h.rebind(broker, narrowed);
    expect(log).toEqual(['stop c1']);
  });
});
