/** `npm run demo` (the README's first command) runs as is and shows where each operation ran. */
import { spawnSync } from 'node:child_process';
import { resolve } from 'node:path';
import { describe, expect, it } from 'vitest';

const ROOT = resolve(import.meta.dirname, '../..');

describe('examples/demo.ts', () => {
  it('tours the three backends and reports executors and host bytes', () => {
    const r = spawnSync(process.execPath, ['--import', 'tsx', 'examples/demo.ts'], { cwd: ROOT, encoding: 'utf8', timeout: 180_000 });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/stream nas1\/vm1: concluded on backend:nas1/);
    expect(r.stdout).toMatch(/copy: concluded on host, 8 MiB through the host \(of a 256 MiB volume\)/);
    expect(r.stdout).toMatch(/clone\.full on backend:san1/);
    expect(r.stdout).toMatch(/local\/vm2 parent=local\/vm1@golden: clone\.linked on backend:local/);
    expect(r.stdout).toMatch(/commit local\/vm2 into @pre-patch: concluded on backend:local/);
    expect(r.stdout).toMatch(/linked clone SAN → NAS: unsupported: /);
    expect(r.stdout).toMatch(/switched over: the export now serves nas1\/vm1-moved/);
    expect(r.stdout).toMatch(/writer: (qemu-io wrote 200 × 64 KiB across the switch-over, no error|qemu-io is not installed)/);
    expect(r.stdout).toMatch(/nas1\/vm9 usable after \d+ ms/);
    expect(r.stdout).toMatch(/fill: concluded on host/);
  });
});
