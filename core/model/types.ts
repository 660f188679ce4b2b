/** A volume as a backend reports it. */
export interface Volume {
  backend: string;
  name: string;
  sizeBytes: number;
  /** ISO-8601 creation time, when the backend knows it. */
  createdAt?: string;
  /**
   * The backend's own identity of the volume, where it has one (an array's volume id, a uuid):
   * a volume deleted and made again under the same name has another. What a live copy's
   * write-intent record is checked against before a crashed copy goes on from it.
   */
  id?: string;
  /** The ref this volume still depends on (a linked clone's parent), if any. */
  parent?: string;
  /** The principal that owns the volume, when the backend records it. */
  owner?: string;
  /** Bytes actually allocated, when the backend knows it. */
  allocatedBytes?: number;
}

/** A point-in-time copy of one volume. */
export interface Snapshot {
  backend: string;
  volume: string;
  name: string;
  sizeBytes: number;
  createdAt?: string;
}

export interface PageRequest {
  /** Most items to return (the backend may return fewer). */
  limit?: number;
  /** Opaque token from the previous page's `next`. */
  token?: string;
}

export interface Page<T> {
  items: T[];
  /** Present when more items remain; pass it back as `token`. */
  next?: string;
}

/** A byte range of a volume and what it holds. Ranges not listed are unallocated. */
export interface Extent {
  offset: number;
  length: number;
  /** `zero`: allocated but reads as zeros (no data to move); `data`: real data. */
  kind: 'data' | 'zero';
}
