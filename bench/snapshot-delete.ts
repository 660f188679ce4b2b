/**
 * The pool's snapshot delete against what libvirt does with qemu-img for the same disk: a volume
 * of SIZE MiB (OFFLOAD_BENCH_MIB, default 512) filled, its only snapshot taken, 4 MiB written
 * since, then the snapshot deleted. The pool commits the 4 MiB down into the snapshot's layer (the
 * layer then serves the volume); qemu-img's equivalent is `qemu-img commit` of the overlay into
 * its base (libvirt's blockcommit of an external snapshot). Also the oldest of two snapshots (a
 * rotation), where the pool commits the next snapshot's layer down into the deleted one's, whose
 * file then takes that layer's name (until 2026-12-06 it merged the whole disk up), against
 * `qemu-img commit` of the middle layer.
 *
 *   npm run build && node --import tsx bench/snapshot-delete.ts
 */
import { mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { Qcow2Pool } from '../plugins/qcow2/pool/pool-backend.js';
import { median, requireBuilt, timed, workDir } from './harness.js';

requireBuilt();
const MiB = 1 << 20;
const SIZE = Number(process.env.OFFLOAD_BENCH_MIB ?? 512) * MiB;
const ROUNDS = Number(process.env.OFFLOAD_BENCH_ROUNDS ?? 3);
const dir = workDir('offload-bench-snapdel-');

async function pool(): Promise<{ p: Qcow2Pool; path: string }> {
  const path = join(dir, `pool-${Math.random().toString(36).slice(2)}`);
  mkdirSync(path);
  return { p: new Qcow2Pool({ name: 'local', dir: path, format: 'qcow2', clusterSize: 65536, allowBackingOutsidePool: false }), path };
}

async function write(p: Qcow2Pool, from: number, len: number, byte: number): Promise<void> {
  const d = await p.openVolume('v', 'rw');
  for (let o = from; o < from + len; o += 8 * MiB) await d.write(o, new Uint8Array(Math.min(8 * MiB, from + len - o)).fill(byte));
  await d.flush();
  await d.close();
}

/** ms to delete, in a fresh pool: `snaps` snapshots (each followed by 4 MiB written), deleting the first. */
async function ours(snaps: number): Promise<number> {
  const { p, path } = await pool();
  await p.createVolume({ name: 'v', sizeBytes: SIZE });
  await write(p, 0, SIZE, 1);
  for (let i = 0; i < snaps; i++) {
    await p.createSnapshot('v', `s${i}`);
    await write(p, i * 4 * MiB, 4 * MiB, 2 + i);
  }
  const t0 = performance.now();
  await p.deleteSnapshot('v', 's0');
  const ms = performance.now() - t0;
  await p.close();
  rmSync(path, { recursive: true, force: true });
  return ms;
}

/** The same chain as files (base ← [mid ←] top), then qemu-img commit of the layer above the deleted point. */
function qemu(snaps: number): number {
  const path = join(dir, `q-${Math.random().toString(36).slice(2)}`);
  mkdirSync(path);
  const io = (file: string, cmd: string) => timed('qemu-io', ['-c', cmd, file], path);
  timed('qemu-img', ['create', '-f', 'qcow2', 'l0.qcow2', String(SIZE)], path);
  io('l0.qcow2', `write -P 1 0 ${SIZE}`);
  for (let i = 0; i < snaps; i++) {
    timed('qemu-img', ['create', '-f', 'qcow2', '-b', `l${i}.qcow2`, '-F', 'qcow2', `l${i + 1}.qcow2`], path);
    io(`l${i + 1}.qcow2`, `write -P ${2 + i} ${i * 4 * MiB} ${4 * MiB}`);
  }
  // Deleting the point l0 stands for: commit the layer right above it down into it.
  const { ms } = timed('qemu-img', ['commit', '-d', 'l1.qcow2'], path);
  rmSync(path, { recursive: true, force: true });
  return ms;
}

try {
  process.stdout.write(`snapshot delete of a ${SIZE / MiB} MiB volume, 4 MiB written since each snapshot; medians of ${ROUNDS}\n`);
  for (const [what, snaps] of [['the only snapshot (committed down)', 1], ['the oldest of two (next one committed down)', 2]] as const) {
    const o: number[] = [];
    const q: number[] = [];
    for (let r = 0; r < ROUNDS; r++) {
      o.push(await ours(snaps));
      q.push(qemu(snaps));
    }
    const om = median(o);
    const qm = median(q);
    process.stdout.write(`${what.padEnd(44)} offload ${om.toFixed(0).padStart(6)} ms   qemu-img commit ${qm.toFixed(0).padStart(6)} ms   ratio ${(om / qm).toFixed(2)}\n`);
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
