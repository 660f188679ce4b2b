import { describe, expect, it } from 'vitest';
import { CapabilitySet, formatRef, isValidName, parseRef, parseSnapshotRef, parseVolumeRef } from '../../core/index.js';

describe('refs and names', () => {
  it('parses volume and snapshot refs', () => {
    expect(parseRef('local/vm1')).toEqual({ backend: 'local', volume: 'vm1' });
    expect(parseRef('san1/db.data@nightly-1')).toEqual({ backend: 'san1', volume: 'db.data', snapshot: 'nightly-1' });
    expect(formatRef(parseRef('a/b@c'))).toBe('a/b@c');
  });

  it.each(['', 'novolume', '/v', 'b/', 'b/v@', 'b/v@s@t', 'b/../x', 'b/has space', 'b/-x', 'b/.x', `b/${'x'.repeat(129)}`, 'b/v/w', 'b/ü'])(
    'refuses %j with InvalidArgument', (text) => {
      expect(() => parseRef(text)).toThrow(expect.objectContaining({ code: 'InvalidArgument' }));
    });

  it('names are 1–128 chars of [A-Za-z0-9._-] not starting with . or -', () => {
    expect(isValidName('x'.repeat(128))).toBe(true);
    expect(isValidName('x'.repeat(129))).toBe(false);
    expect(isValidName('_a.b-c')).toBe(true);
    expect(isValidName('.a')).toBe(false);
    expect(isValidName(42)).toBe(false);
  });

  it('volume and snapshot refs are told apart', () => {
    expect(() => parseVolumeRef('a/b@c')).toThrow(/snapshot ref/);
    expect(() => parseSnapshotRef('a/b')).toThrow(/volume ref/);
  });

  it('capability sets: unknown names are unsupported, limits are kept', () => {
    const caps = new CapabilitySet(['volume.create', ['clone.full', { maxSizeBytes: 10 }]]);
    expect(caps.has('volume.create')).toBe(true);
    expect(caps.has('volume.teleport')).toBe(false);
    expect(caps.limits('clone.full')).toEqual({ maxSizeBytes: 10 });
    expect(() => new CapabilitySet(['volume.teleport' as never])).toThrow(/unknown capability/);
  });
});
