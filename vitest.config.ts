import { availableParallelism } from 'node:os';
import { defineConfig } from 'vitest/config';

// CI asks for a JSON report as well (to print "N passed, N failed, N skipped").
const jsonReport = process.env.OFFLOAD_VITEST_JSON;

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts', 'plugins/**/*.test.ts', 'core/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    pool: 'forks',
    // A file per core, not vitest's default of one fewer: most files mostly wait (child processes,
    // qemu tools, leases and timers, the disk), and on 2 cores one at a time took 612 s, two 315 s.
    maxWorkers: Math.max(2, availableParallelism()),
    // Bundles of the entry points tests start as child processes (test/support/ts-child.ts).
    globalSetup: ['test/support/child-bundles.ts'],
    ...(jsonReport ? { reporters: ['default', 'json'], outputFile: { json: jsonReport } } : {}),
  },
});
