/**
 * Clones through the host as jobs (issue 13's bugs): a racing create is never adopted, a clone
 * shows as a job and can be cancelled, the broker runs the planner's plan with one capability
 * check per request, --prefer host and --verify, and the CLI loads its plugins once.
 */
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ContainerModule } from 'inversify';
import { afterEach, describe, expect, it } from 'vitest';
import { BackendFactory, createBroker, JobRun, runCli, silentLogger, type BlockDevice, type Broker } from '../../core/index.js';
import { cloneTask, type CloneDeps, type HostCloneParams } from '../../core/copy/host-copy.js';
import { qcow2Module } from '../../plugins/qcow2/module.js';
import { memoryBackends, memoryFactory, memoryModule, type MemoryBackend } from '../support/memory-backend.js';

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function make(backends: Record<string, unknown>[]): Promise<Broker> {
  const state = mkdtempSync(join(tmpdir(), 'offload-host-clone-'));
  const b = await createBroker({ state, backends: backends as never }, { plugins: [memoryModule], logger: silentLogger });
  cleanups.push(() => rmSync(state, { recursive: true, force: true }));
  cleanups.push(() => b.close());
  return b;
}

const MiB = 1 << 20;
const fill = (n: number, v: number) => new Uint8Array(n).fill(v);

async function writeAt(b: Broker, ref: string, off: number, data: Uint8Array): Promise<void> {
  const d = await b.volumes.open(ref, 'rw');
  await d.write(off, data);
  await d.close();
}

async function readAt(b: Broker, ref: string, off: number, len: number): Promise<Uint8Array> {
  const d = await b.volumes.open(ref, 'r');
  try {
    return await d.read(off, len);
  } finally {
    await d.close();
  }
}

