import { COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, INCOMPAT_EXTL2 } from '../format/constants.js';
import { backingFormatOf, type Header } from '../format/header.js';
import type { HeaderInfo } from './types.js';

/** The header as `qemu-img info` shows it: the stored fields plus the derived ones. */
export function headerInfo(h: Header): HeaderInfo {
  const info: HeaderInfo = {
    version: h.version, clusterBits: h.clusterBits, clusterSize: 1 << h.clusterBits, virtualSize: h.size,
    cryptMethod: h.cryptMethod, l1Size: h.l1Size, l1TableOffset: h.l1TableOffset,
    refcountTableOffset: h.refcountTableOffset, refcountTableClusters: h.refcountTableClusters,
    nbSnapshots: h.nbSnapshots, snapshotsOffset: h.snapshotsOffset,
    incompatibleFeatures: h.incompatibleFeatures, compatibleFeatures: h.compatibleFeatures,
    autoclearFeatures: h.autoclearFeatures, refcountOrder: h.refcountOrder, refcountBits: 1 << h.refcountOrder,
    headerLength: h.headerLength, compressionType: h.compressionType,
    lazyRefcounts: (h.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0n,
    dirty: (h.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n,
    corrupt: (h.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n,
    extendedL2: (h.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n,
    extensions: h.extensions.map((e) => ({ type: e.type, length: e.data.length })),
  };
  if (h.backingFile !== undefined) info.backingFile = h.backingFile;
  const bf = backingFormatOf(h);
  if (bf !== undefined) info.backingFormat = bf;
  return info;
}
