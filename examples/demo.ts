/**
 * The tour (`npm run demo`): starts the mock SAN (FlashArray-style) and NAS (ONTAP-style)
 * appliances on loopback ports and a local qcow2 pool in a temporary folder, builds one broker
 * over all three, and shows each operation, where it ran (offloaded to an appliance, native on the
 * host's qcow2 engine, or through the host data mover) and how many bytes crossed the host.
 */
import { execFile } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createBroker, formatSize, type Job, type Plan } from '../core/index.js';
import { builtinPlugins } from '../plugins/index.js';
import { startFlashArrayMock } from '../plugins/flasharray/index.js';
import { startOntapMock, MOCK_DEFAULTS } from '../plugins/ontap/index.js';

const MiB = 1024 * 1024;
const say = (text: string) => process.stdout.write(`${text}\n`);
const where = (plan: Plan) =>
  plan.supported
    ? plan.steps.map((s) => `${s.action} on ${s.executor}`).join(' → ')
    : `unsupported: ${plan.reason}`;

async function follow(job: Job, label: string): Promise<void> {
  let last = -1;
  job.on((e) => {
    const pct = e.job.progress.total ? Math.floor((e.job.progress.current / e.job.progress.total) * 100) : 0;
    if (pct >= last + 25) {
      last = pct;
      say(`   ${label}: ${e.job.status} ${pct}%`);
    }
  });
  const info = await job.result();
  say(`   ${label}: ${info.status} on ${info.executor}, ${formatSize(info.progress.current)} processed`);
}

/** qemu-io writing 64 KiB blocks through an export, if it is installed: what it reports at the end. */
function qemuIoWriter(uri: string): Promise<string> {
  const cmds = Array.from({ length: 200 }, (_, i) => ['-c', `write -P ${(i % 200) + 1} ${(i * 64 * 1024) % (64 * MiB)} 64k`]).flat();
  return new Promise((resolve) => {
    execFile('qemu-io', ['-f', 'raw', ...cmds, uri], (err, stdout) => {
      if (err && (err as NodeJS.ErrnoException).code === 'ENOENT') return resolve('qemu-io is not installed: nothing wrote meanwhile');
      const wrote = stdout.split('\n').filter((l) => l.startsWith('wrote')).length;
      resolve(err ? `qemu-io failed: ${err.message}` : `qemu-io wrote ${wrote} × 64 KiB across the switch-over, no error`);
    });
  });
}

const san = await startFlashArrayMock({ port: 0 });
const nas = await startOntapMock({ port: 0, splitBytesPerSecond: 64 * MiB });
const state = mkdtempSync(join(tmpdir(), 'offload-demo-'));
const pool = join(state, 'pool');
mkdirSync(pool);
say(`mock FlashArray on ${san.url}, mock ONTAP on ${nas.url}, local qcow2 pool in ${pool}`);

const broker = await createBroker(
  {
    state,
    backends: [
      { name: 'san1', kind: 'flasharray', endpoint: san.url, apiToken: san.apiToken },
      { name: 'nas1', kind: 'ontap', endpoint: nas.url, username: nas.username, password: nas.password, svm: MOCK_DEFAULTS.svm },
      { name: 'local', kind: 'qcow2', path: pool },
    ],
  },
  { plugins: builtinPlugins },
);

