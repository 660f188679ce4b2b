/**
 * The NBD protocol's numbers, as tables, from `NetworkBlockDevice/nbd: doc/proto.md` (current
 * numbering; the 2017 copies give 9 = BLOCK_SIZE, which is wrong today). Everything on the wire is
 * big-endian. QEMU's extensions (`qemu:allocation-depth`, `qemu:dirty-bitmap:NAME`) are from
 * `qemu/qemu: docs/interop/nbd.rst`, their context ids and answers from `qemu/qemu: nbd/server.c`.
 */

export const NBDMAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const IHAVEOPT = 0x49484156454f5054n; // "IHAVEOPT"
export const OPTION_REPLY_MAGIC = 0x0003e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Handshake flags the server sends, and the client flags it answers with. */
export const HANDSHAKE = { FIXED_NEWSTYLE: 1 << 0, NO_ZEROES: 1 << 1 } as const;

/** Options (NBD_OPT_*). */
export const OPT = {
  EXPORT_NAME: 1, ABORT: 2, LIST: 3, PEEK_EXPORT: 4, STARTTLS: 5, INFO: 6, GO: 7,
  STRUCTURED_REPLY: 8, LIST_META_CONTEXT: 9, SET_META_CONTEXT: 10, EXTENDED_HEADERS: 11,
} as const;

/** Option reply types (NBD_REP_*); errors have the high bit set. */
export const REP = {
  ACK: 1, SERVER: 2, INFO: 3, META_CONTEXT: 4,
  ERR_UNSUP: 0x80000001, ERR_POLICY: 0x80000002, ERR_INVALID: 0x80000003, ERR_PLATFORM: 0x80000004,
  ERR_TLS_REQD: 0x80000005, ERR_UNKNOWN: 0x80000006, ERR_SHUTDOWN: 0x80000007, ERR_BLOCK_SIZE_REQD: 0x80000008,
  ERR_TOO_BIG: 0x80000009,
} as const;

/** Information types of NBD_REP_INFO (INFO and GO). */
export const INFO = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

/** Transmission flags (NBD_FLAG_*), sent with the export's size. */
export const FLAG = {
  HAS_FLAGS: 1 << 0, READ_ONLY: 1 << 1, SEND_FLUSH: 1 << 2, SEND_FUA: 1 << 3, ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5, SEND_WRITE_ZEROES: 1 << 6, SEND_DF: 1 << 7, CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9, SEND_CACHE: 1 << 10, SEND_FAST_ZERO: 1 << 11,
} as const;

/** Commands (NBD_CMD_*). */
export const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6, BLOCK_STATUS: 7 } as const;

/** Command flags (NBD_CMD_FLAG_*). */
export const CMD_FLAG = { FUA: 1 << 0, NO_HOLE: 1 << 1, DF: 1 << 2, REQ_ONE: 1 << 3, FAST_ZERO: 1 << 4 } as const;

/** The flags each command may carry (any other is EINVAL). */
export const ALLOWED_FLAGS: Readonly<Record<number, number>> = {
  [CMD.READ]: CMD_FLAG.DF,
  [CMD.WRITE]: CMD_FLAG.FUA,
  [CMD.DISC]: 0,
  [CMD.FLUSH]: 0,
  [CMD.TRIM]: CMD_FLAG.FUA,
  [CMD.WRITE_ZEROES]: CMD_FLAG.FUA | CMD_FLAG.NO_HOLE | CMD_FLAG.FAST_ZERO,
  [CMD.BLOCK_STATUS]: CMD_FLAG.REQ_ONE,
};

/** Structured reply chunk types (NBD_REPLY_TYPE_*) and the DONE flag. */
export const REPLY = { NONE: 0, OFFSET_DATA: 1, OFFSET_HOLE: 2, BLOCK_STATUS: 5, ERROR: 0x8001, ERROR_OFFSET: 0x8002 } as const;
export const REPLY_FLAG_DONE = 1;

/** Error values on the wire (errno numbers as the protocol fixes them). */
export const ERR = { EPERM: 1, EIO: 5, ENOMEM: 12, EINVAL: 22, ENOSPC: 28, EOVERFLOW: 75, ENOTSUP: 95, ESHUTDOWN: 108 } as const;

/** `base:allocation` flags: a hole (unallocated), reads as zeros. */
export const STATE = { HOLE: 1 << 0, ZERO: 1 << 1 } as const;

/** `qemu:dirty-bitmap:NAME` flags: the range is dirty in the bitmap (0: clean). */
export const STATE_DIRTY = 1 << 0;

export const CONTEXT_ALLOCATION = 'base:allocation';
export const CONTEXT_DEPTH = 'qemu:allocation-depth';
/** A dirty bitmap's context is this prefix and the bitmap's name. */
export const CONTEXT_BITMAP_PREFIX = 'qemu:dirty-bitmap:';
/**
 * Context ids as qemu-nbd numbers them (nbd/server.c NBD_META_ID_*): base:allocation 0,
 * qemu:allocation-depth 1, the export's i-th dirty bitmap 2 + i (whether or not depth is offered).
 */
export const CONTEXT_ID = { ALLOCATION: 0, DEPTH: 1, FIRST_BITMAP: 2 } as const;
/** LIST_META_CONTEXT queries that stand for every context starting with them (as qemu-nbd). */
export const CONTEXT_WILDCARDS: readonly string[] = ['base:', 'qemu:', CONTEXT_BITMAP_PREFIX];

/** Limits: nothing is sized by a number a client sent beyond these. */
export const LIMITS = {
  /** Largest payload of a request (INFO_BLOCK_SIZE maximum; clients stay within it). */
  maxPayload: 32 * 1024 * 1024,
  /** Largest option data we take in (names are at most 4096 bytes; meta-context queries a few). */
  maxOptionData: 64 * 1024,
  /** Option data past which the connection is dropped rather than read and discarded. */
  maxDiscardedOptionData: 16 * 1024 * 1024,
  /** Extents in one BLOCK_STATUS chunk (as qemu-nbd). */
  maxExtents: 131072,
  /** Longest name or description we accept in an option. */
  maxString: 4096,
} as const;
