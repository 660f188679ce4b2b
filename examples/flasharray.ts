/**
 * The SAN array tour: start the mock FlashArray on a free loopback port, build a broker around
 * it, and walk through create → write → snapshot → clone → revert → copy, printing where each
 * step ran (offloaded to the array, or through the host) and how many bytes crossed the host.
 *
 *   node --import tsx examples/flasharray.ts
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createBroker, type Plan } from '../core/index.js';
import { startFlashArrayMock } from '../plugins/flasharray/appliance/index.js';
import { flasharrayModule } from '../plugins/flasharray/module.js';

const MiB = 1024 * 1024;
const say = (text: string) => process.stdout.write(`${text}\n`);
const where = (plan: Plan) => plan.steps.map((s) => `${s.action} on ${s.executor}${s.hostBytes ? ` (${s.hostBytes} bytes through the host)` : ''}`).join(', ');

const mock = await startFlashArrayMock({ port: 0 });
say(`mock FlashArray on ${mock.url}`);
const state = mkdtempSync(join(tmpdir(), 'offload-fa-example-'));
const broker = await createBroker(
  { state, backends: [{ name: 'san1', kind: 'flasharray', endpoint: mock.url, apiToken: mock.apiToken }] },
  { plugins: [flasharrayModule] },
);

try {
  const [info] = await broker.backends();
  say(`backend san1 (${info!.kind}): ${info!.capabilities.names().join(' ')}`);

  const vm = await broker.volumes.create('san1/vm1', { sizeBytes: 64 * MiB });
  say(`created ${vm.backend}/${vm.name}: ${vm.sizeBytes} bytes`);

  const dev = await broker.volumes.open('san1/vm1', 'rw');
  await dev.write(0, Buffer.from('boot sector v1'.padEnd(512, '\0')));
  await dev.close();
  say('wrote 512 bytes to san1/vm1 over the data path');

  const snap = await broker.snapshots.create('san1/vm1@golden');
  say(`snapshot ${snap.volume}@${snap.name} (${(await broker.plan({ op: 'snapshot', ref: 'san1/vm1@golden' })).steps[0]?.executor ?? 'backend'})`);

  const clonePlan = await broker.plan({ op: 'clone', source: 'san1/vm1@golden', target: 'san1/vm2' });
  const vm2 = await broker.clone('san1/vm1@golden', 'san1/vm2', { mode: 'full', sizeBytes: 128 * MiB });
  say(`clone → ${vm2.name} (${vm2.sizeBytes} bytes): ${where(clonePlan)}`);

  const dev2 = await broker.volumes.open('san1/vm1', 'rw');
  await dev2.write(0, Buffer.from('boot sector v2 (oops)'.padEnd(512, '\0')));
  await dev2.close();
  await broker.snapshots.revert('san1/vm1@golden');
  const check = await broker.volumes.open('san1/vm1', 'r');
  const text = Buffer.from(await check.read(0, 14)).toString();
  await check.close();
  say(`reverted san1/vm1 to @golden (array overwrite): reads "${text}"`);

  await broker.volumes.create('san1/backup', { sizeBytes: 64 * MiB });
  const copyPlan = await broker.plan({ op: 'copy', source: 'san1/vm1', target: 'san1/backup' });
  const job = await broker.copy('san1/vm1', 'san1/backup');
  const done = await job.result();
  say(`copy san1/vm1 → san1/backup: ${where(copyPlan)}; job ${done.status} on ${done.executor}, ${done.progress.current} bytes moved`);

  const vols = await broker.volumes.listAll('san1');
  say(`volumes on san1: ${vols.map((v) => `${v.name} (${v.sizeBytes} B, ${v.allocatedBytes ?? '?'} B allocated)`).join(', ')}`);

  await broker.snapshots.delete('san1/vm1@golden');
  for (const v of ['vm1', 'vm2', 'backup']) await broker.volumes.delete(`san1/${v}`);
  say(`deleted everything (destroy + eradicate); volumes left: ${(await broker.volumes.listAll('san1')).length}`);
} finally {
  await broker.close();
  await mock.close();
  rmSync(state, { recursive: true, force: true });
}
