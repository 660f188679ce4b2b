/**
 * Kill campaign for instant clone (issue 16, items 3 and 6): `offload serve` runs a fill job
 * into a SAN mock volume (a raw target: the record of what is filled lives in the state store),
 * and hosts an export of the clone that a writer uses (FUA writes, every acknowledgement kept).
 * The service is killed with SIGKILL at random moments; after each restart the fill job is
 * resumed from its record, the export comes back through the fill, and the clone holds every
 * acknowledged write over the source's data (a write in flight may have landed or not). The
 * fill's progress never goes back by more than the chunk in flight and one save interval (no restart from
 * zero); at the end the clone equals the model. OFFLOAD_LONG=1: 32 kills (a slower fill); otherwise 4.
 * The writer keeps to the first 4 MiB, so that its writes (each filling its granule first) do not
 * finish the fill before the kills are done.
 */
import { describe, expect, it } from 'vitest';
import { until } from '../service/service-helpers.js';
import { liveServiceForSuite, readExport as readWhole, type LiveService } from '../support/live-service.js';
import { CMD, openExport, reply, request } from '../support/nbd-client.js';
import { NbdWriter } from '../support/nbd-writer.js';

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;
const SPEED = process.env.OFFLOAD_LONG === '1' ? 512 * 1024 : 1 * MiB;
const KILLS = process.env.OFFLOAD_LONG === '1' ? 32 : 4;
const readExport = (port: number, name: string) => readWhole(port, name, SIZE);

describe('kill -9 during an instant clone', () => {
  let ls: LiveService;
  const client = (...args: string[]) => ls.client(...args);
  const json = (...args: string[]) => ls.json(...args);

  liveServiceForSuite((started) => {
    ls = started;
  });

  it(`${KILLS} kills while it fills and is written: resumed each time, never losing an acknowledged write, never starting over`, async () => {
    // The source: a pool volume with data in every other MiB, through an export of its own.
    expect((await client('volume', 'create', 'local/golden', `${SIZE}`)).code).toBe(0);
    const gold = await client('nbd', 'local/golden', '--port', '0', '--name', 'golden');
    const goldPort = Number(new URL(gold.out.trim()).port);
    const g = await openExport(goldPort, 'golden');
    for (let off = 0; off < SIZE; off += 2 * MiB) {
      request(g.wire, CMD.WRITE, off, MiB, { payload: Buffer.alloc(MiB, (off / MiB) % 250 + 3) });
      expect((await reply(g.wire)).error).toBe(0);
    }
    request(g.wire, CMD.FLUSH, 0, 0);
    expect((await reply(g.wire)).error).toBe(0);
    const golden = await readExport(goldPort, 'golden');
    expect((await client('nbd', 'stop', 'golden')).code).toBe(0);

    const started = await json('clone', '--instant', 'local/golden', 'san1/vm', '--speed', `${SPEED}`) as { job: { id: string } };
    const jobId = started.job.id;
    const exp = await client('nbd', 'san1/vm', '--port', '0', '--name', 'vm');
    expect(exp.code, exp.err).toBe(0);
    const port = Number(new URL(exp.out.trim()).port);
    let model = golden;
    let lastProgress = 0;
    let kills = 0;
    const resumedAt: number[] = [];
    for (; kills < KILLS; kills++) {
      const info = await json('jobs', 'show', jobId) as { status: string; progress: { current: number; total: number } };
      if (info.status === 'concluded') break;
      const writer = await NbdWriter.start({ port, name: 'vm', connections: 2, fua: true, pauseMs: 20, span: 4 * MiB }, model);
      await new Promise((r) => setTimeout(r, 50 + Math.random() * 400));
      const before = ((await json('jobs', 'show', jobId)) as { progress: { current: number } }).progress.current;
      await ls.kill();
      await writer.stop().catch(() => undefined);
      await ls.restart();
      await until('the export is back', async () => ((await json('nbd', 'list')) as { name: string }[]).some((e) => e.name === 'vm'));
      const image = await readExport(port, 'vm');
      expect(writer.lost(image), `kill ${kills + 1}`).toEqual([]);
      model = image; // what is there now (in-flight writes settled one way or the other)
      const now = (await json('jobs', 'show', jobId)) as { status: string; progress: { current: number } };
      // Resumed from its record: at most the chunk in flight and a save interval's copying (250 ms) done again.
      expect(now.progress.current).toBeGreaterThanOrEqual(before - 2 * MiB);
      expect(now.progress.current).toBeGreaterThanOrEqual(lastProgress - 2 * MiB);
      lastProgress = now.progress.current;
      resumedAt.push(now.progress.current);
    }
    expect(kills).toBeGreaterThanOrEqual(Math.min(KILLS, 4));
    expect(resumedAt.some((p) => p > 0)).toBe(true);
    // Let it finish (the rest at full speed); the clone then equals the model, and the source is free.
    expect((await client('jobs', 'set-speed', jobId, '0')).code).toBe(0);
    await until('the fill ends', async () => ((await json('jobs', 'show', jobId)) as { status: string }).status === 'concluded', 600, 100);
    const done = await json('jobs', 'show', jobId) as { error?: unknown };
    expect(done.error).toBeUndefined();
    expect((await readExport(port, 'vm')).equals(model)).toBe(true);
    expect((await client('volume', 'delete', 'local/golden')).code).toBe(0);
    console.log(`instant-crash: ${kills} kills; progress after each restart (MiB): ${resumedAt.map((p) => (p / MiB).toFixed(1)).join(' ')}`);
  });
});
