/**
 * Incremental backup: `backup VOL --to BACKEND/NAME` keeps a chain of points in the backup volume
 * NAME (its snapshots b1, b2, …): the first point is a full copy, each later one only what
 * changed in VOL since the previous point. What the next point is relative to is a snapshot of VOL
 * (its marker, `bk-<id>-<n>`, id naming the backup volume): each backup takes the new marker
 * first, copies from it (a point in time even while VOL is in use), and drops the old one. Without
 * the previous marker (deleted, or VOL is not the set's source) the point is a full copy again.
 * `restore BACKEND/NAME[@bN] --to VOL` copies a point back. `backup A=SET_A B=SET_B` (startGroup)
 * backs up the disks of one VM in one job, their markers taken at one instant (takeMarkers). The
 * job: core/copy/backup-task.ts.
 */
import { createHash } from 'node:crypto';
import type { BackupPoint, BackupsApi, CloneOptions, CloneStart } from '../broker-api.js';
import { backupTask, type BackupParams } from '../copy/backup-task.js';
import type { Job } from '../jobs/job.js';
import { AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unsupported } from '../model/errors.js';
import { isSnapshotRef, parseRef, parseVolumeRef, snapshotKey, volumeKey, type SnapshotRef } from '../model/refs.js';
import type { LockRequest } from '../locks/lock-manager.js';
import type { Plan } from '../planner/plan.js';
import type { Snapshot } from '../model/types.js';
import type { Access } from './access.js';
import { snapshotsAtOneInstant } from './group-snapshots.js';
import { checkSpeed, need, planOrRefuse } from './operation.js';
import { call, type BrokerState } from './state.js';
import type { Snapshots, Volumes } from './volumes.js';

const POINT = /^b([1-9][0-9]*)$/;

/** What backups need of the other verbs of the same principal's view. */
export interface BackupVerbs {
  volumes: Volumes;
  snapshots: Snapshots;
  copy(source: string, target: string, opts: { speed?: number }): Promise<Job>;
  startClone(source: string, target: string, opts: CloneOptions): Promise<CloneStart>;
}

export class Backups implements BackupsApi {
  constructor(private readonly s: BrokerState, private readonly a: Access, private readonly v: BackupVerbs) {}

  async start(sourceText: string, opts: { to: string; speed?: number }): Promise<Job> {
    if (opts === null || typeof opts !== 'object' || typeof opts.to !== 'string') throw new InvalidArgument('backup takes { to: "backend/name", speed? }');
    return this.run([{ source: sourceText, to: opts.to }], opts.speed, false);
  }

  async startGroup(pairs: { source: string; to: string }[], opts: { speed?: number } = {}): Promise<Job> {
    if (!Array.isArray(pairs) || pairs.length === 0 || pairs.some((p) => p === null || typeof p !== 'object' || typeof p.source !== 'string' || typeof p.to !== 'string')) {
      throw new InvalidArgument('a group backup takes pairs [{ source: "backend/volume", to: "backend/name" }, …] (at least one)');
    }
    if (opts === null || typeof opts !== 'object') throw new InvalidArgument('a group backup takes options { speed? }');
    return this.run(pairs, opts.speed, true);
  }

