/**
 * The local pool tour: build a broker from examples/local-pool.yaml and walk through create →
 * write → snapshot → linked clone → full clone → revert → stream → commit, printing where each
 * step ran, what it wrote to disk and the qcow2 chain behind each volume (what
 * `qemu-img info --backing-chain` shows on the same files).
 *
 *   node --import tsx examples/local-pool.ts
 */
import { mkdirSync, statSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createBroker, type Broker } from '../core/index.js';
import { qcow2Module } from '../plugins/qcow2/module.js';
import { Qcow2Pool } from '../plugins/qcow2/pool/pool-backend.js';

const MiB = 1024 * 1024;
const here = dirname(fileURLToPath(import.meta.url));
const say = (text: string) => process.stdout.write(`${text}\n`);

mkdirSync(join(here, '.offload', 'local-pool'), { recursive: true });
const broker = await createBroker(join(here, 'local-pool.yaml'), { plugins: [qcow2Module] });
const pool = broker.backend('local') as Qcow2Pool;
const chain = (v: string) => pool.chainFiles(v).map((f) => basename(f)).join(' → ');
const onDisk = (v: string) => pool.chainFiles(v).reduce((n, f) => n + statSync(f).blocks * 512, 0);

async function write(b: Broker, ref: string, offset: number, text: string): Promise<void> {
  const dev = await b.volumes.open(ref, 'rw');
  try {
    await dev.write(offset, Buffer.from(text.padEnd(4096, '\0')));
    await dev.flush();
  } finally {
    await dev.close();
  }
}

async function read(b: Broker, ref: string, offset: number): Promise<string> {
  const dev = await b.volumes.open(ref, 'r');
  try {
    return Buffer.from(await dev.read(offset, 64)).toString().replace(/\0+$/, '');
  } finally {
    await dev.close();
  }
}

async function cleanup(): Promise<void> {
  // Clones first, then their sources (a rerun starts from an empty pool).
  for (const v of ['tour-copy', 'tour-clone', 'tour-vm']) {
    for (const s of await broker.snapshots.list(`local/${v}`).catch(() => [])) await broker.snapshots.delete(`local/${v}@${s.name}`).catch(() => undefined);
    await broker.volumes.delete(`local/${v}`);
  }
}

try {
  await cleanup();
  const [info] = await broker.backends();
  say(`backend local (${info!.kind}) at ${pool.dir}: ${info!.capabilities.names().join(' ')}`);

  await broker.volumes.create('local/tour-vm', { sizeBytes: 1024 * MiB });
  await write(broker, 'local/tour-vm', 0, 'boot sector v1');
  say(`created local/tour-vm (1 GiB) and wrote 4 KiB: ${chain('tour-vm')}`);

  await broker.snapshots.create('local/tour-vm@golden');
  say(`snapshot local/tour-vm@golden on the host (native, instant): tour-vm continues in ${chain('tour-vm')}`);

  const clonePlan = await broker.plan({ op: 'clone', source: 'local/tour-vm@golden', target: 'local/tour-clone', mode: 'linked' });
  await broker.clone('local/tour-vm@golden', 'local/tour-clone', { mode: 'linked' });
  say(`linked clone local/tour-clone: ${clonePlan.steps.map((s) => `${s.action} on ${s.executor}`).join(', ')}; ` +
    `its own file takes ${statSync(pool.chainFiles('tour-clone')[0]!).size} bytes; chain ${chain('tour-clone')}`);

  await broker.clone('local/tour-vm@golden', 'local/tour-copy', { mode: 'full' });
  say(`full clone local/tour-copy (copied through the host, as a job): owns all its data, ${onDisk('tour-copy')} bytes on disk (sparse): ${chain('tour-copy')}`);

  await write(broker, 'local/tour-vm', 0, 'boot sector v2 (broken update)');
  await broker.snapshots.revert('local/tour-vm@golden');
  say(`wrote "boot sector v2", reverted to golden: reads "${await read(broker, 'local/tour-vm', 0)}"; chain ${chain('tour-vm')}`);

  const stream = await broker.stream('local/tour-clone');
  const sInfo = await stream.wait();
  say(`stream local/tour-clone ran on ${sInfo.executor}: ${sInfo.status}; now independent: ${chain('tour-clone')}`);
  await broker.snapshots.delete('local/tour-vm@golden');
  say(`deleted local/tour-vm@golden (no clone depends on it any more): ${chain('tour-vm')}`);

  await broker.snapshots.create('local/tour-vm@before-patch');
  await write(broker, 'local/tour-vm', 8192, 'patch applied');
  const commit = await broker.commit('local/tour-vm', { base: 'before-patch' });
  const cInfo = await commit.wait();
  say(`commit local/tour-vm into before-patch ran on ${cInfo.executor}: ${cInfo.status}; chain ${chain('tour-vm')}; ` +
    `reads "${await read(broker, 'local/tour-vm', 8192)}"`);

  const report = await pool.check();
  say(`pool check: ${report.volumes} volumes, ${report.layers} files, ${report.issues.length === 0 ? 'no problems' : report.issues.map((i) => i.message).join('; ')}`);
  await cleanup();
} finally {
  await broker.close();
}
