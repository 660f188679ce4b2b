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
import { BackendFactory, createBroker, runCli, silentLogger, type BlockDevice, type Broker } from '../../core/index.js';
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
    const jobs = b.jobs.list();
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
    const listed = b.jobs.list().find((j) => j.id === job.id)!;
    expect(listed).toMatchObject({ type: 'clone', executor: 'host', ref: 'z/dst', status: 'running' });
    expect(listed.progress.current).toBeGreaterThan(0);
    expect(listed.progress.current).toBeLessThan(32 * MiB);
    expect(listed.progress.total).toBe(32 * MiB);
    expect((await b.volumes.get('z/dst')).sizeBytes).toBe(32 * MiB);
    b.jobs.cancel(job.id);
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
    const cloned = await run('--json', 'clone', 'a/src', 'z/dst', '--verify');
    expect(cloned.code).toBe(0);
    const printed = JSON.parse(cloned.out) as { name: string; job: { type: string; executor: string; status: string } };
    expect(printed).toMatchObject({ name: 'dst', job: { type: 'clone', executor: 'host', status: 'concluded' } });
    const plan = await run('plan', 'clone', 'a/src', 'a/other', '--full', '--prefer', 'host');
    expect(plan.out).toMatch(/data\.copy on host/);
    expect((await run('clone', 'a/src', 'a/x', '--prefer', 'nowhere')).code).toBe(2);
  });
});