  /** One job for every pair: each source's marker taken at one instant, then copied into its backup volume. */
  private async run(pairs: { source: string; to: string }[], speedIn: number | undefined, group: boolean): Promise<Job> {
    const speed = checkSpeed(speedIn);
    const seen = new Set<string>();
    for (const p of group ? pairs : []) {
      for (const ref of [volumeKey(parseVolumeRef(p.source)), volumeKey(parseVolumeRef(p.to))]) {
        if (seen.has(ref)) throw new InvalidArgument(`${ref} appears twice in one group backup (a disk and its backup volume are each named once)`, { ref });
        seen.add(ref);
      }
    }
    const prepared: Prepared[] = [];
    for (const p of pairs) prepared.push(await this.prepare(p.source, p.to));
    const markers = prepared.map((p) => `${p.params.source}@${p.params.marker}`);
    const params = prepared.map((p) => p.params);
    const locks = prepared.flatMap((p) => p.locks);
    // A backend being taken out of the config refuses the job, and so does a backup volume or a
    // previous marker held (another backup into the set, an export reading the marker): before
    // the markers are taken, so that no guest is held for a point that cannot be made.
    this.s.locks.assertAdmitted(locks);
    const markerKeys = new Set(markers.map((m) => snapshotKey(parseRef(m) as SnapshotRef)));
    await this.s.locks.check(locks.filter((l) => !markerKeys.has(l.key)), this.a.principal);
    const sizes = await this.takeMarkers(markers);
    for (const [i, p] of params.entries()) p.sizeBytes = sizes[i]!;
    const checks = prepared.flatMap((p) => (p.check ? [p.check] : []));
    this.s.assertOpen();
    try {
      return await this.s.mutex.run(locks.map((l) => l.key), () => this.s.jobs.start({
        task: backupTask(group ? { pairs: params } : params[0]!, this.s.backupDeps()), ref: params.map((p) => p.target).join(','), executor: 'host', principal: this.a.principal,
        locks, plan: prepared[0]!.plan, ...(speed ? { speed } : {}),
        // The sources' points were taken under their locks; the backup volumes are checked again under the job's.
        ...(checks.length > 0 ? { check: async () => { for (const c of checks) await c(); } } : {}),
      }));
    } catch (e) {
      for (const m of markers) await this.v.snapshots.delete(m).catch(() => undefined);
      throw e;
    }
  }

  /** One pair checked, its point numbered and its marker named (not taken yet). */
  private async prepare(sourceText: string, toText: string): Promise<Prepared> {
    const src = parseVolumeRef(sourceText);
    const dst = parseVolumeRef(toText);
    const source = `${src.backend}/${src.volume}`;
    const target = `${dst.backend}/${dst.volume}`;
    if (source === target) throw new InvalidArgument(`a volume cannot be backed up into itself: ${source}`, { ref: source });
    const sb = need(this.s, src.backend, 'snapshot.create');
    if (!sb.capabilities.limits('data.read')?.snapshots || !sb.backend.openSnapshot) {
      throw new Unsupported(`${src.backend} (${sb.backend.kind}) cannot read a snapshot through its data path, which a backup reads (a point in time of ${source})`, {
        ref: source, hint: 'back up from a backend that reports data.read with snapshots',
      });
    }
    need(this.s, dst.backend, 'snapshot.create');
    need(this.s, dst.backend, 'data.write');
    await this.a.assertOwns(src);
    const existing = await this.v.volumes.get(target).catch((e: unknown) => {
      if (e instanceof NotFound) return undefined;
      throw e;
    });
    if (existing) await this.a.assertOwns(dst);
    const points = existing ? await this.points(target) : [];
    if (existing && points.length === 0) {
      throw new AlreadyExists(`${target} exists and is not a backup (it has no points b1, b2, …): a backup would overwrite it`, {
        ref: target, hint: 'name a new volume for the backup',
      });
    }
    const last = points[points.length - 1]?.point ?? 0;
    const id = createHash('sha256').update(target).digest('hex').slice(0, 8);
    const marker = (n: number) => `bk-${id}-${n}`;
    const sourceSnaps = await this.v.snapshots.list(source);
    // Only the changes when the source can say what they are and the backup volume can be put
    // back to the previous point first; a full copy otherwise.
    const hasLast = last > 0 && sourceSnaps.some((x) => x.name === marker(last));
    const base = hasLast && sb.capabilities.has('data.dirty') && this.s.entry(dst.backend).capabilities.has('snapshot.revert') ? marker(last) : undefined;
    // The new point's marker: a leftover of an attempt that died is not this point in time.
    const next = marker(last + 1);
    const plan = planOrRefuse(this.s, { op: 'copy', source: `${source}@${next}`, target }, `back up ${source} to ${target}`, source);
    if (sourceSnaps.some((x) => x.name === next)) await this.v.snapshots.delete(`${source}@${next}`);
    const params: BackupParams = {
      source, target, point: last + 1, marker: next, sizeBytes: 0, owner: existing?.owner ?? this.a.ownerFor(undefined),
      ...(base !== undefined ? { base } : {}), ...(last > 0 ? { previous: last } : {}),
      ...(hasLast && base === undefined ? { previousMarker: marker(last) } : {}),
    };
    const locks = [
      { key: snapshotKey(parseRef(`${source}@${next}`) as SnapshotRef), mode: 'shared' as const },
      // The previous marker, which the job deletes once its point exists (an export reading it keeps the job out).
      ...(hasLast ? [{ key: snapshotKey(parseRef(`${source}@${marker(last)}`) as SnapshotRef), mode: 'exclusive' as const }] : []),
      { key: volumeKey(dst), mode: 'exclusive' as const },
    ];
    return { params, locks, plan, ...(existing ? { check: () => this.a.assertOwns(dst) } : {}) };
  }

