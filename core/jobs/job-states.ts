import { FailedPrecondition } from '../model/errors.js';
import type { JobStatus, JobVerb } from './job.js';

/** QEMU's JobSTT: which status may follow which (job.c). */
export const JOB_TRANSITIONS: Readonly<Record<JobStatus, readonly JobStatus[]>> = {
  created: ['running', 'aborting'],
  running: ['paused', 'ready', 'waiting', 'aborting'],
  paused: ['running'],
  ready: ['standby', 'waiting', 'aborting'],
  standby: ['ready'],
  waiting: ['pending', 'aborting'],
  pending: ['aborting', 'concluded'],
  aborting: ['aborting', 'concluded'],
  concluded: [],
};

/** QEMU's JobVerbTable: in which statuses each verb is allowed. */
export const JOB_VERBS: Readonly<Record<JobVerb, readonly JobStatus[]>> = {
  cancel: ['created', 'running', 'paused', 'ready', 'standby', 'waiting', 'pending'],
  pause: ['created', 'running', 'paused', 'ready', 'standby'],
  resume: ['created', 'running', 'paused', 'ready', 'standby'],
  'set-speed': ['created', 'running', 'paused', 'ready', 'standby'],
  complete: ['ready'],
  finalize: ['pending'],
  dismiss: ['concluded'],
};

export const ACTIVE_STATUSES: readonly JobStatus[] = ['created', 'running', 'paused', 'ready', 'standby', 'waiting', 'pending', 'aborting'];

export function canTransition(from: JobStatus, to: JobStatus): boolean {
  return JOB_TRANSITIONS[from].includes(to);
}

export function verbAllowed(verb: JobVerb, status: JobStatus): boolean {
  return JOB_VERBS[verb].includes(status);
}

export function assertVerb(verb: JobVerb, status: JobStatus, jobId: string): void {
  if (!verbAllowed(verb, status)) {
    throw new FailedPrecondition(`job ${jobId} cannot ${verb} in status ${status}`, {
      ref: jobId,
      hint: `${verb} is allowed in: ${JOB_VERBS[verb].join(', ')}`,
    });
  }
}
