/**
 * The NAS appliance tour: start the mock ONTAP appliance on a free loopback port, build a broker
 * around it, and walk through create → write → snapshot → FlexClone → clone split. The split runs
 * on the appliance as an asynchronous job; the broker job follows it and shows its progress.
 *
 *   node --import tsx examples/ontap.ts
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createBroker, type Plan } from '../core/index.js';
import { startOntapMock } from '../plugins/ontap/appliance/server.js';
import { ontapModule } from '../plugins/ontap/module.js';

const MiB = 1024 * 1024;
const say = (text: string) => process.stdout.write(`${text}\n`);
const where = (plan: Plan) => plan.steps.map((s) => `${s.action} on ${s.executor}${s.hostBytes ? ` (${s.hostBytes} bytes through the host)` : ''}`).join(', ');

// A slow split rate so that the progress is visible.
const mock = await startOntapMock({ port: 0, splitBytesPerSecond: 16 * MiB });
say(`mock ONTAP appliance on ${mock.url} (user ${mock.username})`);
const state = mkdtempSync(join(tmpdir(), 'offload-ontap-example-'));
const broker = await createBroker(
  {
    state,
    backends: [{ name: 'nas1', kind: 'ontap', endpoint: mock.url, username: mock.username, password: mock.password, svm: 'svm0', pollIntervalMs: 50 }],
  },
  { plugins: [ontapModule] },
);

try {
  const [info] = await broker.backends();
  say(`backend nas1 (${info!.kind}): ${info!.capabilities.names().join(' ')}`);

  await broker.volumes.create('nas1/golden', { sizeBytes: 256 * MiB });
  const dev = await broker.volumes.open('nas1/golden', 'rw');
  await dev.write(0, Buffer.alloc(32 * MiB, 0x5a)); // an "OS image"
  await dev.close();
  say('created nas1/golden (256 MiB) and wrote 32 MiB into it');

  await broker.snapshots.create('nas1/golden@base');
  say(`clone:  ${where(await broker.plan({ op: 'clone', source: 'nas1/golden@base', target: 'nas1/vm1', mode: 'linked' }))}`);
  await broker.clone('nas1/golden@base', 'nas1/vm1', { mode: 'linked' });
  say(`cloned nas1/golden@base → nas1/vm1 (FlexClone: instant, shares every block; parent ${(await broker.volumes.get('nas1/vm1')).parent})`);

  say(`stream: ${where(await broker.plan({ op: 'stream', ref: 'nas1/vm1' }))}`);
  const job = await broker.stream('nas1/vm1');
  let last = -1;
  job.on((e) => {
    if (e.type !== 'progress' || e.job.progress.total === 0) return;
    const pct = Math.floor((100 * e.job.progress.current) / e.job.progress.total);
    if (pct >= last + 10) {
      last = pct;
      say(`  split ${job.id}: ${pct}% (${e.job.progress.current}/${e.job.progress.total} bytes, executor ${e.job.executor})`);
    }
  });
  const done = await job.result();
  say(`split done: status ${done.status}, executor ${done.executor}, ${done.progress.total} bytes copied on the appliance`);

  await broker.snapshots.delete('nas1/golden@base');
  await broker.volumes.delete('nas1/golden');
  say(`nas1/vm1 is independent (parent: ${(await broker.volumes.get('nas1/vm1')).parent ?? 'none'}); nas1/golden deleted`);
} finally {
  await broker.close();
  await mock.close();
  rmSync(state, { recursive: true, force: true });
}
