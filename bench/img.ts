/**
 * Issue 3's benchmark: on a 1 GiB qcow2 image with 512 MiB written (1 MiB every other MiB),
 *   (a) `offload img convert -O raw` vs `qemu-img convert -O raw`,
 *   (b) `offload img convert -O qcow2` from raw vs `qemu-img convert -O qcow2`,
 *   (c) 512 sequential 1 MiB writes via `offload img io` vs `qemu-io`,
 * median of 5 (OFFLOAD_BENCH_ROUNDS), the ratio ours/qemu and our peak RSS. Every result of ours
 * is checked with `qemu-img compare` against the source (the writes: with `qemu-io read -P`).
 *
 *   npm run build && node --import tsx bench/img.ts
 */
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { compare, peakRssOurs, report, requireBuilt, run, timed, timedOurs, workDir } from './harness.js';

requireBuilt();
const rounds = Number(process.env.OFFLOAD_BENCH_ROUNDS ?? 5);
const dir = workDir('offload-bench-img-');
const p = (n: string) => join(dir, n);
const MiB = 1024 * 1024;

try {
  process.stdout.write(`preparing 1 GiB image with 512 MiB written in ${dir} …\n`);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', p('src.qcow2'), '1G']);
  const writes: string[] = [];
  for (let i = 0; i < 512; i++) writes.push('-c', `write -q -P ${(i % 250) + 1} ${i * 2 * MiB} 1M`);
  run('qemu-io', ['-f', 'qcow2', ...writes, p('src.qcow2')]);
  run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', p('src.qcow2'), p('src.raw')]);
  const clean = (...names: string[]) => () => names.forEach((n) => rmSync(p(n), { force: true }));
  const same = (a: string, b: string) => () => run('qemu-img', ['compare', '-q', p(a), p(b)]);

  const rows = [
    compare('(a) convert qcow2 → raw', rounds, clean('q.raw', 'o.raw'),
      () => timed('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', p('src.qcow2'), p('q.raw')]),
      () => timedOurs(['img', 'convert', '-f', 'qcow2', '-O', 'raw', p('src.qcow2'), p('o.raw')]),
      () => peakRssOurs(['img', 'convert', '-f', 'qcow2', '-O', 'raw', p('src.qcow2'), p('o.raw')]),
      same('src.qcow2', 'o.raw')),
    compare('(b) convert raw → qcow2', rounds, clean('q.qcow2', 'o.qcow2'),
      () => timed('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', p('src.raw'), p('q.qcow2')]),
      () => timedOurs(['img', 'convert', '-f', 'raw', '-O', 'qcow2', p('src.raw'), p('o.qcow2')]),
      () => peakRssOurs(['img', 'convert', '-f', 'raw', '-O', 'qcow2', p('src.raw'), p('o.qcow2')]),
      same('src.raw', 'o.qcow2')),
    compare('(c) 512 sequential 1 MiB writes', rounds,
      () => {
        for (const n of ['wq.qcow2', 'wo.qcow2']) {
          rmSync(p(n), { force: true });
          run('qemu-img', ['create', '-q', '-f', 'qcow2', p(n), '1G']);
        }
      },
      () => timed('qemu-io', ['-f', 'qcow2', ...seqWrites(), p('wq.qcow2')]),
      () => timedOurs(['img', 'io', ...seqWrites(), p('wo.qcow2')]),
      () => peakRssOurs(['img', 'io', ...seqWrites(), p('wo.qcow2')]),
      () => run('qemu-io', ['-f', 'qcow2', '-c', 'read -q -P 7 0 512M', '-c', 'read -q -P 0 512M 512M', p('wo.qcow2')])),
  ];
  report(`img benchmark (median of ${rounds}; ratio = ours / qemu, ≤ 1.0 is the target; RSS target ≤ 128 MiB)`, rows);
} finally {
  rmSync(dir, { recursive: true, force: true });
}

function seqWrites(): string[] {
  const out: string[] = [];
  for (let i = 0; i < 512; i++) out.push('-c', `write -q -P 7 ${i * MiB} 1M`);
  return out;
}
