/**
 * Live copy (`copy --live`): a copy of a volume a client writes to through this broker's export,
 * ending by switching that export over to the target (the mechanism: core/live/). It runs in the
 * broker that serves the export, because that is where the writes are seen.
 */
import type { BlockDevice } from '../backend/block-device.js';
import type { CopyOptions } from '../broker-api.js';
import type { Job } from '../jobs/job.js';
import { LiveDevice } from '../live/live-device.js';
import { mirrorTask, type MirrorParams } from '../live/mirror-task.js';
import { Busy, FailedPrecondition, InternalError, InvalidArgument, OutOfRange, toOffloadError } from '../model/errors.js';
import { parseVolumeRef, volumeKey } from '../model/refs.js';
import type { Plan } from '../planner/plan.js';
import type { Access } from './access.js';
import { holdExport } from './exports.js';
import { checkSpeed } from './operation.js';
import { call, type BrokerState } from './state.js';

/** The live copies of one principal's broker view. */
export class LiveCopies {
  constructor(private readonly s: BrokerState, private readonly a: Access) {}

  async start(source: string, target: string, opts: CopyOptions, plan: Plan): Promise<Job> {
    const mode = opts.mode ?? 'background';
    if (mode !== 'background' && mode !== 'write-blocking') throw new InvalidArgument(`a live copy's mode is background or write-blocking, got ${String(mode)}`);
    if (opts.verify) throw new InvalidArgument('--verify compares a copy of a volume at rest; a live copy\'s source changes while it runs', { hint: 'leave out --verify' });
    const src = parseVolumeRef(source);
    const dst = parseVolumeRef(target);
    source = volumeKey(src);
    target = volumeKey(dst);
    if (source === target) throw new InvalidArgument(`a live copy needs two volumes, got ${source} twice`, { ref: source });
    await this.a.assertOwns(src);
    const exp = this.s.exports.list().find((e) => e.ref === source && !e.readOnly);
    if (!exp) throw await this.notExportedHere(source);
    if (exp.liveJob !== undefined) {
      throw new Busy(`${source} is already under live job ${exp.liveJob}`, { ref: source, hint: `wait for job ${exp.liveJob}, complete it or cancel it`, data: { holder: exp.liveJob } });
    }
    const served = this.s.exports.device(exp.name);
    if (!served) throw await this.notExportedHere(source);
    if (!(served.device instanceof LiveDevice)) throw new InternalError(`export ${exp.name} of ${source} does not serve through a LiveDevice`);
    const live = served.device;

    const d = this.s.entry(dst.backend);
    const existing = await call(d.backend, 'get', target, () => d.backend.getVolume(dst.volume));
    let create: MirrorParams['create'];
    if (existing) {
      await this.a.assertOwns(dst);
      if (existing.sizeBytes < live.sizeBytes) {
        throw new OutOfRange(`${target} (${existing.sizeBytes} bytes) is smaller than ${source} (${live.sizeBytes} bytes)`, { ref: target, hint: 'resize the target first, or name a new volume for the copy to create' });
      }
    } else {
      // A migration keeps the volume's owner: the target is the source's owner's (a tenant's volume stays the tenant's).
      const owner = this.a.isAdmin ? (await this.s.store.getOwner(source)) ?? this.a.principal.id : this.a.ownerFor(undefined);
      create = { sizeBytes: live.sizeBytes, owner: await this.a.targetOwner(dst, d.backend, owner, false) };
    }
    const params: MirrorParams = { source, target, mode, ...(create ? { create } : {}) };
    const name = exp.name;
    const exportOwner = served.owner;
    const s = this.s;
    let jobId: string | undefined;
    const task = mirrorTask(params, {
      source: live,
      attach: (id) => {
        jobId = id;
        s.exports.setLive(name, { id, cancel: () => cancelAndWait(s, id) });
      },
      detach: () => {
        try {
          s.exports.setLive(name, undefined);
        } catch {
          // the export is gone already
        }
      },
      openTarget: async (c) => {
        const deps = s.cloneDeps();
        if (c) {
          if (await deps.find(target)) throw new FailedPrecondition(`${target} appeared while the live copy started; it copies into a volume it creates or one named when it starts`, { ref: target });
          await deps.create(target, c.sizeBytes, c.owner);
        }
        return deps.open(target, 'rw');
      },
      prepareSwitch: async (id) => {
        // The export's locks on the target, taken within the job that holds it now; published before the switch.
        const hold = await holdExport(s, { name, ref: dst, readOnly: false, principal: exportOwner, within: id });
        return {
          undo: () => hold.release(),
          done: async (old: BlockDevice) => {
            const releaseSource = s.exports.retarget(name, { ref: target, holder: hold.id, release: () => hold.release() });
            const info = s.exports.get(name);
            if (info) await hold.list(info.uri, info.startedAt).catch((e: unknown) => s.logger.warn(`export ${name}: recording it as ${target} failed: ${toOffloadError(e).message}`));
            await old.flush().catch(() => undefined);
            await old.close().catch((e: unknown) => s.logger.warn(`closing ${source} after the switch-over failed: ${toOffloadError(e).message}`));
            await releaseSource();
            s.logger.info(`export ${name} switched over from ${source} to ${target}`, { job: jobId });
          },
        };
      },
      removeTarget: () => s.cloneDeps().remove(target),
      failClosed: (why) => {
        s.logger.error(`export ${name}: the switch-over record of job ${jobId} cannot be made true again (${toOffloadError(why).message}); the export stops rather than serve a side the record does not name`);
        void s.exports.stop(name).catch(() => undefined);
      },
    });
    const locks = [{ key: source, mode: 'exclusive' as const }, { key: target, mode: 'exclusive' as const }];
    const speed = checkSpeed(opts.speed);
    this.s.assertOpen();
    return this.s.mutex.run(locks.map((l) => l.key), () => this.s.jobs.start({
      task, ref: target, executor: 'host', principal: this.a.principal, locks, plan, within: served.holder, ...(speed ? { speed } : {}),
    }));
  }

  /** Why a source exported elsewhere, or not at all, cannot be copied live here. */
  private async notExportedHere(source: string): Promise<FailedPrecondition> {
    const elsewhere = (await this.s.jobs.foreignExports()).find((e) => e.ref === source && !e.readOnly);
    if (elsewhere) {
      return new FailedPrecondition(`${source} is exported by another process (${elsewhere.runnerHost} pid ${elsewhere.runnerPid}, export ${elsewhere.name}): a live copy runs in the process that serves its source's writes`, {
        ref: source, hint: 'export it from `offload serve` and run the copy there: `offload --server ADDR copy --live …`',
      });
    }
    return new FailedPrecondition(`${source} is not exported read-write by this broker: a live copy sees the writes to its source through its export`, {
      ref: source, hint: 'export it first (`offload --server ADDR nbd SRC`, with the VM using that export), then copy it live through the same service',
    });
  }
}

async function cancelAndWait(s: BrokerState, id: string): Promise<void> {
  const job = await s.jobs.get(id);
  await job.cancel().catch(() => undefined); // already ending
  await job.wait();
}
