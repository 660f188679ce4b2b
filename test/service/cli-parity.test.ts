/**
 * One matrix: the same CLI commands run embedded and as the client of a real `offload serve` (a
 * child process) print the same thing and exit with the same code — successes, --json output,
 * typed errors (NotFound, InvalidArgument, FailedPrecondition, OutOfRange, Busy) and bad usage.
 * Only what must differ is normalized: the folders, times, job ids and pids.
 */
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { offload, offloadChild, serve, setup, tickSteps, until, type Result, type ServiceChild, type Setup } from './service-helpers.js';

function normalize(r: Result, s: Setup): Result {
  const clean = (t: string) => t
    .split(s.dir).join('DIR')
    .replace(/\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z/g, 'TIME')
    .replace(/\b(stream|commit|clone|copy|export|import|backup|op)-[0-9a-f]{8,}\b/g, 'ID')
    .replace(/"pid": \d+/g, '"pid": 0').replace(/\bpid \d+/g, 'pid PID')
    .replace(/seen \d+ s ago/g, 'seen N s ago');
  return { code: r.code, out: clean(r.out), err: clean(r.err) };
}

describe('the CLI embedded and through a service', () => {
  let emb: Setup;
  let svc: Setup;
  let service: ServiceChild;
  const both = async (args: string[] | ((s: Setup) => string[])): Promise<[Result, Result]> => {
    const argv = (s: Setup) => (typeof args === 'function' ? args(s) : args);
    const a = await offload(emb, argv(emb));
    const b = await offload(svc, ['--server', service.addresses[0]!, ...argv(svc)]);
    return [normalize(a, emb), normalize(b, svc)];
  };
  const same = async (code: number, args: string[] | ((s: Setup) => string[])) => {
    const [a, b] = await both(args);
    expect({ args, ...b }).toEqual({ args, ...a });
    expect({ args, code: a.code, err: a.err }).toEqual({ args, code, err: code === 0 ? '' : expect.any(String) });
    return a;
  };

  beforeAll(async () => {
    emb = setup({ steps: 400, stepMs: 25 });
    svc = setup({ steps: 400, stepMs: 25 });
    service = await serve(svc);
  });

  afterAll(async () => {
    expect(await service.stop()).toBe(0);
    rmSync(emb.dir, { recursive: true, force: true });
    rmSync(svc.dir, { recursive: true, force: true });
  });

  it('volumes, snapshots, clones, chain and copy jobs, plans, files, locks, exports: same output, same exit codes', async () => {
    await same(0, ['backends']);
    await same(0, ['--json', 'backends']);
    await same(0, ['volume', 'create', 'local/a', '16M']);
    await same(0, ['volume', 'create', 'local/a', '16M']); // idempotent
    await same(0, ['--json', 'volume', 'show', 'local/a']);
    await same(1, ['volume', 'show', 'local/ghost']); // NotFound
    await same(1, ['--json', 'volume', 'show', 'local/ghost']); // and its JSON
    await same(2, ['volume', 'create', 'local/bad name', '1M']); // InvalidArgument: bad usage
    await same(2, ['volume', 'create', 'local/x', '12X']);
    await same(2, ['volume', 'show', 'ghost']);
    await same(2, ['volume', 'show', 'local/']);
    await same(2, ['frobnicate']);
    await same(1, ['volume', 'show', 'nas9/v']); // an unknown backend
    await same(0, ['snapshot', 'create', 'local/a@s1']);
    await same(2, ['snapshot', 'create', 'local/a']);
    await same(0, ['--json', 'snapshot', 'list', 'local/a']);
    await same(0, ['clone', 'local/a@s1', 'local/b', '--linked']);
    await same(1, ['snapshot', 'delete', 'local/a@s1']); // FailedPrecondition: a clone depends on it
    await same(0, ['--json', 'volume', 'list', 'local']);
    await same(0, ['stream', 'local/b']);
    await same(0, ['volume', 'resize', 'local/a', '32M']);
    await same(1, ['volume', 'resize', 'local/a', '8M']); // OutOfRange
    await same(0, ['--json', 'plan', 'clone', 'local/a', 'local/c', '--full']);
    await same(1, ['plan', 'commit', 'tick/x']); // unsupported: exit 1
    await same(0, ['clone', 'local/a', 'local/c', '--full']); // a job through the host
    await same(0, ['--json', 'copy', 'local/a', 'local/c', '--verify']);
    await same(0, (s) => ['volume', 'export', 'local/a', join(s.dir, 'a.raw')]);
    await same(1, (s) => ['volume', 'export', 'local/a', join(s.dir, 'a.raw')]); // AlreadyExists
    await same(0, (s) => ['volume', 'import', join(s.dir, 'a.raw'), 'local/d', '--create']);
    await same(0, ['locks', 'maintenance', 'local/a', '--reason', 'disk check']);
    await same(0, ['--json', 'locks', 'list']);
    await same(0, ['locks', 'release', 'local/a']);
    await same(0, ['--json', 'nbd', 'list']);
    await same(1, ['nbd', 'stop', 'nothing']);
    await same(0, ['jobs', 'list']);
    await same(1, ['jobs', 'show', 'stream-000000000000']);
    await same(1, ['jobs', 'cancel', 'stream-000000000000']);
    await same(0, ['volume', 'delete', 'local/d']);
    await same(0, ['volume', 'delete', 'local/d']); // gone is fine
  });

  it('changed blocks: volume changes, copy --since, backup (one volume and a group), backups, restore: same output, same exit codes', async () => {
    await same(0, ['volume', 'create', 'local/cb', '32M']);
    await same(0, ['snapshot', 'create', 'local/cb@s1']);
    await same(0, ['copy', 'local/a', 'local/cb']); // a's data: the change
    await same(0, ['volume', 'changes', 'local/cb', '--since', 's1']);
    await same(0, ['--json', 'volume', 'changes', 'local/cb', '--since', 's1']);
    await same(1, ['volume', 'changes', 'local/cb', '--since', 'nope']); // NotFound
    await same(1, ['volume', 'changes', 'tick/x', '--since', 's1']); // a backend that cannot tell
    await same(0, ['volume', 'create', 'local/cb2', '32M']);
    await same(0, ['copy', 'local/cb', 'local/cb2', '--since', 's1']);
    await same(0, ['backup', 'local/cb', '--to', 'local/cb-set']);
    await same(0, ['backup', 'local/cb', '--to', 'local/cb-set']);
    await same(0, ['--json', 'backups', 'local/cb-set']);
    await same(0, ['restore', 'local/cb-set@b1', '--to', 'local/cb-back']);
    await same(1, ['restore', 'local/cb-set@b9', '--to', 'local/cb-back']); // NotFound
    await same(2, ['backup', 'local/cb']); // --to is required
    await same(0, ['backup', 'local/cb=local/cbg-set', 'local/cb2=local/cbg-set2']); // a group: one job
    await same(0, ['backup', 'local/cb=local/cbg-set', 'local/cb2=local/cbg-set2']);
    await same(0, ['--json', 'backups', 'local/cbg-set2']);
    await same(2, ['backup', 'local/cb=local/cbg-set', 'local/cb=local/cbg-set2']); // a disk twice (InvalidArgument)
    await same(2, ['backup', 'local/cb=local/cbg-set', '--to', 'local/x']);
    await same(2, ['backup', 'local/cb', 'local/cb2', '--to', 'local/x']);
  });

  it('a volume busy with a job: Busy naming it, and the job cancelled', async () => {
    // Embedded, the job runs in another offload process; with a service, in the service (--detach).
    const runner = offloadChild(emb, ['stream', 'tick/x']);
    await until('the embedded stream runs', () => tickSteps(emb).length > 0);
    const started = await offload(svc, ['--server', service.addresses[0]!, 'stream', 'tick/x', '--detach']);
    expect(started.code).toBe(0);
    expect(started.out).toMatch(/^stream-[0-9a-f]+\n$/);
    await until('the service\'s stream runs', () => tickSteps(svc).length > 0);

    // The one difference: embedded, the job holding the lock runs in another process, which the
    // message names (pid); the service's job runs where the request is answered.
    const [ea, eb] = await both(['stream', 'tick/x']);
    expect({ ...eb, err: eb.err }).toEqual({ ...ea, err: ea.err.replace(' (pid PID)', '') });
    expect(ea.err).toMatch(/^offload: Busy: tick\/x is busy: job ID \(stream tick\/x \(pid PID\), admin\) holds an exclusive lock/);
    // The same jobs (as objects: a job listed by its runner and one read from the store may order their keys differently), each at its own progress.
    const running = (r: Result) => (JSON.parse(r.out) as { progress: { current: number } }[]).map((j) => ({ ...j, progress: { ...j.progress, current: 'N' } }));
    const [a, b] = await both(['--json', 'jobs', 'list', '--status', 'running']);
    expect(running(b)).toEqual(running(a));
    const runningId = async (s: Setup, server: string[]) => (JSON.parse((await offload(s, [...server, '--json', 'jobs', 'list', '--status', 'running'])).out) as { id: string; ref: string }[])
      .find((j) => j.ref === 'tick/x')!.id;
    const ids = new Map([[emb, await runningId(emb, [])], [svc, await runningId(svc, ['--server', service.addresses[0]!])]]);
    await same(0, (s) => ['jobs', 'cancel', ids.get(s)!]);
    const waited = await same(1, (s) => ['jobs', 'wait', ids.get(s)!]); // concluded, cancelled: exit 1
    expect(waited.out).toMatch(/failed: Cancelled/);
    expect(await runner.exit).toBe(1); // the embedded command reports its cancelled job
  });
});