describe('a clone through the host', () => {
  it('never adopts, overwrites or deletes a volume of the same name created while it starts', async () => {
    const b = await make([{ name: 'a', kind: 'memory' }, { name: 'z', kind: 'memory' }]);
    await b.volumes.create('a/src', { sizeBytes: 4 * MiB });
    await writeAt(b, 'a/src', 0, fill(MiB, 1));
    // Someone creates z/dst (same size) and writes to it just after the clone looked for it.
    const z = memoryBackends.get('z')!;
    const look = z.getVolume.bind(z);
    let raced = false;
    z.getVolume = async (name: string) => {
      const found = await look(name);
      if (name === 'dst' && !raced) {
        raced = true;
        await b.volumes.create('z/dst', { sizeBytes: 4 * MiB });
        await writeAt(b, 'z/dst', 0, fill(MiB, 9));
      }
      return found;
    };
    await expect(b.clone('a/src', 'z/dst')).rejects.toMatchObject({ code: 'AlreadyExists' });
    expect(raced).toBe(true);
    // Theirs, untouched: not adopted, not overwritten, not deleted.
    expect((await readAt(b, 'z/dst', 0, MiB)).every((x) => x === 9)).toBe(true);
    const jobs = (await b.jobs.list());
    expect(jobs).toHaveLength(1);
    expect(jobs[0]).toMatchObject({ type: 'clone', error: { code: 'AlreadyExists' } });
  });

  it('while it runs, its target is the job\'s: a create of that name is Busy, naming the job', async () => {
    const b = await make([{ name: 'a', kind: 'memory' }, { name: 'z', kind: 'memory' }]);
    await b.volumes.create('a/src', { sizeBytes: 16 * MiB });
    await writeAt(b, 'a/src', 0, fill(16 * MiB, 3));
    const { job } = await b.startClone('a/src', 'z/dst', { speed: 4 * MiB });
    for (let i = 0; i < 500 && job!.info().progress.current === 0; i++) await new Promise((r) => setTimeout(r, 10));
    await expect(b.volumes.create('z/dst', { sizeBytes: 16 * MiB })).rejects.toMatchObject({ code: 'Busy', message: expect.stringContaining(job!.id) });
    job!.setSpeed(0);
    expect((await job!.result()).status).toBe('concluded');
    expect((await readAt(b, 'z/dst', 15 * MiB, MiB)).every((x) => x === 3)).toBe(true);
  });

  it('is a job: listed with its progress, and cancelling it removes the target it made', async () => {
    const b = await make([{ name: 'a', kind: 'memory' }, { name: 'z', kind: 'memory' }]);
    await b.volumes.create('a/src', { sizeBytes: 32 * MiB });
    await writeAt(b, 'a/src', 0, fill(32 * MiB, 5));
    const started = await b.startClone('a/src', 'z/dst', { speed: 8 * MiB });
    expect(started.volume).toBeUndefined();
    const job = started.job!;
    for (let i = 0; i < 500 && job.info().progress.current === 0; i++) await new Promise((r) => setTimeout(r, 10));
    const listed = (await b.jobs.list()).find((j) => j.id === job.id)!;
    expect(listed).toMatchObject({ type: 'clone', executor: 'host', ref: 'z/dst', status: 'running' });
    expect(listed.progress.current).toBeGreaterThan(0);
    expect(listed.progress.current).toBeLessThan(32 * MiB);
    expect(listed.progress.total).toBe(32 * MiB);
    expect((await b.volumes.get('z/dst')).sizeBytes).toBe(32 * MiB);
    await b.jobs.cancel(job.id);
    await expect(job.result()).rejects.toMatchObject({ code: 'Cancelled' });
    await expect(b.volumes.get('z/dst')).rejects.toMatchObject({ code: 'NotFound' });
    expect(await memoryBackends.get('z')!.getVolume('dst')).toBeUndefined();
  });

  it('runs the planner\'s plan, checking each capability once per request', async () => {
    const b = await make([{ name: 'a', kind: 'memory' }, { name: 'z', kind: 'memory' }]);
    await b.volumes.create('a/src', { sizeBytes: MiB });
    await writeAt(b, 'a/src', 0, fill(MiB, 7));
    const checks = new Map<string, number>();
    for (const name of ['a', 'z']) {
      const caps = await b.backend(name).capabilities();
      const has = caps.has.bind(caps);
      caps.has = (cap: string) => {
        checks.set(`${name}:${cap}`, (checks.get(`${name}:${cap}`) ?? 0) + 1);
        return has(cap);
      };
    }
    await b.clone('a/src', 'z/dst');
    expect([...checks].filter(([, n]) => n > 1)).toEqual([]);
    expect(checks.get('a:data.read')).toBe(1);
    expect(checks.get('z:data.write')).toBe(1);
    expect(checks.get('z:volume.create')).toBe(1);
    expect((await readAt(b, 'z/dst', 0, MiB)).every((x) => x === 7)).toBe(true);
  });

  it('--prefer host copies where the backend would clone natively; linked cannot go through the host', async () => {
    const b = await make([{ name: 'm', kind: 'memory' }]);
    await b.volumes.create('m/src', { sizeBytes: 2 * MiB });
    await writeAt(b, 'm/src', MiB, fill(MiB, 4));
    expect((await b.plan({ op: 'clone', source: 'm/src', target: 'm/dst', mode: 'full', prefer: 'host' })).steps.map((s) => s.executor)).toEqual(['backend:m', 'host']);
    const started = await b.startClone('m/src', 'm/dst', { mode: 'full', prefer: 'host' });
    expect((await started.job!.result()).executor).toBe('host');
    expect((await readAt(b, 'm/dst', MiB, MiB)).every((x) => x === 4)).toBe(true);
    const native = await b.startClone('m/src', 'm/dst2', { mode: 'full' });
    expect(native.volume?.name).toBe('dst2');
    await expect(b.clone('m/src', 'm/dst3', { mode: 'linked', prefer: 'host' })).rejects.toMatchObject({ code: 'Unsupported' });
    await expect(b.clone('m/src', 'm/dst4', { prefer: 'sideways' as never })).rejects.toMatchObject({ code: 'InvalidArgument' });
    // Options of a copy through the host are refused on an offloaded clone, not ignored.
    await expect(b.clone('m/src', 'm/dst5', { mode: 'full', verify: true })).rejects.toMatchObject({ code: 'InvalidArgument', hint: expect.stringMatching(/--prefer host/) });
    await expect(b.clone('m/src', 'm/dst6', { speed: MiB })).rejects.toMatchObject({ code: 'InvalidArgument' });
    await expect(b.copy('m/src', 'm/dst', { prefer: 'native' })).rejects.toMatchObject({ code: 'InvalidArgument' });
  });

  it('--verify compares checksums after the copy: a target that loses writes fails the job as Corrupt', async () => {
    const b = await make([{ name: 'a', kind: 'memory' }, { name: 'z', kind: 'memory' }]);
    await b.volumes.create('a/src', { sizeBytes: 8 * MiB });
    await writeAt(b, 'a/src', 0, fill(8 * MiB, 6));
    await b.volumes.create('z/good', { sizeBytes: 8 * MiB });
    await b.volumes.create('z/bad', { sizeBytes: 8 * MiB });
    // z/bad's data path drops every write at 4 MiB (an appliance one should not trust).
    const z = memoryBackends.get('z')! as MemoryBackend;
    const open = z.openVolume.bind(z);
    z.openVolume = async (name: string, mode: 'r' | 'rw'): Promise<BlockDevice> => {
      const dev = await open(name, mode);
      if (name !== 'bad') return dev;
      return { ...dev, sizeBytes: dev.sizeBytes, write: async (off: number, data: Uint8Array) => (off === 4 * MiB ? undefined : dev.write(off, data)) };
    };
    expect((await (await b.copy('a/src', 'z/good', { verify: true })).result()).status).toBe('concluded');
    const quiet = await (await b.copy('a/src', 'z/bad')).result(); // without --verify the loss goes unseen
    expect(quiet.error).toBeUndefined();
    await expect((await b.copy('a/src', 'z/bad', { verify: true })).result()).rejects.toMatchObject({
      code: 'Corrupt', message: expect.stringMatching(/at offset 4194304/),
    });
  });

  it('--verify where the source has no data: what the target holds there is read and must be zeros; its holes are not read', async () => {
    const b = await make([{ name: 'a', kind: 'memory' }, { name: 'z', kind: 'memory' }]);
    await b.volumes.create('a/sparse', { sizeBytes: 64 * MiB });
    await writeAt(b, 'a/sparse', 0, fill(MiB, 3));
    for (const v of ['z/stale', 'z/clean']) await b.volumes.create(v, { sizeBytes: 64 * MiB });
    await writeAt(b, 'z/stale', 32 * MiB + 4096, fill(4096, 9)); // old data where the source has none
    const z = memoryBackends.get('z')! as MemoryBackend;
    const open = z.openVolume.bind(z);
    let readFromTarget = 0;
    z.openVolume = async (name: string, mode: 'r' | 'rw'): Promise<BlockDevice> => {
      const dev = await open(name, mode);
      return {
        ...dev, sizeBytes: dev.sizeBytes,
        read: async (off: number, len: number) => { readFromTarget += len; return dev.read(off, len); },
        // Zeroing is lost (an appliance one should not trust): z/stale keeps its old data where the
        // source has none; z/clean, empty, reads as zeros there all the same.
        writeZeroes: async () => undefined,
      };
    };
    const failed = await (await b.copy('a/sparse', 'z/stale', { verify: true })).result().catch((e: unknown) => e);
    expect(failed).toMatchObject({ code: 'Corrupt', message: expect.stringMatching(/in 4096 bytes at offset 33558528/) });
    readFromTarget = 0;
    const done = await (await b.copy('a/sparse', 'z/clean', { verify: true })).result();
    expect(done.status).toBe('concluded');
    expect(readFromTarget).toBe(MiB); // its data, not 64 MiB
  });
});

