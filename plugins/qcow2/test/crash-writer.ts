/**
 * Child process of the crash test: opens the image read-write and runs the op sequence,
 * printing `READY` and `END k` after each op. The parent kills it with SIGKILL at random.
 * Usage: node --import tsx crash-writer.ts IMAGE SEED [write-through|deferred|fua]
 * With `deferred` the image is opened with deferred metadata and a small cache, so that the
 * metadata is written in batches (and the kill lands inside those batches too). With `fua` the
 * writes are durable ones (write(…, { fua: true })): each one's file writes go in one native call.
 */
import { writeSync } from 'node:fs';
import { openImage } from '../index.js';
import { crashOps } from './crash-ops.js';

const [file, seedArg, mode] = process.argv.slice(2);
const ops = crashOps(Number(seedArg));
const img = await openImage(file!, { readOnly: false, ...(mode === 'deferred' ? { deferMetadata: true, cacheBytes: 16 * 1024 } : {}) });
writeSync(1, 'READY\n');
for (let k = 0; k < ops.length; k++) {
  const o = ops[k]!;
  switch (o.kind) {
    case 'write': await img.write(o.off, new Uint8Array(o.len).fill(o.byte), { fua: mode === 'fua' }); break;
    case 'zero': await img.writeZeroes(o.off, o.len); break;
    case 'discard': await img.discard(o.off, o.len); break;
    case 'resize': await img.resize(o.size); break;
    case 'snapshot-create': await img.snapshots.create(o.name); break;
    case 'snapshot-delete': await img.snapshots.delete(o.name); break;
  }
  writeSync(1, `END ${k}\n`);
}
await img.close();
writeSync(1, 'DONE\n');