  /** Take the markers (`volume@name`, one per source) at one instant (group-snapshots.ts), their sizes returned. One is a snapshot as any other. */
  private async takeMarkers(markers: string[]): Promise<number[]> {
    if (markers.length === 1) return [(await this.v.snapshots.create(markers[0]!)).sizeBytes];
    return (await snapshotsAtOneInstant(this.s, this.a, markers)).map((x) => x.sizeBytes);
  }

  async list(targetText: string): Promise<BackupPoint[]> {
    const ref = parseVolumeRef(targetText);
    return this.points(`${ref.backend}/${ref.volume}`);
  }

  async restore(pointText: string, opts: { to: string; speed?: number }): Promise<Job> {
    if (opts === null || typeof opts !== 'object' || typeof opts.to !== 'string') throw new InvalidArgument('restore takes { to: "backend/volume", speed? }');
    const ref = parseRef(pointText);
    const target = `${ref.backend}/${ref.volume}`;
    const points = await this.points(target);
    const want = isSnapshotRef(ref) ? points.find((p) => p.ref === pointText) : points[points.length - 1];
    if (!want) {
      throw new NotFound(isSnapshotRef(ref) ? `${pointText} is not a point of the backup ${target}` : `the backup ${target} has no points yet`, {
        ref: pointText, hint: `list them with \`offload backups ${target}\``,
      });
    }
    const to = parseVolumeRef(opts.to);
    const dest = `${to.backend}/${to.volume}`;
    const b = this.s.entry(to.backend).backend;
    const exists = await call(b, 'get', dest, () => b.getVolume(to.volume));
    const speed = opts.speed !== undefined ? { speed: opts.speed } : {};
    if (exists) return this.v.copy(want.ref, dest, speed);
    const started = await this.v.startClone(want.ref, dest, { mode: 'full', prefer: 'host', ...speed });
    if (!started.job) throw new FailedPrecondition(`restoring ${want.ref} into ${dest} did not run as a job`, { ref: dest });
    return started.job;
  }

  /** The points of a backup volume, oldest first. */
  private async points(target: string): Promise<BackupPoint[]> {
    const snaps: Snapshot[] = await this.v.snapshots.list(target);
    return snaps.flatMap((x) => {
      const m = POINT.exec(x.name);
      return m ? [{ ref: `${target}@${x.name}`, point: Number(m[1]), sizeBytes: x.sizeBytes, ...(x.createdAt ? { createdAt: x.createdAt } : {}) }] : [];
    }).sort((a, b) => a.point - b.point);
  }
}

/** One pair of a backup, checked: its job params (size filled in once its marker is taken), locks and plan. */
interface Prepared {
  params: BackupParams;
  locks: LockRequest[];
  plan: Plan;
  check?: () => Promise<void>;
}
