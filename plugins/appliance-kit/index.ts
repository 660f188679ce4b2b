/**
 * The appliance kit: what the mock appliances share — fault rules (one grammar, README.md),
 * seeded randomness, HTTP helpers and a copy-on-write chunk store. Mocks import it through this
 * file only (DESIGN §2); it is not a plugin and binds nothing.
 */
export {
  defineFaultGrammar,
  describeFaultError,
  FaultInjector,
  type CommonAction,
  type FaultGrammarExtension,
  type FaultInjectorOf,
  type FaultRule,
  type FaultRuleState,
  type FaultConfig,
  type LateAction,
  type LatencyAction,
  type NonJsonAction,
  type ResetAction,
  type ShortPageAction,
  type StatusAction,
  type VendorAction,
} from './faults.js';
export { answerWithFaults, faultAdmin, shortPageOf, type FaultedRequest } from './fault-http.js';
export { seededRandom, streamSeed } from './random.js';
export { drain, HttpError, parseJson, readBody, sendReply, serveHttp, sleep, type HttpService, type Reply, type ServeOptions } from './http.js';
export { ChunkStore, coarsenSpans, diffMaps, ZERO_CHUNK, type BlockMap, type ByteSpan, type MapExtent } from './chunk-store.js';