describe('the clone job across a stop (cloneTask resumed)', () => {
  /** The clone task's broker side over memory backends a and z, counting what it removes and owns. */
  async function setup() {
    const b = await make([{ name: 'a', kind: 'memory' }, { name: 'z', kind: 'memory' }]);
    await b.volumes.create('a/src', { sizeBytes: 2 * MiB });
    await writeAt(b, 'a/src', 0, fill(MiB, 2));
    const z = memoryBackends.get('z')!;
    const removed: string[] = [];
    const owned: string[] = [];
    const deps: CloneDeps = {
      open: (ref, mode) => b.volumes.open(ref, mode),
      find: (ref) => z.getVolume(ref.split('/')[1]!),
      create: (ref, sizeBytes, owner) => z.createVolume({ name: ref.split('/')[1]!, sizeBytes, owner }),
      own: async (ref) => void owned.push(ref),
      remove: async (ref) => { removed.push(ref); await z.deleteVolume(ref.split('/')[1]!); },
    };
    const params: HostCloneParams = { source: 'a/src', target: 'z/dst', targetFresh: true, sizeBytes: 2 * MiB, owner: 'admin' };
    return { b, z, deps, params, removed, owned };
  }

  it('stopped between "creating" and "created", it leaves a volume it finds there alone', async () => {
    const { z, deps, params, removed } = await setup();
    await z.createVolume({ name: 'dst', sizeBytes: 2 * MiB });
    await expect(cloneTask(params, deps).run(new JobRun({ resumeFrom: { creating: true } }))).rejects.toMatchObject({
      code: 'AlreadyExists', message: expect.stringMatching(/may be the one this clone was creating/),
    });
    expect(removed).toEqual([]);
    expect(await z.getVolume('dst')).toBeDefined();
  });

  it('resumed after the create, it takes back the volume it made, but not one that replaced it', async () => {
    const { z, deps, params, removed, owned } = await setup();
    const made = await z.createVolume({ name: 'dst', sizeBytes: 2 * MiB });
    await cloneTask(params, deps).run(new JobRun({ resumeFrom: { created: true, createdAt: made.createdAt, offset: 0 } }));
    expect(owned).toEqual(['z/dst']);
    const dev = await z.openVolume('dst', 'r');
    expect((await dev.read(0, MiB)).every((x) => x === 2)).toBe(true);
    await dev.close();
    await expect(cloneTask(params, deps).run(new JobRun({ resumeFrom: { created: true, createdAt: '1999-01-01T00:00:00.000Z' } })))
      .rejects.toMatchObject({ code: 'AlreadyExists', message: expect.stringMatching(/replaced while the job was stopped/) });
    expect(removed).toEqual([]);
  });

  it('a create that fails (the name was taken outside the broker meanwhile) deletes nothing', async () => {
    const { z, deps, params, removed } = await setup();
    const taken: CloneDeps = { ...deps, create: async (ref, size, owner) => { await z.createVolume({ name: 'dst', sizeBytes: size * 2 }); return deps.create(ref, size, owner); } };
    await expect(cloneTask(params, taken).run(new JobRun())).rejects.toMatchObject({ code: 'AlreadyExists' });
    expect(removed).toEqual([]);
    expect((await z.getVolume('dst'))!.sizeBytes).toBe(4 * MiB);
  });
});

