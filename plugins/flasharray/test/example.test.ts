/** The example program a user copies from must keep running and telling the truth. */
import { spawnSync } from 'node:child_process';
import { resolve } from 'node:path';
import { expect, it } from 'vitest';

it('examples/flasharray.ts walks through the tour and leaves nothing behind', () => {
  const root = resolve(import.meta.dirname, '../../..');
  const r = spawnSync(process.execPath, ['--import', 'tsx', 'examples/flasharray.ts'], { cwd: root, encoding: 'utf8', timeout: 60_000 });
  expect(r.stderr).toBe('');
  expect(r.status).toBe(0);
  expect(r.stdout).toMatch(/clone → vm2 \(134217728 bytes\): clone\.full on backend:san1/);
  expect(r.stdout).toMatch(/reads "boot sector v1"/);
  expect(r.stdout).toMatch(/copy san1\/vm1 → san1\/backup: data\.copy on host; job concluded on host/);
  expect(r.stdout).toMatch(/volumes left: 0/);
});
