import type { Command } from 'commander';
import type { Broker } from '../../broker-api.js';
import type { Job, JobInfo } from '../../jobs/job.js';
import { errorFromCode } from '../../model/errors.js';
import { UsageError, type CliContext } from '../contribution.js';
import { formatSize, parseSize } from '../sizes.js';
import { serviceOf } from '../../service/remote.js';
import { preferOption } from './plan.js';

/**
 * Wait for a job with a progress bar on a TTY; fails with the job's error. A job the service runs
 * goes on there when this command is interrupted: Ctrl-C says so and exits.
 */
export async function awaitJob(ctx: CliContext, job: Job, label: string, broker?: Broker): Promise<JobInfo> {
  const bar = ctx.progress(label);
  let saidReady = false;
  const off = job.on((e) => {
    bar.update(e.job.progress.current, e.job.progress.total);
    if (e.job.status === 'ready' && !saidReady) {
      saidReady = true;
      ctx.note(`offload: job ${job.id} is ready (the target is in sync and kept so): \`offload jobs complete ${job.id}\` switches over, \`offload jobs cancel ${job.id}\` leaves the source in use`);
    }
  });
  const service = broker && serviceOf(broker);
  const interrupted = () => {
    bar.done();
    ctx.note(`offload: job ${job.id} goes on in the service at ${service}: \`offload jobs wait ${job.id}\` follows it, \`offload jobs cancel ${job.id}\` stops it`);
    process.exit(130);
  };
  if (service) process.once('SIGINT', interrupted);
  let info: JobInfo;
  try {
    info = await job.wait();
  } finally {
    process.off('SIGINT', interrupted);
    off();
  }
  bar.done();
  if (info.error) throw errorFromCode(info.error.code, info.error.message, { ref: info.ref, data: { job: info.id } });
  return info;
}

/**
 * Follow a job to its end: a progress bar on a TTY, one final line otherwise; fails with the job's
 * error. Detached (`--detach`): print the job (its id; --json: the job) and return at once.
 */
export async function followJob(ctx: CliContext, job: Job, label: string, broker: Broker, detach?: boolean): Promise<void> {
  if (detach) return printDetached(ctx, job);
  const info = await awaitJob(ctx, job, label, broker);
  ctx.print(info, `${label}: done (job ${info.id}, ${info.executor}, ${formatSize(info.progress.current)} processed)`);
}

export const DETACH_HELP = 'with a service (--server): print the job id and return at once; the job goes on in the service';

/** `--detach` needs a service: an embedded job lives only as long as its command. */
export function checkDetach(broker: Broker, detach: boolean | undefined): void {
  if (detach && !serviceOf(broker)) {
    throw new UsageError('--detach needs a service (--server ADDR, OFFLOAD_SERVER or server: in the config): an embedded job runs only as long as its command');
  }
}

export function printDetached(ctx: CliContext, job: Job): void {
  ctx.print(job.info(), job.id);
}

export function speedOption(s: string | undefined): number | undefined {
  return s === undefined ? undefined : parseSize(s, 'speed');
}

