/**
 * The durable switch-over (issue 16, item 2): `offload serve` hosts a writable export that a
 * writer uses (FUA writes: acknowledged means durable; every acknowledgement kept), a live copy
 * of it runs in the service, and the service is killed with SIGKILL at a random point — in the bulk
 * pass, after ready, or just after `complete` was asked for. After each restart: the job is
 * concluded and says which side holds the data; the export is back, serving that side and no
 * other; the hosted-exports file names it; and that side holds every acknowledged write (a write
 * in flight at the kill may have landed or not). Where the source holds the data, the restarted
 * service has resumed the copy from its write-intent record: it switches over, and the target
 * holds every acknowledged write too. The next round copies on from there, to the pool or the
 * SAN mock by turns. OFFLOAD_LONG=1: 40 kills; otherwise 6.
 */
import { readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import type { MirrorState } from '../../core/live/mirror-task.js';
import { describe, expect, it } from 'vitest';
import { offload, until } from '../service/service-helpers.js';
import { liveServiceForSuite, readExport as readWhole, type LiveService } from '../support/live-service.js';
import { NbdWriter } from '../support/nbd-writer.js';
import { CMD_FLAG } from '../../core/export/nbd-protocol.js';
import { CMD, openExport, reply, request } from '../support/nbd-client.js';

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;
const KILLS = process.env.OFFLOAD_LONG === '1' ? 40 : 6;
const readExport = (port: number, name: string) => readWhole(port, name, SIZE);

describe('kill -9 around ready and complete of a live copy', () => {
  let ls: LiveService;
  const client = (...args: string[]) => ls.client(...args);
  const json = (...args: string[]) => ls.json(...args);

  liveServiceForSuite((started) => {
    ls = started;
  });

  /** The live copy the restarted service started to resume `id` (the newest mirror job of `source`). */
  async function resumedFrom(id: string, source: string): Promise<{ id: string }> {
    let found: { id: string } | undefined;
    await until('the copy is resumed', async () => {
      const all = await json('jobs', 'list') as { id: string; type: string; ref: string; createdAt: string; params: { pairs?: { source: string }[] } }[];
      found = all.filter((j) => j.type === 'mirror' && j.id !== id && (j.params.pairs ?? []).some((p) => p.source === source)).sort((a, b) => b.createdAt.localeCompare(a.createdAt))[0];
      return found !== undefined;
    });
    return found!;
  }


  it('`copy --live A=B C=D` through the service: one job for both disks; complete switches both exports', async () => {
    for (const v of ['local/g0', 'local/g1']) {
      expect((await client('volume', 'create', v, '8M')).code).toBe(0);
      expect((await client('nbd', v, '--port', '0')).code).toBe(0);
    }
    const job = await json('copy', '--live', 'local/g0=san1/g0', 'local/g1=san1/g1', '--detach') as { id: string; type: string };
    expect(job.type).toBe('mirror');
    await until('ready', async () => ((await json('jobs', 'show', job.id)) as { status: string }).status === 'ready', 600, 20);
    expect((await client('nbd', 'stop', 'local/g0')).err).toMatch(new RegExp(`Busy: export local/g0 serves local/g0 under live job ${job.id}`));
    expect((await client('jobs', 'complete', job.id)).code).toBe(0);
    await until('concluded', async () => ((await json('jobs', 'show', job.id)) as { status: string }).status === 'concluded', 600, 20);
    const shown = await client('jobs', 'show', job.id);
    expect(shown.out).toMatch(/data: san1\/g0 \(the target: the switch-over was recorded/);
    const listed = await json('nbd', 'list') as { name: string; ref: string }[];
    expect(listed.filter((e) => e.name.startsWith('local/g')).map((e) => e.ref).sort()).toEqual(['san1/g0', 'san1/g1']);
    expect((await client('copy', '--live', 'local/g0=san1/x', 'oops')).err).toMatch(/a pair is SRC=DST/);
    expect((await client('copy', 'local/g0=san1/x')).err).toMatch(/add --live/);
    for (const n of ['local/g0', 'local/g1']) expect((await client('nbd', 'stop', n)).code).toBe(0);
  });

  it('a clean stop (SIGTERM) suspends a ready live copy at a snapshot — the source stays current and is served again — and the restarted service resumes it as a new job with nothing to copy again; an instant clone\'s fill is kept and resumed', async () => {
    expect((await client('volume', 'create', 'local/t0', '8M')).code).toBe(0);
    const t0 = await openExport(Number(new URL((await client('nbd', 'local/t0', '--port', '0')).out.trim()).port), 'local/t0');
    request(t0.wire, CMD.WRITE, 0, 6 * MiB, { payload: Buffer.alloc(6 * MiB, 5) });
    expect((await reply(t0.wire)).error).toBe(0);
    request(t0.wire, CMD.DISC, 0, 0);
    t0.wire.socket.end();
    const mirror = await json('copy', '--live', 'local/t0', 'san1/t0', '--detach') as { id: string };
    await until('ready', async () => ((await json('jobs', 'show', mirror.id)) as { status: string }).status === 'ready', 600, 20);
    expect((await client('volume', 'create', 'local/t1', '32M')).code).toBe(0);
    const g = await openExport(Number(new URL((await client('nbd', 'local/t1', '--port', '0', '--name', 't1')).out.trim()).port), 't1');
    request(g.wire, CMD.WRITE, 0, 16 * MiB, { payload: Buffer.alloc(16 * MiB, 7) });
    expect((await reply(g.wire)).error).toBe(0);
    request(g.wire, CMD.DISC, 0, 0);
    g.wire.socket.end();
    expect((await client('nbd', 'stop', 't1')).code).toBe(0);
    const fill = await json('clone', '--instant', 'local/t1', 'san1/t1', '--speed', `${MiB}`) as { job: { id: string } };
    await new Promise((r) => setTimeout(r, 1500));
    expect(await ls.stop()).toBe(0);
    await ls.restart();
    const m = await json('jobs', 'show', mirror.id) as { status: string; error?: { code: string; message: string }; authoritative?: { side: string }; resumeSince?: string[] };
    expect(m).toMatchObject({ status: 'concluded', error: { code: 'Cancelled', message: expect.stringMatching(/stopped with its service/) }, authoritative: { side: 'source' }, resumeSince: [expect.stringMatching(/^live-/)] });
    await until('the export is back', async () => ((await json('nbd', 'list')) as { name: string; ref: string }[]).some((e) => e.name === 'local/t0' && e.ref === 'local/t0'));
    const resumed = await resumedFrom(mirror.id, 'local/t0');
    // Resumed once: the first job says by which, and is not the way on any more.
    expect(await json('jobs', 'show', mirror.id)).toMatchObject({ resumedBy: resumed.id });
    expect((await client('jobs', 'show', mirror.id)).out).toMatch(new RegExp(`resumed as job ${resumed.id}`));
    const twice = await client('copy', '--live', '--resume', mirror.id);
    expect(twice.err).toMatch(new RegExp(`FailedPrecondition: live copy ${mirror.id} was resumed as job ${resumed.id}`));
    await until('the resumed copy is ready', async () => ((await json('jobs', 'show', resumed.id)) as { status: string }).status === 'ready', 600, 20);
    const r = await json('jobs', 'show', resumed.id) as { progress: { total: number }; params: { pairs: { since?: string }[] } };
    expect(r.progress.total).toBeLessThan(MiB); // in sync at the snapshot: only what changed since, nothing again
    expect(r.params.pairs[0]!.since).toMatch(/^live-/);
    const f = await json('jobs', 'show', fill.job.id) as { status: string; progress: { current: number } };
    expect(f.status).not.toBe('concluded'); // taken up again by the restarted service, from its record
    expect(f.progress.current).toBeGreaterThan(0);
    await client('jobs', 'cancel', fill.job.id);
    expect((await client('jobs', 'complete', resumed.id)).code).toBe(0);
    await until('switched over', async () => ((await json('nbd', 'list')) as { name: string; ref: string }[]).some((e) => e.name === 'local/t0' && e.ref === 'san1/t0'));
    const port = Number(new URL(((await json('nbd', 'list')) as { name: string; uri: string }[]).find((e) => e.name === 'local/t0')!.uri).port);
    expect((await readWhole(port, 'local/t0', 8 * MiB)).subarray(0, 6 * MiB).equals(Buffer.alloc(6 * MiB, 5))).toBe(true);
    // The snapshots it resumed from are gone with the switch-over.
    expect(((await json('snapshot', 'list', 'local/t0')) as { name: string }[]).filter((x) => x.name.startsWith('live-'))).toEqual([]);
    expect((await client('nbd', 'stop', 'local/t0')).code).toBe(0);
  });

  it('a clean stop in the bulk pass suspends the copy where it was: the restarted service copies only what was left, and the target ends equal to the source', async () => {
    expect((await client('volume', 'create', 'local/t2', '8M')).code).toBe(0);
    const uri = (await client('nbd', 'local/t2', '--port', '0')).out.trim();
    const c = await openExport(Number(new URL(uri).port), 'local/t2');
    const data = Buffer.alloc(8 * MiB);
    for (let i = 0; i < 8; i++) data.fill(i + 40, i * MiB, (i + 1) * MiB);
    request(c.wire, CMD.WRITE, 0, 8 * MiB, { payload: data });
    expect((await reply(c.wire)).error).toBe(0);
    const mirror = await json('copy', '--live', 'local/t2', 'san1/t2', '--speed', `${4 * MiB}`, '--detach') as { id: string };
    await until('part-way', async () => ((await json('jobs', 'show', mirror.id)) as { progress: { current: number } }).progress.current >= 2 * MiB, 600, 20);
    // A write the copier has passed by (in its first MiB), acknowledged before the stop: it must reach the target.
    request(c.wire, CMD.WRITE, 4096, 4096, { payload: Buffer.alloc(4096, 0xee) });
    expect((await reply(c.wire)).error).toBe(0);
    Buffer.alloc(4096, 0xee).copy(data, 4096);
    request(c.wire, CMD.DISC, 0, 0);
    c.wire.socket.end();
    expect(await ls.stop()).toBe(0);
    await ls.restart();
    const resumed = await resumedFrom(mirror.id, 'local/t2');
    expect(await json('jobs', 'show', mirror.id)).toMatchObject({ resumedBy: resumed.id });
    let first!: { progress: { total: number } };
    await until('the resumed copy counted its first pass', async () => (first = await json('jobs', 'show', resumed.id) as typeof first).progress.total > 0, 600, 20);
    expect(first.progress.total).toBeLessThanOrEqual(6 * MiB + 64 * 1024); // what was left (and the granule written), not everything again
    await until('the resumed copy is ready', async () => ((await json('jobs', 'show', resumed.id)) as { status: string }).status === 'ready', 1200, 20);
    expect((await client('jobs', 'complete', resumed.id)).code).toBe(0);
    await until('switched over', async () => ((await json('nbd', 'list')) as { name: string; ref: string }[]).some((e) => e.name === 'local/t2' && e.ref === 'san1/t2'));
    const port = Number(new URL(((await json('nbd', 'list')) as { name: string; uri: string }[]).find((e) => e.name === 'local/t2')!.uri).port);
    expect((await readWhole(port, 'local/t2', 8 * MiB)).equals(data)).toBe(true);
    expect((await client('nbd', 'stop', 'local/t2')).code).toBe(0);
  });

  it('a copy into a target it made, resumed after a clean stop and cancelled before ready, deletes that target as its first job would have; the source is served on', async () => {
    expect((await client('volume', 'create', 'local/t3', '8M')).code).toBe(0);
    const uri = (await client('nbd', 'local/t3', '--port', '0')).out.trim();
    const c = await openExport(Number(new URL(uri).port), 'local/t3');
    request(c.wire, CMD.WRITE, 0, 8 * MiB, { payload: Buffer.alloc(8 * MiB, 0x33) });
    expect((await reply(c.wire)).error).toBe(0);
    request(c.wire, CMD.DISC, 0, 0);
    c.wire.socket.end();
    const mirror = await json('copy', '--live', 'local/t3', 'san1/t3', '--speed', `${MiB}`, '--detach') as { id: string };
    await until('part-way', async () => ((await json('jobs', 'show', mirror.id)) as { progress: { current: number } }).progress.current >= MiB, 600, 20);
    expect(await ls.stop()).toBe(0);
    await ls.restart();
    const resumed = await resumedFrom(mirror.id, 'local/t3');
    expect((await client('jobs', 'cancel', resumed.id)).code).toBe(0);
    await until('cancelled', async () => ((await json('jobs', 'show', resumed.id)) as { status: string }).status === 'concluded', 600, 20);
    expect((await client('volume', 'show', 'san1/t3')).err).toMatch(/NotFound/);
    expect(((await json('nbd', 'list')) as { name: string; ref: string }[]).find((e) => e.name === 'local/t3')?.ref).toBe('local/t3');
    expect((await client('nbd', 'stop', 'local/t3')).code).toBe(0);
  });

  it('kill -9 in the bulk pass under a writer: the restarted service resumes the copy from its write-intent record — not from zero — and after the switch-over the target holds every acknowledged write', async () => {
    const size = 24 * MiB;
    expect((await client('volume', 'create', 'local/w0', `${size}`)).code).toBe(0);
    const port = Number(new URL((await client('nbd', 'local/w0', '--port', '0', '--name', 'w0')).out.trim()).port);
    const c = await openExport(port, 'w0');
    const data = Buffer.alloc(size);
    for (let i = 0; i < 24; i++) data.fill(i + 60, i * MiB, (i + 1) * MiB);
    request(c.wire, CMD.WRITE, 0, size, { payload: data });
    expect((await reply(c.wire)).error).toBe(0);
    request(c.wire, CMD.DISC, 0, 0);
    c.wire.socket.end();
    const mirror = await json('copy', '--live', 'local/w0', 'san1/w0', '--speed', `${2 * MiB}`, '--detach') as { id: string };
    // A writer all along in the first 4 MiB (copied first, written again and again), FUA: acknowledged is durable.
    const writer = await NbdWriter.start({ port, name: 'w0', connections: 2, fua: true, pauseMs: 5, span: 4 * MiB }, data);
    // Before ready the record lets go every 4 s of what was copied before the last: past 8 s (18
    // MiB at 2 MiB/s) the regions copied in the first 4 s have left it, bar the writer's.
    await until('part-way', async () => ((await json('jobs', 'show', mirror.id)) as { progress: { current: number } }).progress.current >= 18 * MiB, 1200, 20);
    await new Promise((r) => setTimeout(r, 300));
    // One write into a region copied and left out of the record since: acknowledged only once the record names it again.
    const late = await openExport(port, 'w0');
    request(late.wire, CMD.WRITE, 5 * MiB + 4096, 4096, { payload: Buffer.alloc(4096, 0xdd), flags: CMD_FLAG.FUA });
    expect((await reply(late.wire)).error).toBe(0);
    Buffer.alloc(4096, 0xdd).copy(writer.model, 5 * MiB + 4096);
    await ls.kill();
    await writer.stop().catch(() => undefined);
    expect(writer.acked).toBeGreaterThan(0);

    await ls.restart();
    // The VM goes on writing at once, while the copy resumes (its writes held until the resumed job guards them).
    const image = await readWhole(port, 'w0', size);
    expect(writer.lost(image)).toEqual([]);
    const again = await NbdWriter.start({ port, name: 'w0', connections: 2, fua: true, pauseMs: 10, span: 8 * MiB }, image);
    const m = await json('jobs', 'show', mirror.id) as { status: string; crashed?: boolean; error?: { message: string } };
    expect(m.status).toBe('concluded');
    expect(m.error?.message).toMatch(/write-intent record/);
    const resumed = await resumedFrom(mirror.id, 'local/w0');
    let first!: { progress: { total: number }; params: { pairs: { pending?: unknown; since?: string }[] } };
    // Its first pass's total, once it has counted it (the job is listed before it starts).
    await until('the resumed copy counted its first pass', async () => (first = await json('jobs', 'show', resumed.id) as typeof first).progress.total > 0, 600, 20);
    expect(first.params.pairs[0]!.since).toBeUndefined();
    // What the record still named: the part not copied yet, the regions written lately (the first
    // 4 MiB) and the late write's, not the whole volume: some of what was copied first is not again.
    expect(first.progress.total).toBeLessThanOrEqual(size - 2 * MiB);
    expect(first.progress.total).toBeGreaterThan(0);
    expect((await client('jobs', 'set-speed', resumed.id, '0')).code).toBe(0); // the rest at full speed
    // The new job's record took over.
    expect(await json('jobs', 'show', mirror.id)).toMatchObject({ resumedBy: resumed.id });
    expect(((await json('jobs', 'show', mirror.id)) as { crashed?: boolean }).crashed).toBeUndefined();
    await new Promise((r) => setTimeout(r, 1500));
    await again.stop(); // (at 2 MiB/s a background copy would not catch up with it)
    expect(again.acked).toBeGreaterThan(0);
    await until('the resumed copy is ready', async () => ((await json('jobs', 'show', resumed.id)) as { status: string }).status === 'ready', 1200, 20);
    const source = await readWhole(port, 'w0', size);
    expect(again.lost(source)).toEqual([]);
    expect((await client('jobs', 'complete', resumed.id)).code).toBe(0);
    await until('switched over', async () => ((await json('nbd', 'list')) as { name: string; ref: string }[]).some((e) => e.name === 'w0' && e.ref === 'san1/w0'));
    const target = await readWhole(port, 'w0', size);
    expect(again.lost(target)).toEqual([]);
    expect(target.equals(source)).toBe(true);
    expect((await client('nbd', 'stop', 'w0')).code).toBe(0);
  });

  it('the disks of one VM (`copy --live A=B C=D`) killed in the bulk pass: both sources come back, one job resumes both from the record, and both switch over equal to their sources; a point the dead job took and never recorded is dropped', async () => {
    const size = 8 * MiB;
    const ports: number[] = [];
    const images: Buffer[] = [];
    for (const [i, v] of ['local/m0', 'local/m1'].entries()) {
      expect((await client('volume', 'create', v, `${size}`)).code).toBe(0);
      ports.push(Number(new URL((await client('nbd', v, '--port', '0', '--name', `m${i}`)).out.trim()).port));
      const c = await openExport(ports[i]!, `m${i}`);
      const data = Buffer.alloc(size, 0x30 + i);
      request(c.wire, CMD.WRITE, 0, size, { payload: data });
      expect((await reply(c.wire)).error).toBe(0);
      request(c.wire, CMD.DISC, 0, 0);
      c.wire.socket.end();
      images.push(data);
    }
    const mirror = await json('copy', '--live', 'local/m0=san1/m0', 'local/m1=san1/m1', '--speed', `${4 * MiB}`, '--detach') as { id: string };
    const writers = await Promise.all([0, 1].map((i) => NbdWriter.start({ port: ports[i]!, name: `m${i}`, connections: 1, fua: true, pauseMs: 10, span: 2 * MiB }, images[i]!)));
    await until('part-way', async () => ((await json('jobs', 'show', mirror.id)) as { progress: { current: number } }).progress.current >= 6 * MiB, 600, 20);
    await new Promise((r) => setTimeout(r, 1200));
    await ls.kill();
    for (const w of writers) await w.stop().catch(() => undefined);
    // Taken over from this host before the service is back (`jobs resume`): concluded, its record kept.
    await offload(ls.s, ['jobs', 'resume', mirror.id]);
    expect(await offload(ls.s, ['--json', 'jobs', 'show', mirror.id]).then((r) => JSON.parse(r.out) as unknown)).toMatchObject({ status: 'concluded', crashed: true });
    // As a kill in the middle of a stop would leave it: the job's point taken, not recorded.
    const point = `live-${mirror.id.slice(mirror.id.lastIndexOf('-') + 1)}`;
    const made = await offload(ls.s, ['snapshot', 'create', `local/m0@${point}`]);
    expect(made.code, made.err).toBe(0);
    await ls.restart();
    const resumed = await resumedFrom(mirror.id, 'local/m0');
    await until('the leaked point dropped', async () => !((await json('snapshot', 'list', 'local/m0')) as { name: string }[]).some((x) => x.name === point));
    const r = await json('jobs', 'show', resumed.id) as { params: { pairs: { source: string; target: string }[] }; progress: { total: number } };
    expect(r.params.pairs.map((p) => `${p.source}=${p.target}`)).toEqual(['local/m0=san1/m0', 'local/m1=san1/m1']);
    expect((await client('jobs', 'set-speed', resumed.id, '0')).code).toBe(0);
    await until('the resumed copy is ready', async () => ((await json('jobs', 'show', resumed.id)) as { status: string }).status === 'ready', 1200, 20);
    const sources = await Promise.all([0, 1].map((i) => readWhole(ports[i]!, `m${i}`, size)));
    for (const [i, w] of writers.entries()) expect(w.lost(sources[i]!)).toEqual([]);
    expect((await client('jobs', 'complete', resumed.id)).code).toBe(0);
    await until('both switched over', async () => {
      const listed = await json('nbd', 'list') as { name: string; ref: string }[];
      return listed.some((e) => e.name === 'm0' && e.ref === 'san1/m0') && listed.some((e) => e.name === 'm1' && e.ref === 'san1/m1');
    });
    for (const i of [0, 1]) {
      const moved = await readWhole(ports[i]!, `m${i}`, size);
      expect(writers[i]!.lost(moved)).toEqual([]);
      expect(moved.equals(sources[i]!)).toBe(true);
      expect((await client('nbd', 'stop', `m${i}`)).code).toBe(0);
    }
  });

  it('a copy whose service died is not resumed once its source is exported some other way (its write-intent record cannot account for those writes)', async () => {
    expect((await client('volume', 'create', 'local/x0', '8M')).code).toBe(0);
    const port = Number(new URL((await client('nbd', 'local/x0', '--port', '0', '--name', 'x0')).out.trim()).port);
    const c = await openExport(port, 'x0');
    request(c.wire, CMD.WRITE, 0, 8 * MiB, { payload: Buffer.alloc(8 * MiB, 3) });
    expect((await reply(c.wire)).error).toBe(0);
    request(c.wire, CMD.DISC, 0, 0);
    c.wire.socket.end();
    const mirror = await json('copy', '--live', 'local/x0', 'san1/x0', '--speed', `${2 * MiB}`, '--detach') as { id: string };
    await until('part-way', async () => ((await json('jobs', 'show', mirror.id)) as { progress: { current: number } }).progress.current >= MiB, 600, 20);
    await ls.kill();
    rmSync(join(ls.s.dir, 'state', 'hosted-exports.json')); // the service does not serve it again
    await ls.restart();
    expect(await json('jobs', 'show', mirror.id)).toMatchObject({ status: 'concluded', crashed: true });
    expect((await client('jobs', 'show', mirror.id)).out).toMatch(/its service died while it copied: the service resumes it from its write-intent record/);
    expect((await client('nbd', 'local/x0', '--port', '0', '--name', 'x0')).code).toBe(0);
    expect(((await json('jobs', 'show', mirror.id)) as { crashed?: boolean }).crashed).toBeUndefined();
    const again = await client('copy', '--live', '--resume', mirror.id);
    expect(again.code).not.toBe(0);
    expect(again.err).toMatch(/FailedPrecondition: live copy .* left no point to resume from/);
    expect((await client('nbd', 'stop', 'x0')).code).toBe(0);
  });

  // The writer's record is what tells the restarted service; dismissed, it drops the copy's record first.
  for (const [n, dismissed] of [[0, false], [1, true]] as const) {
    it(`a copy whose service died is not resumed once another job wrote its target meanwhile (taken over while the service was down, then a copy into its target${dismissed ? ', whose job was then dismissed' : ''})`, async () => {
      const [src, dst, other, name] = [`local/y${n}`, `san1/y${n}`, `local/z${n}`, `y${n}`];
      expect((await client('volume', 'create', src, '8M')).code).toBe(0);
      expect((await client('nbd', src, '--port', '0', '--name', name)).code).toBe(0);
      const mirror = await json('copy', '--live', src, dst, '--speed', `${2 * MiB}`, '--detach') as { id: string };
      await until('the target made', async () => ((await json('jobs', 'show', mirror.id)) as { status: string }).status === 'running', 600, 20);
      await new Promise((r) => setTimeout(r, 300));
      await ls.kill();
      // While the dead copy's job holds its target, nothing else may write it: taken over here first
      // (`jobs resume`: concluded, its record kept), then a copy into its target, embedded.
      expect((await offload(ls.s, ['volume', 'create', other, '8M'])).code).toBe(0);
      expect((await offload(ls.s, ['copy', other, dst])).err).toMatch(new RegExp(`Busy: ${dst} is busy: job .*orphaned`));
      await offload(ls.s, ['jobs', 'resume', mirror.id]);
      expect(await offload(ls.s, ['--json', 'jobs', 'show', mirror.id]).then((r) => JSON.parse(r.out) as unknown)).toMatchObject({ status: 'concluded', crashed: true });
      const over = await offload(ls.s, ['copy', other, dst]);
      expect(over.code, over.err).toBe(0);
      if (dismissed) {
        const listed = JSON.parse((await offload(ls.s, ['--json', 'jobs', 'list'])).out) as { id: string; ref: string }[];
        const writer = listed.find((j) => j.id !== mirror.id && j.ref.includes(dst));
        expect((await offload(ls.s, ['jobs', 'dismiss', writer!.id])).code).toBe(0);
      }
      await ls.restart();
      await until('the export is back', async () => ((await json('nbd', 'list')) as { name: string }[]).some((e) => e.name === name));
      // Not resumed: its record is dropped once the export's writes go on, and no copy of the source runs.
      await until('the record dropped', async () => ((await json('jobs', 'show', mirror.id)) as { crashed?: boolean }).crashed === undefined);
      const all = await json('jobs', 'list') as { id: string; type: string; params: { pairs?: { source: string }[] } }[];
      expect(all.filter((j) => j.type === 'mirror' && j.id !== mirror.id && (j.params.pairs ?? []).some((p) => p.source === src))).toEqual([]);
      const again = await client('copy', '--live', '--resume', mirror.id);
      expect(again.err).toMatch(/FailedPrecondition: live copy/);
      expect((await client('nbd', 'stop', name)).code).toBe(0);
    });
  }

  it(`${KILLS} kills: after each restart the side the record names is served, and holds every acknowledged write`, async () => {
    expect((await client('volume', 'create', 'local/vm-0', `${SIZE}`)).code).toBe(0);
    const started = await client('nbd', 'local/vm-0', '--port', '0', '--name', 'vm');
    expect(started.code).toBe(0);
    const port = Number(new URL(started.out.trim()).port);
    let current = 'local/vm-0';
    const phases: Record<string, number> = { bulk: 0, ready: 0, complete: 0 };
    const outcomes: Record<string, number> = { source: 0, target: 0, resumed: 0 };
    for (let round = 1; round <= KILLS; round++) {
      const base = await readExport(port, 'vm');
      const writer = await NbdWriter.start({ port, name: 'vm', connections: 2, fua: true, pauseMs: 2 }, base);
      const target = `${round % 2 === 0 ? 'local' : 'san1'}/vm-${round}`;
      const job = await json('copy', '--live', current, target, '--detach', ...(round % 3 === 0 ? ['--mode', 'write-blocking'] : [])) as { id: string };
      const phase = (['bulk', 'ready', 'complete'] as const)[round % 3]!;
      phases[phase]!++;
      const status = async () => ((await json('jobs', 'show', job.id)) as { status: string }).status;
      if (phase === 'bulk') {
        await new Promise((r) => setTimeout(r, Math.random() * 120));
      } else {
        await until(`job ${job.id} ready`, async () => (await status()) === 'ready', 600, 20);
        if (phase === 'ready') await new Promise((r) => setTimeout(r, Math.random() * 150));
        else {
          expect((await client('jobs', 'complete', job.id)).code).toBe(0);
          if (phases.complete === 2) {
            // One kill lands after the switch-over is recorded whatever the machine's load (a
            // random one may always land before it: under load, twice in a row in one full run).
            await until(`job ${job.id} switched over`, async () => {
              const j = await json('jobs', 'show', job.id) as { status: string; authoritative?: { side: string } };
              return j.authoritative?.side === 'target' || j.status === 'concluded';
            }, 600, 10);
          } else {
            await new Promise((r) => setTimeout(r, Math.random() * 100));
          }
        }
      }
      await ls.kill();
      await writer.stop().catch(() => undefined); // its connections were cut
      expect(writer.acked).toBeGreaterThan(0);

      await ls.restart();
      const info = await json('jobs', 'show', job.id) as { status: string; createdAt: string; error?: { message: string }; authoritative?: { side: 'source' | 'target'; ref: string } };
      expect(info.status).toBe('concluded');
      const side = info.authoritative ?? { side: 'source' as const, ref: current }; // killed before the job saved anything
      expect(side.ref).toBe(side.side === 'source' ? current : target);
      if (side.side === 'target') expect(info.error).toBeUndefined();
      else if (info.authoritative) expect(info.error?.message).toMatch(new RegExp(`${current} holds the data and stays current`));
      outcomes[side.side]!++;

      await until('the export is back', async () => ((await json('nbd', 'list')) as { name: string }[]).some((e) => e.name === 'vm'));
      const listed = ((await json('nbd', 'list')) as { name: string; ref: string }[]).find((e) => e.name === 'vm')!;
      expect(listed.ref).toBe(side.ref); // the other side is never served as current
      const hosted = JSON.parse(readFileSync(join(ls.s.dir, 'state', 'hosted-exports.json'), 'utf8')) as { exports: { name: string; ref: string }[] };
      expect(hosted.exports.find((e) => e.name === 'vm')?.ref).toBe(side.ref);
      const image = await readExport(port, 'vm');
      expect(writer.lost(image), `round ${round} (${phase}, ${side.side})`).toEqual([]);

      // The source still current: the restarted service resumed the copy from its write-intent
      // record (unless the kill came before the job's first record). It switches over with every
      // acknowledged write.
      let holder = side.ref;
      const all = await json('jobs', 'list') as { id: string; type: string; createdAt: string; params: { pairs?: { source: string }[] } }[];
      const resumed = side.side === 'source' ? all.find((j) => j.type === 'mirror' && j.id !== job.id && j.createdAt > info.createdAt && (j.params.pairs ?? []).some((p) => p.source === current)) : undefined;
      if (resumed) {
        outcomes.resumed!++;
        await until(`resumed job ${resumed.id} ready`, async () => ((await json('jobs', 'show', resumed.id)) as { status: string }).status === 'ready', 600, 20);
        expect((await client('jobs', 'complete', resumed.id)).code).toBe(0);
        await until('switched over', async () => ((await json('nbd', 'list')) as { name: string; ref: string }[]).some((e) => e.name === 'vm' && e.ref === target));
        const moved = await readExport(port, 'vm');
        expect(writer.lost(moved), `round ${round} (${phase}, resumed)`).toEqual([]);
        expect(moved.equals(image)).toBe(true);
        holder = target;
      }

      // Go on from the side that holds the data; the other is deleted.
      const other = holder === target ? current : target;
      current = holder;
      const gone = await client('volume', 'delete', other);
      expect(gone.code === 0 || /NotFound/.test(gone.err), gone.err).toBe(true);
    }
    console.log(`live-crash: ${KILLS} kills by phase ${JSON.stringify(phases)}; the side that held the data ${JSON.stringify(outcomes)}`);
    expect(outcomes.source! + outcomes.target!).toBe(KILLS);
    expect(outcomes.target).toBeGreaterThan(0); // some kills landed after the switch-over was recorded
    expect(outcomes.source).toBeGreaterThan(0);
    expect(outcomes.resumed).toBeGreaterThan(0); // copies killed with the source current went on from their records
  });
});

// Trims every 250 ms (OFFLOAD_LIVE_TRIM_MS): a record with its regions gone in a second.
describe('a crashed live copy\'s record is of two volumes, not two names', () => {
  let ls: LiveService;
  liveServiceForSuite((started) => {
    ls = started;
  }, { env: { OFFLOAD_LIVE_TRIM_MS: '250' } });

  it('a copy whose service died is not resumed once its target was deleted and made again under its name (another volume id than its record names)', async () => {
    expect((await ls.client('volume', 'create', 'local/u0', '8M')).code).toBe(0);
    const port = Number(new URL((await ls.client('nbd', 'local/u0', '--port', '0', '--name', 'u0')).out.trim()).port);
    const w = await NbdWriter.start({ port, name: 'u0', connections: 1, fua: true, pauseMs: 0 }, Buffer.alloc(8 * MiB));
    await new Promise((r) => setTimeout(r, 200));
    await w.stop();
    const mirror = await ls.json('copy', '--live', 'local/u0', 'san1/u0', '--detach') as { id: string };
    await until('ready', async () => ((await ls.json('jobs', 'show', mirror.id)) as { status: string }).status === 'ready', 600, 20);
    // Two trims: the record lets go of the regions in sync, and names the volumes' ids.
    const record = () => {
      const db = new Database(join(ls.s.dir, 'state', 'jobs.sqlite'), { readonly: true });
      try {
        return (JSON.parse((db.prepare('SELECT checkpoint FROM jobs WHERE id = ?').get(mirror.id) as { checkpoint: string }).checkpoint) as MirrorState).intent?.[0];
      } finally {
        db.close();
      }
    };
    await until('regions out of the record', async () => record()?.bits === 'AA==', 75, 200);
    expect(record()?.volumes).toMatchObject({ source: expect.any(String), target: expect.any(String) });
    await ls.kill();
    // Taken over here (its record kept), then its target deleted and made again, embedded: empty.
    await offload(ls.s, ['jobs', 'resume', mirror.id]);
    expect(await offload(ls.s, ['--json', 'jobs', 'show', mirror.id]).then((r) => JSON.parse(r.out) as unknown)).toMatchObject({ status: 'concluded', crashed: true });
    expect((await offload(ls.s, ['volume', 'delete', 'san1/u0'])).code).toBe(0);
    expect((await offload(ls.s, ['volume', 'create', 'san1/u0', '8M'])).code).toBe(0);
    await ls.restart();
    await until('the export is back', async () => ((await ls.json('nbd', 'list')) as { name: string }[]).some((e) => e.name === 'u0'));
    await until('the record dropped', async () => ((await ls.json('jobs', 'show', mirror.id)) as { crashed?: boolean }).crashed === undefined);
    // Resumed from the record, the copy would skip what it had copied into the old san1/u0.
    expect(ls.service.err()).toMatch(/san1\/u0 is not the volume it copied \(id [^,]+, was [^)]+\): it was deleted and made again/);
    const all = await ls.json('jobs', 'list') as { id: string; type: string; params: { pairs?: { source: string }[] } }[];
    expect(all.filter((j) => j.type === 'mirror' && j.id !== mirror.id && (j.params.pairs ?? []).some((p) => p.source === 'local/u0'))).toEqual([]);
    expect((await ls.client('nbd', 'stop', 'u0')).code).toBe(0);
  });
});

// One machine before and after a restart the pid rule cannot see through: the lease outlasts the
// test, so only the boot rule (a host id) or the runner lock (core/jobs/runner-lock.ts) lets the
// restarted service take the job at once and keep its write-intent record.
describe.each([
  // Its runner locks lost with the reboot (a state folder that did not survive it): the host id alone tells.
  { what: 'a reboot of its host (a power loss), with a host id', before: 'id node1 (boot aaaa0001, pid ns 4026531836)', after: 'id node1 (boot bbbb0002, pid ns 4026531836)', locksLost: true },
  { what: 'a restart of its container (another pid namespace), without a host id', before: 'node1 (boot aaaa0001, pid ns 4026531836)', after: 'node1 (boot aaaa0001, pid ns 4026532001)', locksLost: false },
])('a live copy across $what', ({ before: b, after: a, locksLost }) => {
  // Trims every 500 ms (OFFLOAD_LIVE_TRIM_MS), so that the record lets regions go within the test's second or two.
  const before = { OFFLOAD_RUNNER_HOST: b, OFFLOAD_LIVE_TRIM_MS: '500' };
  const after = { OFFLOAD_RUNNER_HOST: a, OFFLOAD_LIVE_TRIM_MS: '500' };
  let ls: LiveService;
  liveServiceForSuite((started) => {
    ls = started;
  }, { leaseSeconds: 3600, env: before });

  it('the next service takes the copy at once and resumes it from its write-intent record: only what the record names is copied again, and the switch-over holds every acknowledged write', async () => {
    const size = 8 * MiB;
    expect((await ls.client('volume', 'create', 'local/b0', `${size}`)).code).toBe(0);
    const port = Number(new URL((await ls.client('nbd', 'local/b0', '--port', '0', '--name', 'b0')).out.trim()).port);
    const c = await openExport(port, 'b0');
    const data = Buffer.alloc(size, 0x51);
    request(c.wire, CMD.WRITE, 0, size, { payload: data });
    expect((await reply(c.wire)).error).toBe(0);
    request(c.wire, CMD.DISC, 0, 0);
    c.wire.socket.end();
    const mirror = await ls.json('copy', '--live', 'local/b0', 'san1/b0', '--detach') as { id: string };
    // A writer in the first 2 MiB all along (FUA); the rest of the disk, copied in the first trim
    // period and idle through the next, leaves the record at the second trim (of several here).
    const writer = await NbdWriter.start({ port, name: 'b0', connections: 1, fua: true, pauseMs: 5, span: 2 * MiB }, data);
    await until('ready', async () => ((await ls.json('jobs', 'show', mirror.id)) as { status: string }).status === 'ready', 600, 20);
    const started = Date.parse(((await ls.json('jobs', 'show', mirror.id)) as { createdAt: string }).createdAt);
    await new Promise((r) => setTimeout(r, Math.max(0, started + 2500 - Date.now())));
    await ls.kill();
    await writer.stop().catch(() => undefined);
    expect(writer.acked).toBeGreaterThan(0);
    if (locksLost) rmSync(join(ls.s.dir, 'state', 'runners'), { recursive: true, force: true });

    await ls.restart(after);
    expect(await ls.json('jobs', 'show', mirror.id)).toMatchObject({ status: 'concluded' });
    let resumed!: { id: string };
    await until('the copy is resumed', async () => {
      const all = await ls.json('jobs', 'list') as { id: string; type: string; params: { pairs?: { source: string }[] } }[];
      resumed = all.find((j) => j.type === 'mirror' && j.id !== mirror.id && (j.params.pairs ?? []).some((p) => p.source === 'local/b0'))!;
      return resumed !== undefined;
    });
    expect(await ls.json('jobs', 'show', mirror.id)).toMatchObject({ resumedBy: resumed.id });
    // Its first pass's total, once it has counted it (the job is listed before it starts).
    let first!: { progress: { total: number } };
    await until('the resumed copy counted its first pass', async () => (first = await ls.json('jobs', 'show', resumed.id) as typeof first).progress.total > 0, 600, 20);
    expect(first.progress.total).toBeLessThanOrEqual(size - 4 * MiB); // the writer's regions, not the whole disk again
    await until('the resumed copy is ready', async () => ((await ls.json('jobs', 'show', resumed.id)) as { status: string }).status === 'ready', 600, 20);
    const source = await readWhole(port, 'b0', size);
    expect(writer.lost(source)).toEqual([]);
    expect((await ls.client('jobs', 'complete', resumed.id)).code).toBe(0);
    await until('switched over', async () => ((await ls.json('nbd', 'list')) as { name: string; ref: string }[]).some((e) => e.name === 'b0' && e.ref === 'san1/b0'));
    const moved = await readWhole(port, 'b0', size);
    expect(writer.lost(moved)).toEqual([]);
    expect(moved.equals(source)).toBe(true);
    expect((await ls.client('nbd', 'stop', 'b0')).code).toBe(0);
  });
});
