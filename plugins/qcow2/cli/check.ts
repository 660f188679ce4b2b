/**
 * `qemu-img check`: counters and exit codes as qemu-img 7.2 gives them — 0 clean, 1 the check
 * itself failed, 2 corruptions, 3 leaks only, 63 the format has no check (raw). With `-r`, the
 * repair run is followed by a second, read-only check whose result is printed, carrying the
 * fixed counts over, as qemu-img does.
 */
import { openImage, type CheckResult, type ImageFormat } from '../engine/index.js';
import type { ImgOutput } from './output.js';
import { qemuJsonPretty } from './qemu-json.js';
import { cFixed } from './sizes.js';
import type { QemuObject } from './image-info.js';

export interface CheckArgs {
  file: string;
  format?: ImageFormat;
  output: 'human' | 'json';
  repair?: 'leaks' | 'all';
  quiet?: boolean;
}

export const EXIT_CHECK_FAILED = 1;
export const EXIT_CORRUPT = 2;
export const EXIT_LEAKS = 3;
export const EXIT_UNSUPPORTED = 63;

export async function runCheck(args: CheckArgs, out: ImgOutput): Promise<void> {
  const img = await openImage(args.file, {
    readOnly: args.repair === undefined,
    noBacking: true,
    ...(args.format ? { format: args.format } : {}),
  });
  let result: CheckResult;
  let fixed: { leaks: number; corruptions: number } | undefined;
  try {
    if (img.format !== 'qcow2') {
      out.warn('This image format does not support checks');
      out.setExitCode(EXIT_UNSUPPORTED);
      return;
    }
    result = await img.check(args.repair ? { repair: args.repair } : {});
    for (const m of result.messages) out.warn(m);
    if (result.checkErrors === 0 && (result.leaksFixed > 0 || result.corruptionsFixed > 0)) {
      fixed = { leaks: result.leaksFixed, corruptions: result.corruptionsFixed };
      result = await img.check();
      for (const m of result.messages) out.warn(m);
    }
  } finally {
    await img.close();
  }
  if (result.checkErrors > 0) {
    // qemu-img's check returns an error in these cases and prints no report, only this line.
    out.warn('Check failed: Input/output error');
    out.setExitCode(EXIT_CHECK_FAILED);
    return;
  }
  const json = checkJson(args.file, result, fixed);
  if (args.output === 'json') {
    out.print(json, qemuJsonPretty(json));
  } else if (!args.quiet) {
    const lines: string[] = [];
    if (fixed) {
      lines.push(
        'The following inconsistencies were found and repaired:',
        '',
        `    ${fixed.leaks} leaked clusters`,
        `    ${fixed.corruptions} corruptions`,
        '',
        'Double checking the fixed image now...',
      );
    }
    lines.push(...humanCheck(result));
    out.print(json, lines.join('\n'));
  }
  if (result.corruptions > 0) {
    out.setExitCode(EXIT_CORRUPT);
  } else if (result.leaks > 0) {
    out.setExitCode(EXIT_LEAKS);
  }
}

/** ImageCheck in QAPI member order; counters that are zero are absent, as qemu-img omits them. */
export function checkJson(filename: string, r: CheckResult, fixed?: { leaks: number; corruptions: number }): QemuObject {
  const nz = (n: number) => (n !== 0 ? n : undefined);
  return {
    filename,
    format: 'qcow2',
    'check-errors': r.checkErrors,
    'image-end-offset': nz(r.imageEndOffset),
    corruptions: nz(r.corruptions),
    leaks: nz(r.leaks),
    'corruptions-fixed': nz(fixed ? fixed.corruptions : r.corruptionsFixed),
    'leaks-fixed': nz(fixed ? fixed.leaks : r.leaksFixed),
    'total-clusters': nz(r.totalClusters),
    'allocated-clusters': nz(r.allocatedClusters),
    'fragmented-clusters': nz(r.fragmentedClusters),
    'compressed-clusters': nz(r.compressedClusters),
  };
}

/** `dump_human_image_check`. */
export function humanCheck(r: CheckResult): string[] {
  const lines: string[] = [];
  if (!(r.corruptions || r.leaks || r.checkErrors)) {
    lines.push('No errors were found on the image.');
  } else {
    if (r.corruptions) {
      lines.push('', `${r.corruptions} errors were found on the image.`, 'Data may be corrupted, or further writes to the image may corrupt it.');
    }
    if (r.leaks) {
      lines.push('', `${r.leaks} leaked clusters were found on the image.`, 'This means waste of disk space, but no harm to data.');
    }
    if (r.checkErrors) {
      lines.push('', `${r.checkErrors} internal errors have occurred during the check.`);
    }
  }
  if (r.totalClusters !== 0 && r.allocatedClusters !== 0) {
    const pct = (n: number) => cFixed((n * 100) / r.totalClusters, 2);
    const ofAllocated = (n: number) => cFixed((n * 100) / r.allocatedClusters, 2);
    lines.push(
      `${r.allocatedClusters}/${r.totalClusters} = ${pct(r.allocatedClusters)}% allocated, ` +
        `${ofAllocated(r.fragmentedClusters)}% fragmented, ${ofAllocated(r.compressedClusters)}% compressed clusters`,
    );
  }
  if (r.imageEndOffset !== 0) lines.push(`Image end offset: ${r.imageEndOffset}`);
  return lines;
}
