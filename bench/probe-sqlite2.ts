import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { JobStore } from '../core/jobs/job-store.js';
const dir = mkdtempSync(join(tmpdir(), 'psq-'));
new JobStore(join(dir, 'jobs.sqlite')).close();
const raw = new Database(join(dir, 'jobs.sqlite'));
raw.pragma('journal_mode = WAL'); raw.pragma('synchronous = NORMAL');
const N = 20000;
function time(what: string, f: (i: number) => void) {
  const t0 = performance.now();
  for (let i = 0; i < N; i++) f(i);
  console.log(what.padEnd(30), ((performance.now() - t0) / N * 1000).toFixed(1), 'µs');
}
const q = (s: string) => raw.prepare(s);
const ops = q('SELECT * FROM op_locks WHERE id IN (SELECT id FROM op_locks WHERE key IN (SELECT value FROM json_each(?))) ORDER BY id, rowid');
const ops1 = q('SELECT * FROM op_locks WHERE id IN (SELECT id FROM op_locks WHERE key = ?) ORDER BY id, rowid');
const maint = q('SELECT key, principal, reason FROM maintenance WHERE key IN (SELECT value FROM json_each(?)) ORDER BY key');
const own = q('SELECT ref, owner FROM owners WHERE ref IN (SELECT value FROM json_each(?))');
const jobs = q(`SELECT * FROM jobs WHERE status <> 'concluded' ORDER BY created_at, id`);
time('ops json_each', (i) => ops.all(JSON.stringify([`k${i}`])));
time('ops =', (i) => ops1.all(`k${i}`));
time('maint', (i) => maint.all(JSON.stringify([`k${i}`])));
time('owners', (i) => own.all(JSON.stringify([`k${i}`])));
time('jobs active', () => jobs.all());
console.log(raw.prepare(`EXPLAIN QUERY PLAN SELECT * FROM jobs WHERE status <> 'concluded' ORDER BY created_at, id`).all());
