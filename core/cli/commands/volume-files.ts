/**
 * `offload volume export REF FILE [-O raw|qcow2]` and `offload volume import FILE REF [-f raw|qcow2]`:
 * a volume's data into a new local image file, or a file's into a volume, as broker jobs (a
 * progress bar on a TTY, one final line otherwise; `--json` prints the concluded job).
 */
import type { Command } from 'commander';
import type { CliContext } from '../contribution.js';
import { formatSize, parseSize } from '../sizes.js';
import { awaitJob, checkDetach, DETACH_HELP, printDetached } from './data-jobs.js';

interface Common { speed?: string; verify?: boolean; detach?: boolean }

function common(o: Common): { speed?: number; verify?: boolean } {
  return { ...(o.speed !== undefined ? { speed: parseSize(o.speed, 'speed') } : {}), ...(o.verify ? { verify: true } : {}) };
}

/** Adds `export` and `import` to the `volume` command. */
export function registerVolumeFileCommands(volume: Command, ctx: CliContext): void {
  volume.command('export <ref> <file>')
    .description('copy a volume or snapshot (backend/volume[@snapshot]) into a new image file, sparse (holes stay holes)')
    .option('-O, --output-format <format>', 'raw (default) or qcow2')
    .option('--force', 'replace the file if it exists')
    .option('--speed <bytes-per-second>', 'rate limit (suffixes k, M, G)')
    .option('--verify', 'compare checksums of the volume and the file afterwards')
    .option('--detach', DETACH_HELP)
    .action(async (ref: string, file: string, o: Common & { outputFormat?: string; force?: boolean }) => {
      const broker = await ctx.broker();
      checkDetach(broker, o.detach);
      const job = await broker.volumes.exportTo(ref, file, { ...(o.outputFormat ? { format: o.outputFormat } : {}), ...(o.force ? { overwrite: true } : {}), ...common(o) });
      if (o.detach) return printDetached(ctx, job);
      const { file: path, format } = job.info().params as { file: string; format: string };
      const info = await awaitJob(ctx, job, `export ${ref} → ${file}`, broker);
      ctx.print(info, `exported ${ref} to ${path} (${format}; ${formatSize(info.progress.current)} processed, job ${info.id})`);
    });

  volume.command('import <file> <ref>')
    .description('copy an image file\'s content into a volume; where the file has holes the volume is made zero')
    .option('-f, --format <format>', 'raw or qcow2 (default: probed)')
    .option('--create', 'create the volume with the file\'s virtual size if it does not exist')
    .option('--owner <principal>', 'with --create: the tenant that owns the new volume')
    .option('--speed <bytes-per-second>', 'rate limit (suffixes k, M, G)')
    .option('--verify', 'compare checksums of the file and the volume afterwards')
    .option('--detach', DETACH_HELP)
    .action(async (file: string, ref: string, o: Common & { format?: string; create?: boolean; owner?: string }) => {
      const broker = await ctx.broker();
      checkDetach(broker, o.detach);
      const job = await broker.volumes.importFrom(file, ref, {
        ...(o.format ? { format: o.format } : {}), ...(o.create ? { create: true } : {}), ...(o.owner ? { owner: o.owner } : {}), ...common(o),
      });
      if (o.detach) return printDetached(ctx, job);
      const { file: path, format, create } = job.info().params as { file: string; format: string; create?: unknown };
      const info = await awaitJob(ctx, job, `import ${file} → ${ref}`, broker);
      ctx.print(info, `imported ${path} (${format}) into ${ref}${create ? ', which it created' : ''} (${formatSize(info.progress.current)} processed, job ${info.id})`);
    });
}
