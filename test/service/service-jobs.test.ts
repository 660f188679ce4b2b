/**
 * Jobs and the service's life, with real processes: a job started with --detach goes on in the
 * service; a client killed mid-stream leaves its job running there to the end; a service stopped
 * with SIGTERM mid-job releases it (orphaned at once, not after its lease) and the next service
 * finishes it from its checkpoint; a runner killed mid-job has its job taken over by the service
 * (counted in /metrics).
 */
import { appendFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { http, offload, offloadChild, serve, setup, tickSteps, until, type ServiceChild, type Setup } from './service-helpers.js';

/** The steps a job ran, by which process, as runs: `[[pid, first, last], …]`. */
function runs(s: Setup): [number, number, number][] {
  const out: [number, number, number][] = [];
  for (const [pid, step] of tickSteps(s)) {
    const last = out[out.length - 1];
    if (last && last[0] === pid && last[2] === step - 1) last[2] = step;
    else out.push([pid, step, step]);
  }
  return out;
}

describe('jobs in the service', () => {
  let s: Setup | undefined;
  const services: ServiceChild[] = [];

  afterEach(async () => {
    for (const svc of services.splice(0)) if (svc.child.exitCode === null) await svc.stop();
    if (s) rmSync(s.dir, { recursive: true, force: true });
    s = undefined;
  });

  it('--detach prints the job id and returns at once; the job goes on in the service (embedded, --detach is bad usage)', async () => {
    s = setup({ steps: 30, stepMs: 30 });
    const svc = await serve(s);
    services.push(svc);
    const server = svc.addresses[0]!;
    const r = await offload(s, ['--server', server, 'stream', 'tick/d', '--detach']);
    expect(r.code).toBe(0);
    const id = r.out.trim();
    expect(id).toMatch(/^stream-[0-9a-f]+$/);
    expect(tickSteps(s).length).toBeLessThan(30); // returned before the job's end
    const json = await offload(s, ['--server', server, '--json', 'stream', 'tick/e', '--detach']);
    expect(JSON.parse(json.out)).toMatchObject({ id: expect.stringMatching(/^stream-/), ref: 'tick/e', status: expect.stringMatching(/created|running/) });
    const waited = await offload(s, ['--server', server, '--json', 'jobs', 'wait', id]);
    expect(waited.code).toBe(0);
    expect(JSON.parse(waited.out)).toMatchObject({ id, status: 'concluded', progress: { current: 30 * 1024 * 1024 } });
    expect(runs(s).every(([pid]) => pid === svc.child.pid)).toBe(true);

    const embedded = await offload(s, ['stream', 'tick/f', '--detach']);
    expect(embedded.code).toBe(2);
    expect(embedded.err).toMatch(/^offload: --detach needs a service/);
  });

  it('server: in the config: `offload serve` listens there and the CLI sends its commands there', async () => {
    s = setup();
    appendFileSync(s.config, '\nserver: unix:./state/svc.sock\n');
    const svc = await serve(s);
    services.push(svc);
    expect(svc.addresses).toEqual([`unix:${join(s.dir, 'state/svc.sock')}`]);
    expect((await offload(s, ['volume', 'create', 'local/c1', '1M'])).code).toBe(0);
    const metrics = await http(svc.addresses[0]!, 'GET', '/metrics');
    expect(metrics.text).toMatch(/offload_http_request_duration_seconds_count\{method="PUT",route="\/v1\/volumes\/:backend\/:name",status="200"\} 1/);
  });

  it('a client killed with SIGKILL mid-stream: the job runs to its end in the service', async () => {
    s = setup({ steps: 40, stepMs: 40 });
    const svc = await serve(s);
    services.push(svc);
    // OFFLOAD_SERVER, as a script would set it.
    const client = offloadChild(s, ['stream', 'tick/k'], { OFFLOAD_SERVER: svc.addresses[0]! });
    await until('the stream runs', () => tickSteps(s!).length >= 3);
    client.child.kill('SIGKILL');
    await client.exit;
    const [job] = JSON.parse((await offload(s, ['--server', svc.addresses[0]!, '--json', 'jobs', 'list'])).out) as { id: string }[];
    const waited = await offload(s, ['--server', svc.addresses[0]!, 'jobs', 'wait', job!.id]);
    expect(waited.code).toBe(0);
    expect(waited.out).toMatch(/concluded/);
    expect(runs(s)).toEqual([[svc.child.pid, 0, 39]]); // all of it, once, in the service
  });

  it('a client interrupted (SIGINT) mid-stream says where its job goes on, exits 130, and the job ends in the service', async () => {
    s = setup({ steps: 40, stepMs: 30 });
    const svc = await serve(s);
    services.push(svc);
    const client = offloadChild(s, ['--server', svc.addresses[0]!, 'stream', 'tick/i']);
    await until('the stream runs', () => tickSteps(s!).length >= 3);
    client.child.kill('SIGINT');
    expect(await client.exit).toBe(130);
    const id = /job (stream-[0-9a-f]+) goes on in the service/.exec(client.err())?.[1];
    expect(id).toBeDefined();
    expect((await offload(s, ['--server', svc.addresses[0]!, 'jobs', 'wait', id!])).code).toBe(0);
    expect(runs(s)).toEqual([[svc.child.pid, 0, 39]]);
  });

  it('SIGTERM mid-job: the service releases the job at once, and the next service finishes it from its checkpoint', async () => {
    s = setup({ steps: 60, stepMs: 30 }); // the default lease (15 s): released, not expired
    const first = await serve(s);
    services.push(first);
    const id = (await offload(s, ['--server', first.addresses[0]!, 'stream', 'tick/t', '--detach'])).out.trim();
    await until('the stream runs', () => tickSteps(s!).length >= 5);
    expect(await first.stop()).toBe(0);
    const orphaned = JSON.parse((await offload(s, ['--json', 'jobs', 'list', '--status', 'orphaned'])).out) as { id: string }[];
    expect(orphaned.map((j) => j.id)).toEqual([id]);

    const second = await serve(s);
    services.push(second);
    const waited = await offload(s, ['--server', second.addresses[0]!, 'jobs', 'wait', id]);
    expect(waited.code).toBe(0);
    const [a, b] = runs(s);
    expect(runs(s)).toHaveLength(2);
    expect(a).toEqual([first.child.pid, 0, expect.any(Number)]);
    expect(b).toEqual([second.child.pid, a![2] + 1, 59]); // from the checkpoint: no step twice, none left out
  });

  it('a runner killed mid-job: the service takes its job over (counted in /metrics) and finishes it', async () => {
    s = setup({ steps: 40, stepMs: 40, leaseSeconds: 1 });
    const svc = await serve(s);
    services.push(svc);
    const runner = offloadChild(s, ['stream', 'tick/r']); // embedded: this process runs the job
    await until('the stream runs', () => tickSteps(s!).length >= 3);
    runner.child.kill('SIGKILL');
    await runner.exit;
    const takeovers = async () => /^offload_job_takeovers_total 1$/m.test((await http(svc.addresses[0]!, 'GET', '/metrics')).text);
    await until('the service takes the job over', takeovers);
    const [job] = JSON.parse((await offload(s, ['--json', 'jobs', 'list'])).out) as { id: string }[];
    expect((await offload(s, ['--server', svc.addresses[0]!, 'jobs', 'wait', job!.id])).code).toBe(0);
    const [a, b] = runs(s);
    expect(a![0]).toBe(runner.child.pid);
    expect(b![0]).toBe(svc.child.pid);
    expect(b![2]).toBe(39);
    expect(b![1]).toBeGreaterThan(0); // resumed from a checkpoint, not from the start
  });
});
