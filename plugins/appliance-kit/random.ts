/**
 * Seeded randomness for the mock appliances: the same seed gives the same sequence, so a run
 * with probabilistic faults replays exactly.
 */

/** A small seeded PRNG (mulberry32) returning numbers in [0, 1). */
export function seededRandom(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * The seed of one stream among several drawn from one seed (a fault rule's, by its id): streams
 * stay independent, so adding a rule never changes when the others fire.
 */
export function streamSeed(seed: number, stream: number): number {
  return (seed ^ Math.imul(stream, 0x9e3779b9)) >>> 0;
}
