/**
 * The qemu-io commands `offload img io -c CMD` understands, with qemu-io 7.2's syntax and output:
 *
 *   read  [-qv] [-P pattern] off len     read (and with -P verify) a range
 *   write [-q] [-P pattern | -z [-u]] off len   write a pattern byte (default 0xcd) or zeroes
 *   discard [-q] off len                 drop a range
 *
 * Results go to stdout exactly as qemu-io prints them ("wrote 512/512 bytes at offset 0" and the
 * timing line); syntax errors go to stderr. A command that fails (bad arguments, a failed I/O, a
 * failed `read -P` verification) makes the whole run exit 1, but later commands still run, as in
 * qemu-io. Large ranges are processed in bounded chunks so memory does not grow with `len`.
 */
import { isOffloadError } from '../../../core/index.js';
import { parseIoNumber } from './sizes.js';

/** What the commands need from an open image (the engine's `Image` fits). */
export interface IoTarget {
  readonly virtualSize: number;
  read(offset: number, length: number): Promise<Uint8Array>;
  write(offset: number, data: Uint8Array): Promise<void>;
  writeZeroes(offset: number, length: number): Promise<void>;
  discard(offset: number, length: number): Promise<void>;
}

/** Where a command's output goes: `out` is stdout, `err` stderr; each call is one line. */
export interface IoOutput {
  out(line: string): void;
  err(line: string): void;
}

/** qemu's BDRV_REQUEST_MAX_BYTES: the largest single request qemu-io accepts. */
export const MAX_REQUEST_BYTES = 2147483136;
/** Bytes handled per engine call; keeps memory bounded for large ranges. */
const CHUNK = 4 * 1024 * 1024;

interface CommandSpec {
  name: string;
  aliases: string[];
  /** Option letters taking no value, and those taking one. */
  flags: string;
  valued: string;
}

const COMMANDS: CommandSpec[] = [
  { name: 'read', aliases: ['r'], flags: 'qv', valued: 'P' },
  { name: 'write', aliases: ['w'], flags: 'qzu', valued: 'P' },
  { name: 'discard', aliases: ['d'], flags: 'q', valued: '' },
];

/** A parsed command, or the line to print (and where) when it cannot be parsed. */
export type ParsedIoCommand =
  | { ok: true; name: 'read' | 'write' | 'discard'; opts: Map<string, string | true>; offset: number; length: number }
  | { ok: false; stream: 'out' | 'err'; message: string };

/** Parse one `-c` command line (qemu-io splits on blanks; there is no quoting). */
export function parseIoCommand(line: string): ParsedIoCommand {
  const words = line.trim().split(/\s+/).filter((w) => w.length > 0);
  if (words.length === 0) return { ok: false, stream: 'err', message: 'empty command' };
  const [word, ...args] = words as [string, ...string[]];
  const spec = COMMANDS.find((c) => c.name === word || c.aliases.includes(word));
  if (!spec) return { ok: false, stream: 'err', message: `command "${word}" not found` };
  if (args.length < 2) {
    return { ok: false, stream: 'err', message: `bad argument count ${args.length} to ${spec.name}, expected at least 2 arguments` };
  }
  const opts = new Map<string, string | true>();
  let i = 0;
  for (; i < args.length; i++) {
    const a = args[i]!;
    if (a === '--') { i++; break; }
    if (!a.startsWith('-') || a.length < 2) break;
    // getopt: letters may be grouped ("-qv"); a valued letter takes the rest of the word or the next one.
    for (let j = 1; j < a.length; j++) {
      const letter = a[j]!;
      if (spec.flags.includes(letter)) {
        opts.set(letter, true);
      } else if (spec.valued.includes(letter)) {
        const rest = a.slice(j + 1);
        const value = rest.length > 0 ? rest : args[++i];
        if (value === undefined) {
          return { ok: false, stream: 'err', message: `${spec.name}: option requires an argument -- '${letter}'` };
        }
        opts.set(letter, value);
        break;
      } else {
        return { ok: false, stream: 'err', message: `${spec.name}: invalid option -- '${letter}'` };
      }
    }
  }
  const positional = args.slice(i);
  if (positional.length !== 2) {
    return { ok: false, stream: 'err', message: `bad argument count ${positional.length} to ${spec.name}, expected 2 arguments (off len)` };
  }
  if (spec.name === 'write') {
    const exclusive = ['z', 'P'].filter((k) => opts.has(k));
    if (exclusive.length > 1) {
      return { ok: false, stream: 'out', message: 'Only one of -z, -P, and -s can be specified at the same time' };
    }
    if (opts.has('u') && !opts.has('z')) {
      return { ok: false, stream: 'out', message: '-u requires -z to be specified' };
    }
  }
  const pattern = opts.get('P');
  if (typeof pattern === 'string' && parsePattern(pattern) === undefined) {
    return { ok: false, stream: 'out', message: `${pattern} is not a valid pattern byte` };
  }
  let offset: number;
  let length: number;
  try {
    offset = parseIoNumber(positional[0]!);
    length = parseIoNumber(positional[1]!);
  } catch (e) {
    return { ok: false, stream: 'out', message: (e as Error).message };
  }
  if (length > MAX_REQUEST_BYTES && !(spec.name === 'write' && opts.has('z')) && spec.name !== 'discard') {
    return { ok: false, stream: 'out', message: `length cannot exceed ${MAX_REQUEST_BYTES}, given ${positional[1]}` };
  }
  return { ok: true, name: spec.name as 'read' | 'write' | 'discard', opts, offset, length };
}

