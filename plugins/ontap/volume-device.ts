/**
 * A volume's data path over the mock's HTTP data plane (`/data/volumes/{uuid}`): our stand-in
 * for the NFS mount through which a host reads and writes a NAS volume's disk image. The same
 * device reads a snapshot's data (`?snapshot.uuid=`, as the volume's `.snapshot` directory over
 * NFS), read-only.
 */
import { FailedPrecondition, OutOfRange, type BlockDevice, type Extent } from '../../core/index.js';
import { ExtentList } from './api/schemas.js';
import type { OntapClient } from './client.js';

/** Largest body sent in one PUT. */
const MAX_WRITE = 4 * 1024 * 1024;

/**
 * A NAS volume's (or snapshot's) data path through the appliance's data plane. A read-only device
 * — a volume opened "r", or a snapshot — refuses every kind of write (write, writeZeroes,
 * discard) with FailedPrecondition and never asks the appliance; a read-write one has neither
 * writeZeroes (the copier writes zeros, which the appliance keeps thin) nor discard (a trim
 * changes nothing), as before.
 */
export class OntapVolumeDevice implements BlockDevice {
  /** Present on a read-only device only: refused like any write. */
  readonly writeZeroes?: (offset: number, length: number) => Promise<void>;
  /** Present on a read-only device only: refused like any write. */
  readonly discard?: (offset: number, length: number) => Promise<void>;
  private closed = false;
  private readonly query: Record<string, string>;

  /** `snapshotUuid`: the device reads that snapshot of the volume `uuid` (and is read-only). */
  constructor(
    private readonly client: OntapClient,
    private readonly uuid: string,
    readonly sizeBytes: number,
    private readonly mode: 'r' | 'rw',
    private readonly ref: string,
    private readonly snapshotUuid?: string,
  ) {
    this.query = snapshotUuid === undefined ? {} : { 'snapshot.uuid': snapshotUuid };
    if (mode === 'r' || snapshotUuid !== undefined) {
      this.writeZeroes = async (offset, length) => this.writable('write zeroes', offset, length);
      this.discard = async (offset, length) => this.writable('discard', offset, length);
    }
  }

  private get what(): string {
    return this.snapshotUuid === undefined ? 'volume' : 'snapshot';
  }

  private check(op: string, offset: number, length: number): void {
    if (this.closed) throw new FailedPrecondition(`${op} on ${this.ref}: the device is closed`, { ref: this.ref });
    if (!Number.isInteger(offset) || !Number.isInteger(length) || offset < 0 || length < 0 || offset + length > this.sizeBytes) {
      throw new OutOfRange(`${op} of ${length} bytes at ${offset} on ${this.ref}: outside the ${this.what} (size ${this.sizeBytes})`, { ref: this.ref });
    }
  }

  /** A write of any kind: refused on a snapshot or a volume opened read-only, before the range is looked at. */
  private writable(op: string, offset: number, length: number): void {
    if (this.closed) throw new FailedPrecondition(`${op} on ${this.ref}: the device is closed`, { ref: this.ref });
    if (this.snapshotUuid !== undefined) {
      throw new FailedPrecondition(`${op} on ${this.ref}: a snapshot is read-only`, { ref: this.ref, hint: 'clone it to a volume to change its data' });
    }
    if (this.mode !== 'rw') throw new FailedPrecondition(`${op} on ${this.ref}: the volume was opened read-only`, { ref: this.ref, hint: "open it with mode 'rw'" });
    this.check(op, offset, length);
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    this.check('read', offset, length);
    if (length === 0) return new Uint8Array(0);
    const res = await this.client.raw('GET', `/data/volumes/${this.uuid}`, {
      what: `read ${length} bytes at ${offset}`,
      ref: this.ref,
      query: this.query,
      headers: { range: `bytes=${offset}-${offset + length - 1}` },
    });
    const body = res.status === 200 ? res.body.subarray(offset, offset + length) : res.body;
    if (body.length !== length) {
      throw new OutOfRange(`read ${length} bytes at ${offset} on ${this.ref}: the appliance returned ${body.length} bytes`, { ref: this.ref });
    }
    return new Uint8Array(body.buffer, body.byteOffset, body.byteLength);
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    this.writable('write', offset, data.length);
    for (let done = 0; done < data.length; done += MAX_WRITE) {
      const piece = data.subarray(done, Math.min(data.length, done + MAX_WRITE));
      const start = offset + done;
      await this.client.raw('PUT', `/data/volumes/${this.uuid}`, {
        what: `write ${piece.length} bytes at ${start}`,
        ref: this.ref,
        headers: { 'content-type': 'application/octet-stream', 'content-range': `bytes ${start}-${start + piece.length - 1}/${this.sizeBytes}` },
        data: piece,
      });
    }
  }

  async extents(offset = 0, length = this.sizeBytes - offset): Promise<Extent[]> {
    this.check('extents', offset, length);
    const { data } = await this.client.request('GET', `/data/volumes/${this.uuid}/extents`, {
      what: `map extents`,
      ref: this.ref,
      query: { ...this.query, offset, length },
      schema: ExtentList,
    });
    return data.extents;
  }

  async flush(): Promise<void> {
    // Every PUT is durable on the appliance when it is answered; nothing is buffered here.
    if (this.closed) throw new FailedPrecondition(`flush on ${this.ref}: the device is closed`, { ref: this.ref });
  }

  async close(): Promise<void> {
    this.closed = true;
  }
}
