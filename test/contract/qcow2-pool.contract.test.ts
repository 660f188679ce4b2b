import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { qcow2Module } from '../../plugins/qcow2/module.js';
import { describeBackendContract } from '../../testing/index.js';

describeBackendContract({
  name: 'qcow2 (local pool in a temporary folder)',
  setup: async () => {
    const dir = mkdtempSync(join(tmpdir(), 'offload-pool-contract-'));
    return {
      plugins: [qcow2Module],
      backend: { name: 'local', kind: 'qcow2', path: dir },
      teardown: async () => rmSync(dir, { recursive: true, force: true }),
    };
  },
});

describeBackendContract({
  name: 'qcow2 (raw pool: volumes and full copies only)',
  setup: async () => {
    const dir = mkdtempSync(join(tmpdir(), 'offload-pool-contract-raw-'));
    return {
      plugins: [qcow2Module],
      backend: { name: 'rawpool', kind: 'qcow2', path: dir, format: 'raw' },
      teardown: async () => rmSync(dir, { recursive: true, force: true }),
    };
  },
});
