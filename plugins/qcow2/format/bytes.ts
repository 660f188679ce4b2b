/**
 * Big-endian integer helpers. 64-bit values that are offsets are read as two 32-bit halves and
 * combined exactly (qcow2 offsets use at most 56 bits; anything ≥ 2^53 is rejected by callers).
 */
export function view(buf: Uint8Array): DataView {
  return new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
}

/** A u64 as a number; exact below 2^53, otherwise Infinity-safe approximation callers reject. */
export function getU64(dv: DataView, off: number): number {
  return dv.getUint32(off) * 0x1_0000_0000 + dv.getUint32(off + 4);
}

export function setU64(dv: DataView, off: number, value: number): void {
  dv.setUint32(off, Math.floor(value / 0x1_0000_0000));
  dv.setUint32(off + 4, value >>> 0);
}

export function isSafeOffset(n: number): boolean {
  return Number.isSafeInteger(n) && n >= 0;
}

export function alignUp(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}

/**
 * A plain Uint8Array whose bytes are not zeroed first, for buffers that are about to be filled
 * completely (zeroing a large buffer costs as much as reading into it). Never pooled.
 */
export function uninitialized(length: number): Uint8Array {
  return new Uint8Array(Buffer.allocUnsafeSlow(length).buffer, 0, length);
}
