/**
 * Child process for pool-multiprocess.test.ts: a broker of its own (its own state directory) on a
 * pool folder that other processes change at the same time.
 *   node --import tsx pool-worker.ts cycles POOL STATE TAG N   create, write, snapshot, clone, delete × N; race for shared names
 *   node --import tsx pool-worker.ts hold POOL STATE VOLUME    open VOLUME read-write, print "open", hold it until stdin closes
 * Prints one JSON line at the end: { ok, errors: [code: message] } (cycles).
 */
import { createBroker, silentLogger } from '../../core/index.js';
import { qcow2Module } from '../../plugins/qcow2/module.js';

const [mode, pool, state, arg, n] = process.argv.slice(2);
const broker = await createBroker({ state: state!, backends: [{ name: 'local', kind: 'qcow2', path: pool! }] }, { plugins: [qcow2Module], logger: silentLogger });
const MiB = 1024 * 1024;

if (mode === 'hold') {
  const dev = await broker.volumes.open(`local/${arg}`, 'rw');
  await dev.write(0, Buffer.alloc(4096, 7));
  process.stdout.write('open\n');
  process.stdin.resume();
  await new Promise((r) => process.stdin.on('end', r));
  await dev.close();
  await broker.close();
} else {
  const tag = arg!;
  const errors: string[] = [];
  let won = 0;
  // All workers start together: each says "ready" and waits for the parent's "go".
  process.stdout.write('ready\n');
  await new Promise<void>((r) => process.stdin.once('data', () => r()));
  // First a burst of creates of the same names, with different sizes (the same size would be
  // the same volume: create is idempotent): one worker wins each, the others are told it exists.
  await Promise.all(Array.from({ length: Number(n) }, async (_, i) => {
    try {
      await broker.volumes.create(`local/shared-${i}`, { sizeBytes: (tag.charCodeAt(0) % 16 + 1) * MiB });
      won++;
    } catch (e) {
      if ((e as { code?: string }).code !== 'AlreadyExists') errors.push(`${(e as { code?: string }).code}: ${(e as Error).message}`);
    }
  }));
  for (let i = 0; i < Number(n); i++) {
    const v = `local/${tag}-${i}`;
    try {
      await broker.volumes.create(v, { sizeBytes: 8 * MiB });
      const dev = await broker.volumes.open(v, 'rw');
      await dev.write(i * 4096, Buffer.alloc(4096, (i % 250) + 1));
      await dev.close();
      await broker.snapshots.create(`${v}@s`);
      await broker.clone(`${v}@s`, `${v}-c`, { mode: 'linked' });
      await broker.clone(v, `${v}-d`, { mode: 'linked' });
      await broker.volumes.delete(`${v}-c`);
      await broker.volumes.delete(`${v}-d`);
      await broker.snapshots.delete(`${v}@s`);
      if (i % 2 === 0) await broker.volumes.delete(v);
    } catch (e) {
      errors.push(`${(e as { code?: string }).code}: ${(e as Error).message}`);
    }
  }
  await broker.close();
  process.stdout.write(`${JSON.stringify({ ok: errors.length === 0, errors, won })}\n`);
}
