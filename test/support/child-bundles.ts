/**
 * vitest's global setup: a folder for this run's bundles of child entry points (test/support/ts-child.ts),
 * under the package root (node_modules/.cache), removed at the end.
 */
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { join, resolve } from 'node:path';
import type { TestProject } from 'vitest/node';

export default function setup(project: TestProject): () => void {
  const base = resolve(import.meta.dirname, '../../node_modules/.cache/offload-test-children');
  mkdirSync(base, { recursive: true });
  const dir = mkdtempSync(join(base, 'run-'));
  project.provide('childBundles', dir);
  return () => rmSync(dir, { recursive: true, force: true });
}