try {
  say('\nbackends:');
  for (const b of await broker.backends()) say(`   ${b.name} (${b.kind}): ${b.capabilities.names().join(' ')}`);

  say('\n1. a golden image on the NAS, written over its data path');
  await broker.volumes.create('nas1/golden', { sizeBytes: 256 * MiB });
  const dev = await broker.volumes.open('nas1/golden', 'rw');
  for (let i = 0; i < 8; i++) await dev.write(i * 16 * MiB, Buffer.alloc(MiB, 0x40 + i));
  await dev.close();
  say('   wrote 8 MiB in 8 extents');

  say('\n2. snapshot and linked clone on the NAS (FlexClone)');
  const p1 = await broker.plan({ op: 'clone', source: 'nas1/golden@base', target: 'nas1/vm1', mode: 'linked' });
  await broker.snapshots.create('nas1/golden@base');
  const vm1 = await broker.clone('nas1/golden@base', 'nas1/vm1', { mode: 'linked' });
  say(`   nas1/vm1 parent=${vm1.parent ?? '-'}: ${where(p1)}`);

  say('\n3. stream the clone so it stands alone (ONTAP clone split, offloaded)');
  say(`   plan: ${where(await broker.plan({ op: 'stream', ref: 'nas1/vm1' }))}`);
  await follow(await broker.stream('nas1/vm1'), 'stream nas1/vm1');

  say('\n4. copy the NAS volume to the SAN: no native path between appliances, so the host moves only allocated data');
  const p4 = await broker.plan({ op: 'clone', source: 'nas1/vm1', target: 'san1/vm1', mode: 'full' });
  say(`   plan: ${where(p4)}`);
  const toSan = await broker.startClone('nas1/vm1', 'san1/vm1', { mode: 'full' });
  const copyJob = await toSan.job!.result(); // a clone through the host is a job: progress, cancel, resume
  say(`   copy: ${copyJob.status} on ${copyJob.executor}, ${formatSize(copyJob.progress.current)} through the host (of a ${formatSize(256 * MiB)} volume)`);

  say('\n5. on the SAN: snapshot, instant copy, revert — all offloaded');
  await broker.snapshots.create('san1/vm1@before-upgrade');
  const p5 = await broker.plan({ op: 'clone', source: 'san1/vm1@before-upgrade', target: 'san1/vm1-test' });
  await broker.clone('san1/vm1@before-upgrade', 'san1/vm1-test');
  say(`   san1/vm1-test: ${where(p5)}`);
  await broker.snapshots.revert('san1/vm1@before-upgrade');
  say(`   revert san1/vm1: ${where(await broker.plan({ op: 'revert', ref: 'san1/vm1@before-upgrade' }))}`);

  say('\n6. on the host: the SAN volume into the local qcow2 pool, then snapshot, linked clone, stream and commit natively');
  const toLocal = await broker.startClone('san1/vm1', 'local/vm1', { mode: 'full' });
  const local = await toLocal.job!.result();
  say(`   san1/vm1 → local/vm1: ${local.status} on ${local.executor}, ${formatSize(local.progress.current)} through the host`);
  await broker.snapshots.create('local/vm1@golden');
  const p6 = await broker.plan({ op: 'clone', source: 'local/vm1@golden', target: 'local/vm2' });
  const vm2 = await broker.clone('local/vm1@golden', 'local/vm2', { mode: 'linked' });
  say(`   local/vm2 parent=${vm2.parent ?? '-'}: ${where(p6)} (a new overlay, instant whatever the size)`);
  const w = await broker.volumes.open('local/vm2', 'rw');
  await w.write(0, Buffer.alloc(MiB, 0x77));
  await w.close();
  await follow(await broker.stream('local/vm2'), 'stream local/vm2');
  await broker.snapshots.create('local/vm2@pre-patch');
  const w2 = await broker.volumes.open('local/vm2', 'rw');
  await w2.write(MiB, Buffer.alloc(MiB, 0x78));
  await w2.close();
  await follow(await broker.commit('local/vm2', { base: 'pre-patch' }), 'commit local/vm2 into @pre-patch');

  say('\n7. live migration SAN → NAS while the volume is written (qemu-io over NBD stands in for the VM)');
  const exp = await broker.exports.start('san1/vm1', { listen: { port: 0 } });
  say(`   san1/vm1 served at ${exp.uri}`);
  const writer = qemuIoWriter(exp.uri);
  const mig = await broker.copy('san1/vm1', 'nas1/vm1-moved', { live: true });
  while ((await broker.jobs.get(mig.id)).info().status !== 'ready') await new Promise((r) => setTimeout(r, 20));
  say(`   ${mig.id}: ready (nas1/vm1-moved in sync; writes go on)`);
  await broker.jobs.complete(mig.id);
  const moved = await mig.result();
  say(`   switched over: the export now serves ${moved.authoritative?.ref} (recorded before the switch), ${formatSize(moved.progress.current)} copied`);
  say(`   writer: ${await writer}`);
  await exp.stop();

  say('\n8. instant clone across storage: local/vm1 → nas1/vm9, served at once while it fills');
  const t0 = Date.now();
  const inst = await broker.startClone('local/vm1', 'nas1/vm9', { instant: true });
  const exp9 = await broker.exports.start('nas1/vm9', { listen: { port: 0 } });
  say(`   nas1/vm9 usable after ${Date.now() - t0} ms at ${exp9.uri}; job ${inst.job!.id} fills it`);
  const filled = await inst.job!.result();
  say(`   fill: ${filled.status} on ${filled.executor}, ${formatSize(filled.progress.current)} copied; the source is free again`);
  await exp9.stop();

  say('\n9. what cannot be done says why');
  say(`   linked clone SAN → NAS: ${where(await broker.plan({ op: 'clone', source: 'san1/vm1', target: 'nas1/x', mode: 'linked' }))}`);
  say(`   commit on the SAN: ${where(await broker.plan({ op: 'commit', ref: 'san1/vm1' }))}`);

  say('\njobs:');
  for (const j of await broker.jobs.list()) say(`   ${j.id} ${j.type} ${j.ref} ${j.status} on ${j.executor}${j.error ? ` (${j.error.code})` : ''}`);
} finally {
  await broker.close();
  await Promise.all([san.close(), nas.close()]);
  rmSync(state, { recursive: true, force: true });
}
