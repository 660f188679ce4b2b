/**
 * A process that reads a snapshot of a pool volume: `node snapshot-reader-child.ts POOL_DIR VOLUME
 * SNAPSHOT`. Prints `open` once the snapshot is open; for each line on stdin, reads all of it and
 * prints the sha256 of what it read.
 */
import { createHash } from 'node:crypto';
import { createInterface } from 'node:readline';
import { Qcow2Pool } from '../../plugins/qcow2/pool/pool-backend.js';

const [dir, volume, snapshot] = process.argv.slice(2) as [string, string, string];
const pool = new Qcow2Pool({ name: 'local', dir, format: 'qcow2', clusterSize: 65536, allowBackingOutsidePool: false });
const dev = await pool.openSnapshot(volume, snapshot);
process.stdout.write('open\n');
for await (const _ of createInterface({ input: process.stdin })) {
  process.stdout.write(`${createHash('sha256').update(await dev.read(0, dev.sizeBytes)).digest('hex')}\n`);
}
await dev.close();
await pool.close();
