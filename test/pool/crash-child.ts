/**
 * A pool user that is killed (SIGKILL, no cleanup) right after a layer file is created and before
 * the metadata records it: `node --import tsx crash-child.ts POOL_DIR OPERATION`.
 * Operations: create (volume `crashed`), snapshot (of volume `v`), clone-linked (of `v` itself into `copy`).
 */
import { Qcow2Pool } from '../../plugins/qcow2/pool/pool-backend.js';

const [dir, op] = process.argv.slice(2) as [string, string];
const pool = new Qcow2Pool({
  name: 'local', dir, format: 'qcow2', clusterSize: 65536, allowBackingOutsidePool: false,
  hooks: { afterFileCreated: () => { process.kill(process.pid, 'SIGKILL'); } },
});
if (op === 'create') await pool.createVolume({ name: 'crashed', sizeBytes: 1 << 30 });
else if (op === 'snapshot') await pool.createSnapshot('v', 'never');
else if (op === 'clone-linked') await pool.createVolume({ name: 'copy', source: { volume: 'v' }, mode: 'linked' });
process.stdout.write('not killed\n');
