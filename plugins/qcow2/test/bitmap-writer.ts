/**
 * Child process of the bitmap crash test: sessions of open read-write, random writes (and, now
 * and then, a bitmap added, cleared, disabled or enabled), close. Prints `ACK {op}` after each
 * op returns and `CLOSED` after each close. The parent kills it with SIGKILL at random, or
 * between two sessions.
 * Usage: node --import tsx bitmap-writer.ts IMAGE SEED
 */
import { writeSync } from 'node:fs';
import { openImage } from '../index.js';

const [file, seedArg] = process.argv.slice(2);
let x = Number(seedArg) >>> 0 || 1;
const rnd = (n: number) => {
  x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
  return x % n;
};
const size = 16 * 1024 * 1024;
writeSync(1, 'READY\n');
for (let session = 0; session < 1000; session++) {
  const img = await openImage(file!, { readOnly: false });
  const names = (await img.bitmaps.info()).filter((b) => !b.inconsistent).map((b) => b.name);
  const ops = 5 + rnd(20);
  for (let k = 0; k < ops; k++) {
    const r = rnd(100);
    let op: Record<string, unknown>;
    if (r < 85 || names.length === 0) {
      const len = 512 * (1 + rnd(300));
      const off = 512 * rnd((size - len) / 512);
      if (r % 7 === 0) await img.writeZeroes(off, len);
      else await img.write(off, new Uint8Array(len).fill(1 + rnd(250)));
      op = { kind: 'write', off, len };
    } else {
      const name = names[rnd(names.length)]!;
      const what = r < 90 ? 'clear' : r < 95 ? 'disable' : 'enable';
      if (what === 'clear') await img.bitmaps.clear(name);
      else if (what === 'disable') await img.bitmaps.disable(name);
      else await img.bitmaps.enable(name);
      op = { kind: what, name };
    }
    writeSync(1, `ACK ${JSON.stringify(op)}\n`);
  }
  await img.close();
  writeSync(1, 'CLOSED\n');
  // A pause between sessions when asked (BETWEEN_MS): a parent that kills on CLOSED lands in it.
  if (process.env.BETWEEN_MS) await new Promise((r) => setTimeout(r, Number(process.env.BETWEEN_MS)));
}