/** A pattern byte as qemu-io reads it (`strtol(arg, NULL, 0)`, 0…255), or undefined. */
export function parsePattern(text: string): number | undefined {
  let v: number;
  if (/^[+]?0[xX][0-9a-fA-F]+$/.test(text)) v = parseInt(text.replace('+', ''), 16);
  else if (/^[+]?0[0-7]*$/.test(text)) v = parseInt(text.replace('+', ''), 8);
  else if (/^[+]?[1-9][0-9]*$/.test(text)) v = parseInt(text, 10);
  else return undefined;
  return v >= 0 && v <= 255 ? v : undefined;
}

/**
 * Run one command against `img`. Returns true on success, false when the command failed (qemu-io
 * then exits 1 after running the remaining commands).
 */
export async function runIoCommand(img: IoTarget, line: string, output: IoOutput): Promise<boolean> {
  const cmd = parseIoCommand(line);
  if (!cmd.ok) {
    output[cmd.stream](cmd.message);
    return false;
  }
  const { name, opts, offset, length } = cmd;
  const quiet = opts.has('q');
  if (offset + length > img.virtualSize) {
    // qemu's block layer refuses requests past the end with EIO.
    output.out(`${name} failed: Input/output error`);
    return false;
  }
  const started = process.hrtime.bigint();
  let verified = true;
  try {
    if (name === 'read') {
      const pattern = typeof opts.get('P') === 'string' ? parsePattern(opts.get('P') as string)! : undefined;
      for (let pos = 0; pos < length; pos += CHUNK) {
        const n = Math.min(CHUNK, length - pos);
        const data = await img.read(offset + pos, n);
        if (pattern !== undefined && verified && data.some((b) => b !== pattern)) verified = false;
        if (opts.has('v')) dumpBuffer(data, offset + pos, output);
      }
      if (!verified) output.out(`Pattern verification failed at offset ${offset}, ${length} bytes`);
    } else if (name === 'write') {
      if (opts.has('z')) {
        if (length > 0) await img.writeZeroes(offset, length);
      } else {
        const pattern = typeof opts.get('P') === 'string' ? parsePattern(opts.get('P') as string)! : 0xcd;
        const buf = new Uint8Array(Math.min(CHUNK, length)).fill(pattern);
        for (let pos = 0; pos < length; pos += CHUNK) {
          const n = Math.min(CHUNK, length - pos);
          await img.write(offset + pos, n === buf.length ? buf : buf.subarray(0, n));
        }
      }
    } else if (length > 0) {
      await img.discard(offset, length);
    }
  } catch (e) {
    output.out(`${name} failed: ${isOffloadError(e) ? e.message : (e as Error).message}`);
    return false;
  }
  const elapsedNs = Number(process.hrtime.bigint() - started);
  if (!quiet) printReport(name === 'write' ? 'wrote' : name, offset, length, elapsedNs, output);
  return verified;
}

/** qemu-io's `print_report`: the result line and the timing line. */
function printReport(op: string, offset: number, count: number, elapsedNs: number, output: IoOutput): void {
  const secs = elapsedNs / 1e9;
  const perSec = (v: number) => (secs > 0 ? v / secs : 0);
  output.out(`${op} ${count}/${count} bytes at offset ${offset}`);
  output.out(`${cvtstr(count)}, 1 ops; ${secs.toFixed(2).padStart(5, '0')} sec (${cvtstr(perSec(count))}/sec and ${perSec(1).toFixed(4)} ops/sec)`);
}

/**
 * qemu-io's `cvtstr`: "%.3f" in the largest binary unit, or "%f" for plain bytes, cut at the first
 * ".000" ("64 KiB", "512 bytes", "861.186991 bytes").
 */
export function cvtstr(value: number): string {
  const units: [number, string][] = [
    [2 ** 60, ' EiB'], [2 ** 50, ' PiB'], [2 ** 40, ' TiB'], [2 ** 30, ' GiB'], [2 ** 20, ' MiB'], [2 ** 10, ' KiB'],
  ];
  let text = value.toFixed(6);
  let suffix = ' bytes';
  for (const [unit, name] of units) {
    if (value >= unit) {
      text = (value / unit).toFixed(3);
      suffix = name;
      break;
    }
  }
  const trim = text.indexOf('.000');
  return (trim >= 0 ? text.slice(0, trim) : text) + suffix;
}

/** qemu-io's `dump_buffer` (`read -v`): 16 bytes a line, hex then printable ASCII. */
function dumpBuffer(data: Uint8Array, offset: number, output: IoOutput): void {
  for (let i = 0; i < data.length; i += 16) {
    let hex = '';
    let ascii = '';
    for (let j = 0; j < 16 && i + j < data.length; j++) {
      const c = data[i + j]!;
      hex += c.toString(16).padStart(2, '0') + ' ';
      ascii += c < 0x20 || c >= 0x7e ? '.' : String.fromCharCode(c); // qemu-io shows '~' as '.' too
    }
    output.out(`${(offset + i).toString(16).padStart(8, '0')}:  ${hex} ${ascii}`);
  }
}