export function registerDataJobCommands(program: Command, ctx: CliContext): void {
  program.command('clone <args...>')
    .usage('[options] SRC DST | --instant SRC=DST [SRC=DST …]')
    .description('clone a volume or snapshot (backend/volume[@snapshot]) into a new volume: natively, or through the host as a job')
    .option('--full', 'an independent copy')
    .option('--linked', 'share unchanged data with the source')
    .option('--size <size>', 'size of the new volume (≥ the source)')
    .option('--prefer <where>', 'host: copy through the host even where the backend could clone natively')
    .option('--verify', 'through the host: compare checksums of source and target after the copy')
    .option('--speed <bytes-per-second>', 'through the host: rate limit (suffixes k, M, G)')
    .option('--instant', 'usable at once, on any backend: the clone can be exported right away (in the same service) while a job fills it from the source')
    .option('--copy-on-read', 'with --instant: keep what clients read from the source, so each range is read from it once')
    .option('--detach', DETACH_HELP)
    .action(async (args: string[], o: { full?: boolean; linked?: boolean; size?: string; prefer?: string; verify?: boolean; speed?: string; instant?: boolean; copyOnRead?: boolean; detach?: boolean }) => {
      if (o.full && o.linked) throw new UsageError('--full and --linked exclude each other');
      const mode = o.full ? 'full' : o.linked ? 'linked' : undefined;
      const speed = speedOption(o.speed);
      const pairs = args.some((a) => a.includes('=')) ? args.map(pairOf) : undefined;
      if (pairs && !o.instant) throw new UsageError('SRC=DST pairs are for an instant clone: add --instant, or give SRC DST');
      if (o.copyOnRead && !o.instant) throw new UsageError('--copy-on-read applies to an instant clone: add --instant');
      if (!pairs && args.length !== 2) throw new UsageError(`clone takes SRC DST (or, with --instant, SRC=DST pairs), got ${args.length} argument${args.length === 1 ? '' : 's'}`);
      const broker = await ctx.broker();
      checkDetach(broker, o.detach);
      if (pairs) {
        if (mode === 'linked' || o.verify || o.prefer || o.size) throw new UsageError('--linked, --verify, --prefer and --size do not apply to several instant clones');
        const job = await broker.instantClone(pairs, { ...(speed ? { speed } : {}), ...(o.copyOnRead ? { copyOnRead: true } : {}) });
        const what = pairs.map((p) => `${p.source} → ${p.target}`).join(', ');
        if (serviceOf(broker) || o.detach) {
          return ctx.print(job.info(), `instant clones ${what}: usable now; job ${job.id} fills them${serviceOf(broker) ? ' in the service' : ''} (\`offload jobs wait ${job.id}\`)`);
        }
        return followJob(ctx, job, `instant clones ${what}`, broker);
      }
      const [source, target] = args as [string, string];
      const started = await broker.startClone(source, target, {
        ...(mode ? { mode } : {}), ...(o.size ? { sizeBytes: parseSize(o.size) } : {}), ...(o.prefer ? { prefer: preferOption(o.prefer) } : {}),
        ...(o.verify ? { verify: true } : {}), ...(speed ? { speed } : {}), ...(o.instant ? { instant: true } : {}),
        ...(o.copyOnRead ? { copyOnRead: true } : {}),
      });
      if (started.job && o.instant && serviceOf(broker)) {
        // The fill goes on in the service; the clone is usable now (export it through the same service).
        const v = await broker.volumes.get(target);
        ctx.print({ ...v, job: started.job.info() }, `cloned ${source} to ${v.backend}/${v.name}: usable now; job ${started.job.id} fills it in the service (\`offload jobs wait ${started.job.id}\`)`);
        return;
      }
      if (started.job) {
        if (o.detach) return printDetached(ctx, started.job);
        const info = await awaitJob(ctx, started.job, `clone ${source} → ${target}`, broker);
        const v = await broker.volumes.get(target);
        ctx.print({ ...v, job: info }, `cloned ${source} to ${v.backend}/${v.name} through the host (job ${info.id}, ${formatSize(info.progress.current)} copied)`);
        return;
      }
      const v = started.volume;
      ctx.print(v, `cloned ${source} to ${v.backend}/${v.name}${v.parent ? ` (linked to ${v.parent})` : ''}`);
    });

  const chainJobs = [
    { verb: 'stream', about: 'make a volume independent of its parent (or of everything above --base)', base: 'stop at this ancestor' },
    { verb: 'commit', about: 'merge a volume\'s changes into its parent (or --base)', base: 'commit into this ancestor' },
  ] as const;
  for (const { verb, about, base } of chainJobs) {
    program.command(`${verb} <ref>`)
      .description(about)
      .option('--base <name>', base)
      .option('--speed <bytes-per-second>', 'rate limit (suffixes k, M, G)')
      .option('--detach', DETACH_HELP)
      .action(async (ref: string, o: { base?: string; speed?: string; detach?: boolean }) => {
        const speed = speedOption(o.speed);
        const broker = await ctx.broker();
        checkDetach(broker, o.detach);
        const job = await broker[verb](ref, { ...(o.base ? { base: o.base } : {}), ...(speed ? { speed } : {}) });
        await followJob(ctx, job, `${verb} ${ref}`, broker, o.detach);
      });
  }

  program.command('copy [args...]')
    .usage('[options] SRC DST | --live SRC=DST [SRC=DST …] | --live --resume JOB')
    .description('copy a volume\'s data into another existing volume, on any backends, through the host; --live: a volume in use, ending with its export switched over (several SRC=DST pairs: the disks of one VM, switched over all or none)')
    .option('--speed <bytes-per-second>', 'rate limit (suffixes k, M, G)')
    .option('--verify', 'compare checksums of source and target after the copy')
    .option('--prefer <where>', 'host (the only way a copy runs; accepted for symmetry with clone)')
    .option('--live', 'the source is exported read-write and in use: copy while it is written (the target is created if missing); the job is ready once in sync, `offload jobs complete ID` switches the export over')
    .option('--mode <mode>', 'live copy: background (default) or write-blocking (a write to a copied range reaches both sides before it is acknowledged)')
    .option('--since <snapshot>', 'incremental: DST holds the data of SRC\'s snapshot SNAPSHOT already; copy only what changed since (SRC may be a later snapshot, vol@s2)')
    .option('--resume <job>', 'live copy: copy on from where live copy JOB left (cancelled after ready, or suspended when its service stopped), each pair from its snapshot; one whose service died, from its write-intent record')
    .option('--detach', DETACH_HELP)
    .action(async (args: string[], o: { speed?: string; verify?: boolean; prefer?: string; live?: boolean; mode?: string; since?: string; resume?: string; detach?: boolean }) => {
      const speed = speedOption(o.speed);
      if (o.mode !== undefined && o.mode !== 'background' && o.mode !== 'write-blocking') throw new UsageError(`--mode is background or write-blocking, got ${o.mode}`);
      if (o.resume !== undefined) {
        if (!o.live) throw new UsageError('--resume JOB resumes a live copy: add --live');
        if (o.verify || o.prefer || o.since !== undefined) throw new UsageError('--verify, --prefer and --since do not apply to a resumed live copy (its snapshots are in its record)');
        const broker = await ctx.broker();
        checkDetach(broker, o.detach);
        const job = await broker.liveCopy(args.map(pairOf), { resume: o.resume, ...(speed ? { speed } : {}), ...(o.mode ? { mode: o.mode } : {}) });
        await followJob(ctx, job, `live copy ${o.resume} resumed as ${job.id}`, broker, o.detach);
        return;
      }
      const pairs = args.some((a) => a.includes('=')) ? args.map(pairOf) : undefined;
      if (pairs && !o.live) throw new UsageError('SRC=DST pairs are for a live copy: add --live, or give SRC DST');
      if (!pairs && args.length !== 2) throw new UsageError(`copy takes SRC DST (or, with --live, SRC=DST pairs), got ${args.length} argument${args.length === 1 ? '' : 's'}`);
      const broker = await ctx.broker();
      // A live copy runs where its source is served (asked of that process when it is another), never in this command.
      if (!o.live) checkDetach(broker, o.detach);
      if (pairs) {
        if (o.verify || o.prefer) throw new UsageError('--verify and --prefer do not apply to a live copy');
        const job = await broker.liveCopy(pairs, { ...(speed ? { speed } : {}), ...(o.mode ? { mode: o.mode } : {}) });
        await followJob(ctx, job, `live copy ${pairs.map((p) => `${p.source} → ${p.target}`).join(', ')}`, broker, o.detach);
        return;
      }
      const [source, target] = args as [string, string];
      const job = await broker.copy(source, target, {
        ...(speed ? { speed } : {}), ...(o.verify ? { verify: true } : {}), ...(o.prefer ? { prefer: preferOption(o.prefer) } : {}),
        ...(o.live ? { live: true } : {}), ...(o.mode ? { mode: o.mode } : {}), ...(o.since !== undefined ? { since: o.since } : {}),
      });
      await followJob(ctx, job, `copy ${source} → ${target}${o.since !== undefined ? ` (changes since ${o.since})` : ''}`, broker, o.detach);
    });
}

/** `SRC=DST` of `copy --live`, `clone --instant` and `backup`. */
export function pairOf(arg: string): { source: string; target: string } {
  const at = arg.indexOf('=');
  if (at <= 0 || at === arg.length - 1 || arg.indexOf('=', at + 1) >= 0) throw new UsageError(`a pair is SRC=DST, got ${arg}`);
  return { source: arg.slice(0, at), target: arg.slice(at + 1) };
}
