import { describe, expect, it } from 'vitest';
import { BufferPool } from '../../core/export/buffer-pool.js';

describe('BufferPool (READ reply buffers used again)', () => {
  it('hands out buffers of exactly the size asked, and the same memory again once given back', () => {
    const pool = new BufferPool(1 << 20);
    const a = pool.take(256 * 1024);
    expect(a.length).toBe(256 * 1024);
    a.fill(7);
    pool.give(a);
    const b = pool.take(256 * 1024);
    expect(b.buffer === a.buffer).toBe(true);
    // A size in the same class (classes are a quarter of a power of two apart) shares it.
    pool.give(b);
    expect(pool.take(240 * 1024).buffer === a.buffer).toBe(true);
    expect(pool.take(256 * 1024).buffer === a.buffer).toBe(false);
  });

  it('two buffers taken at once never share memory', () => {
    const pool = new BufferPool(1 << 20);
    const a = pool.take(128 * 1024);
    const b = pool.take(128 * 1024);
    a.fill(1);
    b.fill(2);
    expect(a.every((x) => x === 1)).toBe(true);
    pool.give(a);
    pool.give(b);
    const c = pool.take(128 * 1024);
    const d = pool.take(128 * 1024);
    expect(c.buffer === d.buffer).toBe(false);
  });

  it('keeps no more than its limit: past it, idle buffers of other sizes go first, then the one given back', () => {
    const pool = new BufferPool(512 * 1024);
    const big = pool.take(256 * 1024);
    pool.give(big);
    // Two 256 KiB buffers in use: with the idle one that is 768 KiB, over the limit.
    const x = pool.take(160 * 1024);
    const y = pool.take(160 * 1024);
    const z = pool.take(160 * 1024);
    pool.give(x);
    // The idle 256 KiB buffer was dropped to make room; the 160 KiB class keeps x.
    expect(pool.take(160 * 1024).buffer === x.buffer).toBe(true);
    pool.give(y);
    pool.give(z);
    expect(pool.take(256 * 1024).buffer === big.buffer).toBe(false);
  });

  it('small requests and buffers it did not make pass through', () => {
    const pool = new BufferPool(1 << 20);
    const small = pool.take(100);
    expect(small.length).toBe(100);
    pool.give(small);
    pool.give(Buffer.alloc(64 * 1024));
    expect(pool.take(64 * 1024).length).toBe(64 * 1024);
  });
});
