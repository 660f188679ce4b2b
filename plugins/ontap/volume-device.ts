/**
 * A volume's data path over the mock's HTTP data plane (`/data/volumes/{uuid}`): our stand-in
 * for the NFS mount through which a host reads and writes a NAS volume's disk image.
 */
import { FailedPrecondition, OutOfRange, type BlockDevice, type Extent } from '../../core/index.js';
import { ExtentList } from './api/schemas.js';
import type { OntapClient } from './client.js';

/** Largest body sent in one PUT. */
const MAX_WRITE = 4 * 1024 * 1024;

/** A NAS volume's data path through the appliance's data plane. */
export class OntapVolumeDevice implements BlockDevice {
  private closed = false;

  constructor(
    private readonly client: OntapClient,
    private readonly uuid: string,
    readonly sizeBytes: number,
    private readonly mode: 'r' | 'rw',
    private readonly ref: string,
  ) {}

  private check(op: string, offset: number, length: number): void {
    if (this.closed) throw new FailedPrecondition(`${op} on ${this.ref}: the device is closed`, { ref: this.ref });
    if (!Number.isInteger(offset) || !Number.isInteger(length) || offset < 0 || length < 0 || offset + length > this.sizeBytes) {
      throw new OutOfRange(`${op} of ${length} bytes at ${offset} on ${this.ref}: outside the volume (size ${this.sizeBytes})`, { ref: this.ref });
    }
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    this.check('read', offset, length);
    if (length === 0) return new Uint8Array(0);
    const res = await this.client.raw('GET', `/data/volumes/${this.uuid}`, {
      what: `read ${length} bytes at ${offset}`,
      ref: this.ref,
      headers: { range: `bytes=${offset}-${offset + length - 1}` },
    });
    const body = res.status === 200 ? res.body.subarray(offset, offset + length) : res.body;
    if (body.length !== length) {
      throw new OutOfRange(`read ${length} bytes at ${offset} on ${this.ref}: the appliance returned ${body.length} bytes`, { ref: this.ref });
    }
    return new Uint8Array(body.buffer, body.byteOffset, body.byteLength);
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    this.check('write', offset, data.length);
    if (this.mode !== 'rw') throw new FailedPrecondition(`write on ${this.ref}: the volume was opened read-only`, { ref: this.ref, hint: "open it with mode 'rw'" });
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
      query: { offset, length },
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
