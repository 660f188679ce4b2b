import type { Socket } from 'node:net';

/** The peer went away (or sent less than a message it started). */
export class PeerGone extends Error {}

/**
 * Exact-length reads from a socket: `read(n)` resolves with the next n bytes. While more than
 * `highWater` bytes wait unread the socket is paused, so a client that sends faster than we
 * serve is held back by TCP, not by our memory.
 */
export class ByteReader {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private waiter: (() => void) | undefined;
  private gone: PeerGone | undefined;
  /** Bytes the current read waits for: a read larger than highWater must be let in whole. */
  private want = 0;

  private readonly onData = (b: Buffer): void => {
    this.chunks.push(b);
    this.buffered += b.length;
    if (this.buffered > Math.max(this.highWater, this.want)) this.socket.pause();
    this.wake();
  };

  private readonly onEnd = (): void => {
    this.gone ??= new PeerGone('the client closed the connection');
    this.wake();
  };

  constructor(private readonly socket: Socket, private readonly highWater = 4 * 1024 * 1024) {
    socket.on('data', this.onData);
    socket.on('end', this.onEnd);
    socket.on('close', this.onEnd);
    socket.on('error', this.onEnd);
  }

  /**
   * Stop reading this socket (another layer, TLS, takes it over); returns how many bytes were
   * received and not read — what the peer sent too early.
   */
  detach(): number {
    this.socket.off('data', this.onData);
    this.socket.off('end', this.onEnd);
    this.socket.off('close', this.onEnd);
    this.socket.off('error', this.onEnd);
    return this.buffered;
  }

  /** Read no more (the server is stopping this connection): a waiting or later read fails as if the peer left. */
  stop(): void {
    this.gone ??= new PeerGone('the server stopped reading');
    this.wake();
  }

  /** The next n bytes (n is bounded by the caller's limits, never taken from the peer unchecked). */
  async read(n: number): Promise<Buffer> {
    if (this.buffered < n) {
      this.want = n;
      if (this.socket.isPaused()) this.socket.resume();
      try {
        while (this.buffered < n) {
          if (this.gone) throw this.gone;
          await new Promise<void>((r) => { this.waiter = r; });
        }
      } finally {
        this.want = 0;
      }
    }
    return this.take(n);
  }

  /** Discard the next n bytes without holding them (a payload we refuse). */
  async skip(n: number): Promise<void> {
    let left = n;
    while (left > 0) {
      if (this.buffered === 0) {
        if (this.gone) throw this.gone;
        await new Promise<void>((r) => { this.waiter = r; });
        continue;
      }
      const k = Math.min(left, this.buffered);
      this.take(k);
      left -= k;
    }
  }

  private take(n: number): Buffer {
    if (n === 0) return Buffer.alloc(0);
    let out: Buffer;
    const first = this.chunks[0]!;
    if (first.length >= n) {
      out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
    } else {
      out = Buffer.allocUnsafe(n);
      let at = 0;
      while (at < n) {
        const c = this.chunks[0]!;
        const k = Math.min(c.length, n - at);
        c.copy(out, at, 0, k);
        at += k;
        if (k === c.length) this.chunks.shift();
        else this.chunks[0] = c.subarray(k);
      }
    }
    this.buffered -= n;
    if (this.buffered <= this.highWater && this.socket.isPaused()) this.socket.resume();
    return out;
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = undefined;
    w?.();
  }
}
