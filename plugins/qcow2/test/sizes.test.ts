import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { isOffloadError } from '../../../core/index.js';
import { HAVE_QEMU, run } from '../../../test/interop/img-qemu.js';
import { cFixed, formatG3, parseImageSize, parseIoNumber, parseQemuSizeBig, sizeToStr } from '../cli/sizes.js';

const CASES = ['1k', '1K', '1.5M', '1b', '1B', '100', '0x100', '1T', '1.3k', '0.5k', '1.k', '7.99E', '1.5e', '+1', ' 1M',
  '00', '010', '9223372036854775807', '1x', '1e3', '1.5', '1M5', '', '1 ', '1kB', '1KiB', '.5k', '0x1.8M', '8E', '16E',
  '9223372036854775808', '-1k', '1.00000000000001k'];

describe('parseQemuSizeBig', () => {
  it('reads the documented forms', () => {
    expect(parseQemuSizeBig('64k')).toBe(65536n);
    expect(parseQemuSizeBig('1.5G')).toBe(1610612736n);
    expect(parseQemuSizeBig('2T')).toBe(2n << 40n);
    expect(parseQemuSizeBig('1.3k')).toBe(1331n); // truncated, like qemu
    expect(parseQemuSizeBig('1.5')).toBeUndefined(); // a fraction needs a unit
    expect(parseQemuSizeBig('abc')).toBeUndefined();
  });

  it('gives typed errors for bad and out-of-range sizes', () => {
    for (const bad of ['x', '1.5', '-1', '']) {
      try {
        parseImageSize(bad);
        expect.fail(`accepted ${bad}`);
      } catch (e) {
        expect(isOffloadError(e, 'InvalidArgument')).toBe(true);
        expect((e as Error).message).toContain(`'${bad}'`);
      }
    }
    expect(() => parseImageSize('8E')).toThrow(/Must be between 0 and 9223372036854775807/);
    expect(() => parseImageSize('16P')).toThrow(/too large/);
    expect(() => parseIoNumber('abc')).toThrow('Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- abc');
  });
});

describe('human numbers', () => {
  it('sizeToStr follows size_to_str', () => {
    expect(sizeToStr(0)).toBe('0 B');
    expect(sizeToStr(999)).toBe('999 B');
    expect(sizeToStr(1000)).toBe('0.977 KiB');
    expect(sizeToStr(397312)).toBe('388 KiB');
    expect(sizeToStr(67108864)).toBe('64 MiB');
    expect(sizeToStr(1024 * 1000)).toBe('0.977 MiB');
    expect(sizeToStr(1536)).toBe('1.5 KiB');
  });
  it('formatG3 and cFixed follow printf', () => {
    expect(formatG3(999.6)).toBe('1e+03');
    expect(formatG3(9.996)).toBe('10');
    expect(formatG3(1.5)).toBe('1.5');
    expect(cFixed(0.125, 2)).toBe('0.12');
    expect(cFixed(0.375, 2)).toBe('0.38');
    expect(cFixed(0.2, 2)).toBe('0.20');
    expect(cFixed(100, 2)).toBe('100.00');
  });
});

describe.skipIf(!HAVE_QEMU)('sizes against qemu-img create', () => {
  const dir = mkdtempSync(join(tmpdir(), 'img-sizes-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('accepts and refuses exactly what qemu-img accepts, with the same value', () => {
    for (const text of CASES) {
      // `--` so that qemu-img's option parser does not take "-1k" for an option.
      const r = run('qemu-img', ['create', '-f', 'raw', 's.raw', '--', text], dir);
      const m = /size=(\d+)/.exec(r.stdout);
      const qemuValue = m ? BigInt(m[1]!) : undefined;
      const ours = parseQemuSizeBig(text);
      const oursValid = ours !== undefined && ours <= 2n ** 63n - 1n ? ours : undefined;
      expect(oursValid, `size '${text}'`).toBe(qemuValue);
    }
  });
});
