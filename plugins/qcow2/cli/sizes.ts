/**
 * Sizes as qemu-img and qemu-io 7.2 read them (`qemu_strtosz`): a decimal or `0x` hex integer,
 * an optional fraction (only with a suffix, not with hex), and an optional suffix
 * `b/B` (bytes), `k/K`, `M/m`, `G/g`, `T/t`, `P/p`, `E/e` (powers of 1024). Leading blanks and one
 * `+` are accepted; the result is truncated to whole bytes and must not exceed INT64_MAX.
 */
import { InvalidArgument, OutOfRange } from '../../../core/index.js';

const SUFFIX_SHIFT: Record<string, bigint> = { b: 0n, k: 10n, m: 20n, g: 30n, t: 40n, p: 50n, e: 60n };
const INT64_MAX = (1n << 63n) - 1n;
const SIZE_SYNTAX = /^[ \t\n\r\f\v]*\+?(?:(0[xX][0-9a-fA-F]+)|([0-9]+)(\.[0-9]*)?)([bBkKmMgGtTpPeE])?$/;

/** The exact value of `text`, or undefined when it is not a qemu size. */
export function parseQemuSizeBig(text: string): bigint | undefined {
  const m = SIZE_SYNTAX.exec(text);
  if (!m) return undefined;
  const [, hex, dec, fraction, suffix] = m;
  // QEMU only honours a fraction together with a unit ("1.5" alone is refused, "1.5k" is 1536).
  if (fraction !== undefined && suffix === undefined) return undefined;
  const shift = suffix === undefined ? 0n : SUFFIX_SHIFT[suffix.toLowerCase()]!;
  const whole = BigInt(hex ?? dec!);
  let value = whole << shift;
  if (fraction !== undefined && fraction.length > 1) {
    // qemu multiplies the fraction as a double; times a power of two that product is exact.
    const part = Number('0' + fraction) * 2 ** Number(shift);
    value += BigInt(Math.floor(part));
  }
  return value;
}

/**
 * A size for an image (`create`, `resize`, `-o cluster_size=`), as a safe JS integer.
 * `what` names the argument in the error ("image size").
 */
export function parseImageSize(text: string, what = 'image size'): number {
  const v = parseQemuSizeBig(text);
  if (v === undefined) {
    throw new InvalidArgument(
      `Invalid ${what} specified: '${text}'. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.`,
    );
  }
  if (v > INT64_MAX) {
    throw new OutOfRange(`Invalid ${what} specified: '${text}'. Must be between 0 and ${INT64_MAX}.`);
  }
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new OutOfRange(`The ${what} '${text}' is too large: at most ${Number.MAX_SAFE_INTEGER} bytes are supported.`);
  }
  return Number(v);
}

/**
 * A number argument of a qemu-io command (offset, length). On failure the message is qemu-io's
 * ("Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- abc").
 */
export function parseIoNumber(text: string): number {
  const v = parseQemuSizeBig(text);
  if (v === undefined || v > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new InvalidArgument(`Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- ${text}`);
  }
  return Number(v);
}

/**
 * A byte count for humans as QEMU's `size_to_str` writes it ("16 MiB", "0.977 MiB", "388 KiB"):
 * the unit is the power of 1024 at which the value is below 1000, printed with `%0.3g`.
 */
export function sizeToStr(bytes: number): string {
  const suffixes = ['', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei'];
  // frexp(val / (1000/1024)) exponent minus one is floor(log2(val * 1.024)); C's division truncates.
  const scaled = bytes / (1000 / 1024);
  const exp = scaled === 0 ? 0 : Math.floor(Math.log2(scaled)) + 1;
  const i = Math.min(Math.trunc((exp - 1) / 10), suffixes.length - 1);
  return `${formatG3(bytes / 2 ** (i * 10))} ${suffixes[i]}B`;
}

/** printf("%0.3g", v) for v >= 0. */
export function formatG3(v: number): string {
  if (v === 0) return '0';
  const [mant, e] = v.toExponential(2).split('e') as [string, string];
  const exp = Number(e);
  if (exp < -4 || exp >= 3) {
    const m = mant.replace(/\.?0+$/, '');
    return `${m}e${exp < 0 ? '-' : '+'}${String(Math.abs(exp)).padStart(2, '0')}`;
  }
  return v.toFixed(Math.max(0, 2 - exp)).replace(/(\.\d*?)0+$/, '$1').replace(/\.$/, '');
}

/**
 * printf("%.Nf", x): like toFixed, except that an exact tie rounds to even as glibc does
 * (0.125 → "0.12", where toFixed gives "0.13").
 */
export function cFixed(x: number, digits: number): string {
  const exact = x.toFixed(Math.min(100, digits + 60));
  const tie = new RegExp(`\\.\\d{${digits}}50*$`);
  if (!tie.test(exact)) return x.toFixed(digits);
  const cut = exact.slice(0, exact.indexOf('.') + 1 + digits).replace(/\.$/, '');
  const lastDigit = Number(cut[cut.length - 1]);
  if (lastDigit % 2 === 0) return cut;
  // Round away from zero: the same as toFixed on a tie.
  return x.toFixed(digits);
}
