/**
 * Snapshots of several volumes at one instant (a group backup's markers): taken where the disks
 * are served — here, or by the one other process that exports those in use.
 */
import { LiveDevice } from '../live/live-device.js';
import { Busy, Timeout } from '../model/errors.js';
import { parseSnapshotRef, volumeKey } from '../model/refs.js';
import type { Snapshot } from '../model/types.js';
import type { Access } from './access.js';
import { callExportHolder, GONE } from './op-calls.js';
import { planOrRefuse, runShort, sparesDisksInUse } from './operation.js';
import { call, type BrokerState } from './state.js';

/** The longest the guests' I/O is held while a group's snapshots are taken (OFFLOAD_MARKER_HOLD_MS: tests). */
const MARKER_HOLD_MS = 10_000;
const holdMs = (): number => Number(process.env.OFFLOAD_MARKER_HOLD_MS) || MARKER_HOLD_MS;

/**
 * Take the snapshots `refs` (`backend/volume@name`, one per volume) at one instant: under every
 * volume's lock, with the clients of each export this broker serves of them held (new requests
 * wait, those in flight are waited for) from before the first snapshot to after the last — so
 * that no write lands in one snapshot and not in another that a write acknowledged before it
 * would — and those taken are deleted if one fails. The snapshots are asked for at once, and the
 * guests held MARKER_HOLD_MS at most: an array slow to answer (a rate limit waited out, a job
 * polled) fails the group with Timeout rather than stall the VM's disks.
 *
 * Volumes another process exports read-write: the whole group is asked of that process, which
 * holds its own exports' clients as this one would — when it serves every volume of the group
 * that is in use (one instant cannot span the guests of two processes: Busy). `retries`: times
 * to ask again, or to take them here, when the export asked ended first; below 0 (the serving
 * process answering), never asked elsewhere.
 */
export async function snapshotsAtOneInstant(s: BrokerState, a: Access, refs: string[], retries = 1): Promise<Snapshot[]> {
  for (const m of refs) planOrRefuse(s, { op: 'snapshot', ref: m }, `snapshot ${m}`, m);
  const volumes = refs.map((m) => {
    const r = parseSnapshotRef(m);
    return `${r.backend}/${r.volume}`;
  });
  const served = s.exports.list().filter((e) => volumes.includes(e.ref));
  const holders = served.map((e) => s.exports.device(e.name)?.holder).filter((h): h is string => h !== undefined);
  const devices = served.map((e) => s.exports.device(e.name)?.device).filter((d): d is LiveDevice => d instanceof LiveDevice);
  const locks = refs.map((m) => ({ key: volumeKey(parseSnapshotRef(m)), mode: 'shared' as const }));
  const what = `snapshot ${refs.join(', ')} at one instant`;
  try {
    return await runShort(s, a.principal, locks, what, async () => {
      for (const m of refs) await a.assertOwns(parseSnapshotRef(m)); // again under the locks (Snapshots.create)
      let asked: Promise<Snapshot>[] = [];
      try {
        return await pausedAll(devices, async () => {
          asked = refs.map((m) => {
            const ref = parseSnapshotRef(m);
            const b = s.entry(ref.backend).backend;
            return call(b, 'snapshot', m, () => b.createSnapshot(ref.volume, ref.snapshot));
          });
          let timer: NodeJS.Timeout | undefined;
          const late = new Promise<never>((_, reject) => {
            timer = setTimeout(() => reject(new Timeout(`the snapshots of ${refs.join(', ')} took longer than ${holdMs() / 1000} s, the most the guests' I/O is held for them`, {
              ref: refs.join(','), hint: 'back up again, or back up the disks one by one (each at its own instant)',
            })), holdMs());
          });
          try {
            return await Promise.race([Promise.all(asked), late]);
          } finally {
            clearTimeout(timer);
          }
        });
      } catch (e) {
        // Those taken, and those an array answers after the guests went on, are not the group's instant.
        const settled = await Promise.allSettled(asked);
        for (const [i, r] of settled.entries()) {
          if (r.status !== 'fulfilled') continue;
          const ref = parseSnapshotRef(refs[i]!);
          const b = s.backends.get(ref.backend)!.backend;
          await call(b, 'delete', refs[i]!, () => b.deleteSnapshot(ref.volume, ref.snapshot)).catch(() => undefined);
        }
        throw e;
      }
    }, holders, { spares: sparesDisksInUse });
  } catch (e) {
    const holder = e instanceof Busy && typeof e.data?.holder === 'string' && e.data.holder.startsWith('export:') ? e.data.holder : undefined;
    if (!holder || retries < 0) throw e;
    const elsewhere = (await s.jobs.foreignExports()).filter((x) => volumes.includes(x.ref) && !x.readOnly);
    const serving = elsewhere.find((x) => x.id === holder);
    if (!serving) throw e;
    if (served.some((x) => !x.readOnly) || elsewhere.some((x) => x.runnerToken !== serving.runnerToken)) {
      throw new Busy(`${what}: the volumes in use are served by more than one process, and one instant cannot span the guests of two`, {
        ref: refs.join(','), hint: "serve one VM's disks from one process (`offload serve`), or back them up one by one",
      });
    }
    const ref = refs[volumes.indexOf(serving.ref)]!;
    const answer = await callExportHolder(s, serving.id, { kind: 'snapshot.group', ref, refs, principal: { id: a.principal.id, role: a.principal.role } }, what);
    return answer === GONE ? snapshotsAtOneInstant(s, a, refs, retries - 1) : answer as Snapshot[];
  }
}

/** `fn` with every device paused at once (LiveDevice.paused, nested). */
function pausedAll<T>(devices: LiveDevice[], fn: () => Promise<T>): Promise<T> {
  return devices.reduceRight<() => Promise<T>>((inner, d) => () => d.paused(inner), fn)();
}
