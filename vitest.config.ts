import { defineConfig } from 'vitest/config';

// CI asks for a JSON report as well (to print "N passed, N failed, N skipped").
const jsonReport = process.env.OFFLOAD_VITEST_JSON;

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts', 'plugins/**/*.test.ts', 'core/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    pool: 'forks',
    // Bundles of the entry points tests start as child processes (test/support/ts-child.ts).
    globalSetup: ['test/support/child-bundles.ts'],
    ...(jsonReport ? { reporters: ['default', 'json'], outputFile: { json: jsonReport } } : {}),
  },
});