describe('the CLI', () => {
  it('loads the plugin container once per run, also for commands that open a broker', async () => {
    let loads = 0;
    const counted = new ContainerModule(({ bind }) => {
      loads++;
      bind(BackendFactory).toConstantValue(memoryFactory);
    });
    const dir = mkdtempSync(join(tmpdir(), 'offload-cli-once-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const config = join(dir, 'offload.yaml');
    writeFileSync(config, `state: ${join(dir, 'state')}\nbackends:\n  - name: m\n    kind: memory\n`);
    const out: string[] = [];
    const io = { stdout: { write: (s: string) => out.push(s) }, stderr: { write: (s: string) => out.push(s) } };
    expect(await runCli(['--config', config, 'backends'], { plugins: [counted], io: io as never })).toBe(0);
    expect(out.join('')).toContain('m');
    expect(loads).toBe(1);
  });

  it('clone through the host shows as a job and prints the new volume', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'offload-cli-clone-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const config = join(dir, 'offload.yaml');
    // Two local pools: the volumes outlive each command (the memory backend's would not).
    for (const p of ['a', 'z']) mkdirSync(join(dir, p));
    writeFileSync(config, `state: ${join(dir, 'state')}\nbackends:\n  - name: a\n    kind: qcow2\n    path: ${join(dir, 'a')}\n  - name: z\n    kind: qcow2\n    path: ${join(dir, 'z')}\n`);
    const run = async (...argv: string[]) => {
      const out: string[] = [];
      const io = { stdout: { write: (s: string) => out.push(s) }, stderr: { write: (s: string) => out.push(s) } };
      const code = await runCli(['--config', config, ...argv], { plugins: [qcow2Module], io: io as never });
      return { code, out: out.join('') };
    };
    expect((await run('volume', 'create', 'a/src', '4M')).code).toBe(0);
    // Data to copy and verify (a broker over the same pools writes it; the CLI has no write verb).
    const writer = await createBroker(config, { plugins: [qcow2Module], logger: silentLogger });
    await writeAt(writer, 'a/src', MiB, fill(MiB, 3));
    await writer.close();
    const cloned = await run('--json', 'clone', 'a/src', 'z/dst', '--verify');
    expect(cloned.code).toBe(0);
    const printed = JSON.parse(cloned.out) as { name: string; job: { type: string; executor: string; status: string; progress: { current: number; total: number } } };
    expect(printed).toMatchObject({ name: 'dst', job: { type: 'clone', executor: 'host', status: 'concluded' } });
    expect(printed.job.progress).toEqual({ current: 2 * MiB, total: 2 * MiB }); // 1 MiB copied, then verified
    const plan = await run('plan', 'clone', 'a/src', 'a/other', '--full', '--prefer', 'host');
    expect(plan.out).toMatch(/data\.copy on host/);
    expect((await run('clone', 'a/src', 'a/x', '--prefer', 'nowhere')).code).toBe(2);
  });
});
