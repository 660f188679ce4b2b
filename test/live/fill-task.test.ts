/**
 * The fill job (core/live/fill-task.ts) on memory devices, where it ends: the target's exports
 * are stopped while their views still serve — a client never gets an error from a view that was
 * ended under it — and a device opened through the fill afterwards says why the fill ended.
 */
import { describe, expect, it } from 'vitest';
import { JobRun, LeaseLost, type BlockDevice } from '../../core/index.js';
import { fillTask } from '../../core/live/fill-task.js';
import { Fill } from '../../core/live/fill.js';
import { memoryDevice } from '../support/memory-device.js';

const MiB = 1024 * 1024;

describe('a fill job that fails', () => {
  it('stops the exports before their views end; a view read meanwhile gets data, one after says the clone is incomplete', async () => {
    const size = 8 * MiB;
    const src = memoryDevice(size);
    await src.write(0, new Uint8Array(size).fill(9));
    const dst = memoryDevice(size);
    let reads = 0;
    let fill: Fill | undefined;
    let view: BlockDevice | undefined;
    let opened: BlockDevice | undefined; // a volumes.open of the clone
    let exportsStopped = false;
    const errorsWhileServed: unknown[] = [];
    let serving = true;
    // A client of the export reads the first MiB over and over while the export serves.
    const client = (async () => {
      while (serving) {
        if (view) {
          try {
            await view.read(0, 64 * 1024);
          } catch (e) {
            if (!exportsStopped) errorsWhileServed.push(e);
          }
        }
        await new Promise((r) => setTimeout(r, 1));
      }
    })();
    const source: BlockDevice = {
      ...src,
      read: async (o, l) => {
        if (++reads === 3) throw new Error('the array went away');
        return src.read(o, l);
      },
    };
    const target: BlockDevice = {
      ...dst,
      flush: async () => {
        await new Promise((r) => setTimeout(r, 50)); // the save's flush: the window a client used to fall into
        await dst.flush();
      },
    };
    const task = fillTask({ pairs: [{ source: 'm/s', target: 'm/t', sizeBytes: size, owner: 'admin' }] }, [{
      openSource: async () => source,
      createTarget: async () => undefined,
      openTarget: async () => target,
      register: (f) => {
        fill = f;
        view = f.view();
        opened = f.view();
      },
      unregister: () => undefined,
      abandon: async () => undefined,
      stopExports: async () => {
        exportsStopped = true;
        serving = false;
        await client;
        await view?.close();
      },
    }]);
    await expect(task.run(new JobRun({ jobId: 'f', checkpointEveryMs: 0 }))).rejects.toThrow(/went away/);
    serving = false;
    await client;
    expect(fill).toBeDefined();
    expect(exportsStopped).toBe(true);
    expect(errorsWhileServed).toEqual([]);
    await expect(opened!.read(0, 4096)).rejects.toMatchObject({ code: 'FailedPrecondition', message: expect.stringMatching(/incomplete; delete it and clone again/) });
    await opened!.close();
  });
});

describe('a fill job whose runner lost its lease while it read (a process stopped past it)', () => {
  it('writes nothing more into the target, saves nothing, deletes nothing, and closes the target writing nothing more', async () => {
    const size = 8 * MiB;
    const src = memoryDevice(size);
    await src.write(0, new Uint8Array(size).fill(7));
    const dst = memoryDevice(size);
    let held = true;
    let reads = 0;
    let writesUnheld = 0;
    let flushesUnheld = 0;
    let abandoned = 0;
    const closedWith: unknown[] = [];
    const source: BlockDevice = {
      ...src,
      read: async (o, l, io) => {
        const data = await src.read(o, l, io);
        if (++reads === 3) held = false; // the lease ran out while this read was out
        return data;
      },
    };
    const target: BlockDevice = {
      ...dst,
      write: async (o, d, io) => { if (!held) writesUnheld++; return dst.write(o, d, io); },
      flush: async () => { if (!held) flushesUnheld++; return dst.flush(); },
      close: async (o) => void closedWith.push(o),
    };
    const saves: unknown[] = [];
    const task = fillTask({ pairs: [{ source: 'm/s', target: 'm/t', sizeBytes: size, owner: 'admin' }] }, [{
      openSource: async () => source,
      createTarget: async () => undefined,
      openTarget: async () => target,
      register: () => undefined,
      unregister: () => undefined,
      abandon: async () => void abandoned++,
      stopExports: async () => undefined,
    }]);
    const run = new JobRun({ jobId: 'f', checkpointEveryMs: 0, mayContinue: () => held, onSave: (st) => void saves.push(st) });
    await expect(task.run(run)).rejects.toBeInstanceOf(LeaseLost);
    expect(reads).toBeGreaterThanOrEqual(3);
    expect(writesUnheld).toBe(0);
    expect(flushesUnheld).toBe(0);
    expect(abandoned).toBe(0);
    expect(closedWith).toEqual([{ writeNothing: true }]);
  });
});
